"""Domain exceptions. `residency.server.api.errors` maps each to one gRPC status, in one place."""

from __future__ import annotations


class ResidencyError(Exception):
    """Base of every error a caller can be told about. Messages never carry field values."""


class InvalidRecord(ResidencyError):
    """A request breaks the schema or the API contract.

    `violations` lists (field path, description) pairs, one per offending field.
    """

    def __init__(self, violations: list[tuple[str, str]]):
        self.violations = violations
        super().__init__("; ".join(f"{f}: {d}" for f, d in violations))


class NotFound(ResidencyError):
    pass


class AlreadyExists(ResidencyError):
    """What a call would create under a caller-chosen id exists already; nothing was written."""


class TransferDenied(ResidencyError):
    """No rule allows any of the requested data to go where it was asked for."""


class PolicyDenied(ResidencyError):
    """The privacy policy forbids this (e.g. collecting cookie data without cookie consent)."""


class CallerDenied(ResidencyError):
    """The authenticated caller may not make this call (e.g. it claims a location its
    certificate does not name); `permission` names what it lacks, where one does."""

    def __init__(self, message: str, permission: str = ""):
        super().__init__(message)
        self.permission = permission


class KeyUnavailable(ResidencyError):
    """A key needed to seal or open data cannot be had; nothing was written."""


class FailedPrecondition(ResidencyError):
    pass


class ConfigError(ResidencyError):
    """The configuration is invalid. The message names the file and key."""


class OutOfRange(ResidencyError):
    """A leaf index or tree size beyond what the log holds."""


class StorageFull(ResidencyError):
    """The node's disk is full: nothing of the request was written, and it can be sent again
    once space returns."""


class Stopping(ResidencyError):
    """The node is draining: a write that arrived after the drain began was not written and
    can be sent again to a running node."""


class KeyServiceDenied(ResidencyError):
    """A key service refused this node the use of its key (KMS AccessDenied, OpenBao permission
    denied): the node's credentials or the key's policy must change; retrying will not help."""


class RateLimited(ResidencyError):
    """Too many calls of one kind, by one caller or about one user; `retry_after` seconds
    until the next is allowed."""

    def __init__(self, message: str, retry_after: float):
        self.retry_after = retry_after
        super().__init__(message)


class KeyShredded(FailedPrecondition):
    """Copies sealed to a region key the region no longer holds (shredded or replaced):
    the primary must hold that destination until it has the region's new key."""

    # The google.rpc.ErrorInfo reason the primary tells this refusal from others by.
    REASON = "REGION_KEY_SHREDDED"

    def __init__(self, message: str, key_id: str = ""):
        super().__init__(message)
        self.key_id = key_id

    def metadata(self) -> dict[str, str]:
        return {"key_id": self.key_id}


class StaleLeaseEpoch(FailedPrecondition):
    """A batch shipped under a lease epoch below one the region node has already taken a
    batch under: its worker's lease has passed to another, so nothing of it is applied."""

    # The google.rpc.ErrorInfo reason the worker tells this refusal from others by.
    REASON = "STALE_LEASE_EPOCH"

    def __init__(self, source: str, epoch: int, seen: int):
        super().__init__(
            f"lease epoch {epoch} is stale: this node has taken {source}'s copies under epoch "
            f"{seen}, so the worker that sent this batch no longer holds the lease; nothing was applied"
        )
        self.epoch, self.seen = epoch, seen

    def metadata(self) -> dict[str, str]:
        return {"epoch": str(self.epoch), "seen": str(self.seen)}


class StoreUnavailable(ResidencyError):
    """The node's database server (PostgreSQL) cannot be reached or dropped the connection:
    nothing of the request was written, and it can be sent again."""


class KeysBehind(StoreUnavailable):
    """The store has logged more key events than this process's keys folder holds, or others
    than its first ones: another process of the store made one (a rotation, a retirement, a
    shred, a rekey) in a folder this one does not share. Until the folder holds them this
    process opens nothing (it may be a shred, which must hold here too); a call can go to
    another process meanwhile."""


class TransactionConflict(StoreUnavailable):
    """The database gave a transaction up to let a concurrent one through (PostgreSQL's
    serialization failure or deadlock, SQLSTATE 40001 / 40P01; distributed SQL raises them
    under contention): nothing of it was written, and running it again is safe."""
