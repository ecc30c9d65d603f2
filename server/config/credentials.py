"""`credentials:` of a node config: how often VerifyCredential may be asked, per user and
per caller (policy 6a: a guessing caller is slowed down, whoever it claims to be)."""

from __future__ import annotations

from pydantic import Field

from residency.server.config.errors import FileModel


class CredentialsConfig(FileModel):
    """Token buckets, kept in the store (shared by its front ends): a minute's calls may come at once."""

    per_user_per_minute: float = Field(
        default=10.0, gt=0, description="a number of verify calls per minute about one user, above 0"
    )
    per_caller_per_minute: float = Field(
        default=600.0, gt=0, description="a number of verify calls per minute by one caller, above 0"
    )
