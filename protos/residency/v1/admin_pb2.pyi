import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RotateKeysRequest(_message.Message):
    __slots__ = ("from_version",)
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    from_version: str
    def __init__(self, from_version: _Optional[str] = ...) -> None: ...

class RotateKeysResponse(_message.Message):
    __slots__ = ("region", "version", "data_keys_rewrapped")
    REGION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_KEYS_REWRAPPED_FIELD_NUMBER: _ClassVar[int]
    region: str
    version: str
    data_keys_rewrapped: int
    def __init__(self, region: _Optional[str] = ..., version: _Optional[str] = ..., data_keys_rewrapped: _Optional[int] = ...) -> None: ...

class RotateIndexKeyRequest(_message.Message):
    __slots__ = ("from_version",)
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    def __init__(self, from_version: _Optional[int] = ...) -> None: ...

class RotateIndexKeyResponse(_message.Message):
    __slots__ = ("region", "version", "records_to_index")
    REGION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_TO_INDEX_FIELD_NUMBER: _ClassVar[int]
    region: str
    version: int
    records_to_index: int
    def __init__(self, region: _Optional[str] = ..., version: _Optional[int] = ..., records_to_index: _Optional[int] = ...) -> None: ...

class RewrapKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RewrapKeysResponse(_message.Message):
    __slots__ = ("region", "version", "data_keys_rewrapped")
    REGION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_KEYS_REWRAPPED_FIELD_NUMBER: _ClassVar[int]
    region: str
    version: str
    data_keys_rewrapped: int
    def __init__(self, region: _Optional[str] = ..., version: _Optional[str] = ..., data_keys_rewrapped: _Optional[int] = ...) -> None: ...

class RetireKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RetireKeysResponse(_message.Message):
    __slots__ = ("region", "version", "wrapping_keys_deleted")
    REGION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WRAPPING_KEYS_DELETED_FIELD_NUMBER: _ClassVar[int]
    region: str
    version: str
    wrapping_keys_deleted: int
    def __init__(self, region: _Optional[str] = ..., version: _Optional[str] = ..., wrapping_keys_deleted: _Optional[int] = ...) -> None: ...

