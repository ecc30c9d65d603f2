"""The schema file: its model, and `load_schema`, which reads it into the core's `Schema`.

Data categories and uses are checked against the Fides taxonomy (fideslang) here, so the
rules file's model shares the same checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from residency.server.config.errors import FileModel, read_model
from residency.server.core.lookup import Normalize
from residency.server.core.schema import (
    CREDENTIAL_PREFIX,
    FieldSource,
    FieldSpec,
    FieldType,
    Schema,
    data_categories,
    data_uses,
)


def _category(value: str) -> str:
    if value not in data_categories():
        raise ValueError(f"{value!r} is not a Fides data category")
    return value


def _use(value: str) -> str:
    if value not in data_uses():
        raise ValueError(f"{value!r} is not a Fides data use")
    return value


DataCategory = Annotated[
    str, AfterValidator(_category), Field(description="a Fides data category, e.g. user.contact.email")
]
DataUse = Annotated[str, AfterValidator(_use), Field(description="a Fides data use, e.g. essential.service")]


class FieldFile(FileModel):
    """One declared field of a record."""

    category: DataCategory
    type: FieldType
    description: str = Field(default="", description="what the field holds, for people")
    sensitive: bool = Field(
        default=False, description="true or false: sensitive personal information (PIPL Art. 28)"
    )
    out_of_scope: bool = Field(
        default=False,
        description="true or false: outside the policy's scope (1c), transferred only under a rule "
        "naming its category",
    )
    source: FieldSource = "registration"
    max_bytes: int = Field(default=4096, gt=0, description="a positive whole number of bytes")
    max_items: int = Field(default=256, gt=0, description="a positive whole number of list items")
    lookup: bool = Field(
        default=False,
        description="true or false: keep a blind index (keyed hash) of the value, so that "
        "FindRecords finds users by it; string fields only",
    )
    normalize: Normalize = Field(
        default="none",
        description="email, e164, lower or none: the form of the value that is indexed "
        "(a lookup field's only)",
    )

    @model_validator(mode="after")
    def _lookup(self) -> FieldFile:
        if self.lookup and self.type != "string":
            raise ValueError(f"'lookup' needs a string field, not a {self.type} one")
        if self.lookup and self.category.split(".")[:2] == CREDENTIAL_PREFIX.split("."):
            raise ValueError("a credential is kept only as a slow hash: it cannot be a lookup field")
        if self.normalize != "none" and not self.lookup:
            raise ValueError("'normalize' applies to a lookup field: add 'lookup: true' or remove it")
        return self


class SchemaFile(FileModel):
    """The fields a record may hold; any other field is refused, not stored."""

    version: int = Field(default=1, description="a whole number: the schema's version")
    fields: dict[str, FieldFile] = Field(min_length=1, description="a non-empty mapping of field names")


def load_schema(path: str | Path) -> Schema:
    """Loads and validates a schema file; a bad entry fails naming the file and the field."""
    f = read_model(Path(path), SchemaFile, "schema")
    return Schema({name: FieldSpec(name, **spec.model_dump()) for name, spec in f.fields.items()}, f.version)
