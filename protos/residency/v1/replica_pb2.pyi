import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SealedCopy(_message.Message):
    __slots__ = ("user_id", "version", "deleted", "key_id", "wrapped_data_key", "sealed_fields", "source", "home_region", "categories", "created_at", "updated_at", "rules_version", "reason", "transit_key_id", "wrapped_transit_key", "signature", "format", "region", "signing_key_id", "policies")
    class SealedFieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class CategoriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class PoliciesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FieldPolicy
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FieldPolicy, _Mapping]] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_DATA_KEY_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    HOME_REGION_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TRANSIT_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_TRANSIT_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    SIGNING_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    version: int
    deleted: bool
    key_id: str
    wrapped_data_key: bytes
    sealed_fields: _containers.ScalarMap[str, bytes]
    source: str
    home_region: str
    categories: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    rules_version: str
    reason: str
    transit_key_id: str
    wrapped_transit_key: bytes
    signature: bytes
    format: int
    region: str
    signing_key_id: str
    policies: _containers.MessageMap[str, FieldPolicy]
    def __init__(self, user_id: _Optional[str] = ..., version: _Optional[int] = ..., deleted: _Optional[bool] = ..., key_id: _Optional[str] = ..., wrapped_data_key: _Optional[bytes] = ..., sealed_fields: _Optional[_Mapping[str, bytes]] = ..., source: _Optional[str] = ..., home_region: _Optional[str] = ..., categories: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rules_version: _Optional[str] = ..., reason: _Optional[str] = ..., transit_key_id: _Optional[str] = ..., wrapped_transit_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., format: _Optional[int] = ..., region: _Optional[str] = ..., signing_key_id: _Optional[str] = ..., policies: _Optional[_Mapping[str, FieldPolicy]] = ...) -> None: ...

class HighWater(_message.Message):
    __slots__ = ("home_region", "region", "version", "issued_at", "signing_key_id", "signature", "lease_epoch", "copy_digests", "copy_hashes")
    HOME_REGION_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    SIGNING_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    COPY_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    COPY_HASHES_FIELD_NUMBER: _ClassVar[int]
    home_region: str
    region: str
    version: int
    issued_at: _timestamp_pb2.Timestamp
    signing_key_id: str
    signature: bytes
    lease_epoch: int
    copy_digests: _containers.RepeatedScalarFieldContainer[bytes]
    copy_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, home_region: _Optional[str] = ..., region: _Optional[str] = ..., version: _Optional[int] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., signing_key_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., lease_epoch: _Optional[int] = ..., copy_digests: _Optional[_Iterable[bytes]] = ..., copy_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FieldPolicy(_message.Message):
    __slots__ = ("rule", "purposes", "legal_basis", "recipient", "grant", "retention_days", "ends_at", "form")
    RULE_FIELD_NUMBER: _ClassVar[int]
    PURPOSES_FIELD_NUMBER: _ClassVar[int]
    LEGAL_BASIS_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    RETENTION_DAYS_FIELD_NUMBER: _ClassVar[int]
    ENDS_AT_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    rule: str
    purposes: _containers.RepeatedScalarFieldContainer[str]
    legal_basis: str
    recipient: str
    grant: bool
    retention_days: int
    ends_at: _timestamp_pb2.Timestamp
    form: str
    def __init__(self, rule: _Optional[str] = ..., purposes: _Optional[_Iterable[str]] = ..., legal_basis: _Optional[str] = ..., recipient: _Optional[str] = ..., grant: _Optional[bool] = ..., retention_days: _Optional[int] = ..., ends_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., form: _Optional[str] = ...) -> None: ...

class ApplyCopiesRequest(_message.Message):
    __slots__ = ("source_region", "copies", "high_water")
    SOURCE_REGION_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATER_FIELD_NUMBER: _ClassVar[int]
    source_region: str
    copies: _containers.RepeatedCompositeFieldContainer[SealedCopy]
    high_water: HighWater
    def __init__(self, source_region: _Optional[str] = ..., copies: _Optional[_Iterable[_Union[SealedCopy, _Mapping]]] = ..., high_water: _Optional[_Union[HighWater, _Mapping]] = ...) -> None: ...

class ApplyCopiesWire(_message.Message):
    __slots__ = ("source_region", "copies", "high_water")
    SOURCE_REGION_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATER_FIELD_NUMBER: _ClassVar[int]
    source_region: str
    copies: _containers.RepeatedScalarFieldContainer[bytes]
    high_water: HighWater
    def __init__(self, source_region: _Optional[str] = ..., copies: _Optional[_Iterable[bytes]] = ..., high_water: _Optional[_Union[HighWater, _Mapping]] = ...) -> None: ...

class ApplyCopiesResponse(_message.Message):
    __slots__ = ("applied", "skipped")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    applied: int
    skipped: int
    def __init__(self, applied: _Optional[int] = ..., skipped: _Optional[int] = ...) -> None: ...

class GetRegionKeyRequest(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class GetRegionKeyResponse(_message.Message):
    __slots__ = ("statement", "signature", "certificate")
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    statement: bytes
    signature: bytes
    certificate: bytes
    def __init__(self, statement: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate: _Optional[bytes] = ...) -> None: ...

class RegionKeyStatement(_message.Message):
    __slots__ = ("region", "key_id", "kem", "public_key", "issued_at", "shredded", "nonce")
    REGION_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEM_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    SHREDDED_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    region: str
    key_id: str
    kem: str
    public_key: bytes
    issued_at: _timestamp_pb2.Timestamp
    shredded: str
    nonce: bytes
    def __init__(self, region: _Optional[str] = ..., key_id: _Optional[str] = ..., kem: _Optional[str] = ..., public_key: _Optional[bytes] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., shredded: _Optional[str] = ..., nonce: _Optional[bytes] = ...) -> None: ...