class ShredRegionKeyRequest(_message.Message):
    __slots__ = ("key_id", "reason")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    reason: str
    def __init__(self, key_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ShredRegionKeyResponse(_message.Message):
    __slots__ = ("region", "key_id")
    REGION_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    region: str
    key_id: str
    def __init__(self, region: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class RekeyRegionKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RekeyRegionKeyResponse(_message.Message):
    __slots__ = ("region", "key_id", "kem")
    REGION_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEM_FIELD_NUMBER: _ClassVar[int]
    region: str
    key_id: str
    kem: str
    def __init__(self, region: _Optional[str] = ..., key_id: _Optional[str] = ..., kem: _Optional[str] = ...) -> None: ...

class ExplainTransferRequest(_message.Message):
    __slots__ = ("user_id", "to", "purpose")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    to: str
    purpose: str
    def __init__(self, user_id: _Optional[str] = ..., to: _Optional[str] = ..., purpose: _Optional[str] = ...) -> None: ...

class FieldDecision(_message.Message):
    __slots__ = ("field", "category", "transferred", "rule", "legal_basis", "recipient", "reason", "detail", "form")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TRANSFERRED_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    LEGAL_BASIS_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    field: str
    category: str
    transferred: bool
    rule: str
    legal_basis: str
    recipient: str
    reason: str
    detail: str
    form: str
    def __init__(self, field: _Optional[str] = ..., category: _Optional[str] = ..., transferred: _Optional[bool] = ..., rule: _Optional[str] = ..., legal_basis: _Optional[str] = ..., recipient: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., form: _Optional[str] = ...) -> None: ...

class ExplainTransferResponse(_message.Message):
    __slots__ = ("user_id", "to", "purpose", "rules_version", "fields")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    to: str
    purpose: str
    rules_version: str
    fields: _containers.RepeatedCompositeFieldContainer[FieldDecision]
    def __init__(self, user_id: _Optional[str] = ..., to: _Optional[str] = ..., purpose: _Optional[str] = ..., rules_version: _Optional[str] = ..., fields: _Optional[_Iterable[_Union[FieldDecision, _Mapping]]] = ...) -> None: ...

class ApplyRulesRequest(_message.Message):
    __slots__ = ("rules_yaml",)
    RULES_YAML_FIELD_NUMBER: _ClassVar[int]
    rules_yaml: str
    def __init__(self, rules_yaml: _Optional[str] = ...) -> None: ...

class ApplyRulesResponse(_message.Message):
    __slots__ = ("previous_version", "version", "records_to_reproject")
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_TO_REPROJECT_FIELD_NUMBER: _ClassVar[int]
    previous_version: str
    version: str
    records_to_reproject: int
    def __init__(self, previous_version: _Optional[str] = ..., version: _Optional[str] = ..., records_to_reproject: _Optional[int] = ...) -> None: ...

class GetNodeStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetNodeStatusResponse(_message.Message):
    __slots__ = ("region", "role", "records", "tombstones", "log_entries", "rules_version", "field_counts", "rules_backfill_done", "rules_backfill_total", "certificate_expires", "key_version", "region_key_id", "ready", "not_ready_because", "index_key_version", "index_rebuild_version", "index_rebuild_done", "index_rebuild_total")
    class FieldCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    REGION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    LOG_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    FIELD_COUNTS_FIELD_NUMBER: _ClassVar[int]
    RULES_BACKFILL_DONE_FIELD_NUMBER: _ClassVar[int]
    RULES_BACKFILL_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REGION_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    NOT_READY_BECAUSE_FIELD_NUMBER: _ClassVar[int]
    INDEX_KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_REBUILD_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_REBUILD_DONE_FIELD_NUMBER: _ClassVar[int]
    INDEX_REBUILD_TOTAL_FIELD_NUMBER: _ClassVar[int]
    region: str
    role: str
    records: int
    tombstones: int
    log_entries: int
    rules_version: str
    field_counts: _containers.ScalarMap[str, int]
    rules_backfill_done: int
    rules_backfill_total: int
    certificate_expires: _timestamp_pb2.Timestamp
    key_version: str
    region_key_id: str
    ready: bool
    not_ready_because: _containers.RepeatedScalarFieldContainer[str]
    index_key_version: int
    index_rebuild_version: int
    index_rebuild_done: int
    index_rebuild_total: int
    def __init__(self, region: _Optional[str] = ..., role: _Optional[str] = ..., records: _Optional[int] = ..., tombstones: _Optional[int] = ..., log_entries: _Optional[int] = ..., rules_version: _Optional[str] = ..., field_counts: _Optional[_Mapping[str, int]] = ..., rules_backfill_done: _Optional[int] = ..., rules_backfill_total: _Optional[int] = ..., certificate_expires: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_version: _Optional[str] = ..., region_key_id: _Optional[str] = ..., ready: _Optional[bool] = ..., not_ready_because: _Optional[_Iterable[str]] = ..., index_key_version: _Optional[int] = ..., index_rebuild_version: _Optional[int] = ..., index_rebuild_done: _Optional[int] = ..., index_rebuild_total: _Optional[int] = ...) -> None: ...

class ReplicationStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DestinationStatus(_message.Message):
    __slots__ = ("region", "address", "applied_sequence", "pending", "lag_seconds", "last_error", "copies_sent", "paused", "dead_lettered", "lease_owner", "sink", "max_rate", "key_state")
    REGION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    COPIES_SENT_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    LEASE_OWNER_FIELD_NUMBER: _ClassVar[int]
    SINK_FIELD_NUMBER: _ClassVar[int]
    MAX_RATE_FIELD_NUMBER: _ClassVar[int]
    KEY_STATE_FIELD_NUMBER: _ClassVar[int]
    region: str
    address: str
    applied_sequence: int
    pending: int
    lag_seconds: float
    last_error: str
    copies_sent: int
    paused: bool
    dead_lettered: int
    lease_owner: str
    sink: str
    max_rate: float
    key_state: str
    def __init__(self, region: _Optional[str] = ..., address: _Optional[str] = ..., applied_sequence: _Optional[int] = ..., pending: _Optional[int] = ..., lag_seconds: _Optional[float] = ..., last_error: _Optional[str] = ..., copies_sent: _Optional[int] = ..., paused: _Optional[bool] = ..., dead_lettered: _Optional[int] = ..., lease_owner: _Optional[str] = ..., sink: _Optional[str] = ..., max_rate: _Optional[float] = ..., key_state: _Optional[str] = ...) -> None: ...

class ReplicationStatusResponse(_message.Message):
    __slots__ = ("head_sequence", "destinations")
    HEAD_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATIONS_FIELD_NUMBER: _ClassVar[int]
    head_sequence: int
    destinations: _containers.RepeatedCompositeFieldContainer[DestinationStatus]
    def __init__(self, head_sequence: _Optional[int] = ..., destinations: _Optional[_Iterable[_Union[DestinationStatus, _Mapping]]] = ...) -> None: ...

class PauseReplicationRequest(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    def __init__(self, region: _Optional[str] = ...) -> None: ...

class PauseReplicationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeReplicationRequest(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    def __init__(self, region: _Optional[str] = ...) -> None: ...

class ResumeReplicationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RetryDeadLettersRequest(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    def __init__(self, region: _Optional[str] = ...) -> None: ...

class RetryDeadLettersResponse(_message.Message):
    __slots__ = ("marked",)
    MARKED_FIELD_NUMBER: _ClassVar[int]
    marked: int
    def __init__(self, marked: _Optional[int] = ...) -> None: ...
