import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TailEntriesRequest(_message.Message):
    __slots__ = ("after_sequence", "limit")
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after_sequence: int
    limit: int
    def __init__(self, after_sequence: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class TailEntriesResponse(_message.Message):
    __slots__ = ("sequence", "entry_json", "chain_hash", "leaf_hash")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_JSON_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    entry_json: str
    chain_hash: bytes
    leaf_hash: bytes
    def __init__(self, sequence: _Optional[int] = ..., entry_json: _Optional[str] = ..., chain_hash: _Optional[bytes] = ..., leaf_hash: _Optional[bytes] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("sequence", "leaf_index", "entry_json", "leaf_hash")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    ENTRY_JSON_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    leaf_index: int
    entry_json: str
    leaf_hash: bytes
    def __init__(self, sequence: _Optional[int] = ..., leaf_index: _Optional[int] = ..., entry_json: _Optional[str] = ..., leaf_hash: _Optional[bytes] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("subject", "region", "recipient", "kind", "purpose", "legal_basis", "outcome", "since", "until", "page_size", "limit", "page_token")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    LEGAL_BASIS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    subject: str
    region: str
    recipient: str
    kind: str
    purpose: str
    legal_basis: str
    outcome: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    page_size: int
    limit: int
    page_token: str
    def __init__(self, subject: _Optional[str] = ..., region: _Optional[str] = ..., recipient: _Optional[str] = ..., kind: _Optional[str] = ..., purpose: _Optional[str] = ..., legal_basis: _Optional[str] = ..., outcome: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetCheckpointRequest(_message.Message):
    __slots__ = ("refresh",)
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    refresh: bool
    def __init__(self, refresh: _Optional[bool] = ...) -> None: ...

class GetCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint", "tree_size", "root_hash", "verifier_key")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROOT_HASH_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_KEY_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    tree_size: int
    root_hash: bytes
    verifier_key: str
    def __init__(self, checkpoint: _Optional[str] = ..., tree_size: _Optional[int] = ..., root_hash: _Optional[bytes] = ..., verifier_key: _Optional[str] = ...) -> None: ...

class ProveInclusionRequest(_message.Message):
    __slots__ = ("leaf_index", "tree_size")
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    leaf_index: int
    tree_size: int
    def __init__(self, leaf_index: _Optional[int] = ..., tree_size: _Optional[int] = ...) -> None: ...

class ProveInclusionResponse(_message.Message):
    __slots__ = ("leaf_index", "tree_size", "hashes", "leaf_hash", "root_hash")
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    ROOT_HASH_FIELD_NUMBER: _ClassVar[int]
    leaf_index: int
    tree_size: int
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    leaf_hash: bytes
    root_hash: bytes
    def __init__(self, leaf_index: _Optional[int] = ..., tree_size: _Optional[int] = ..., hashes: _Optional[_Iterable[bytes]] = ..., leaf_hash: _Optional[bytes] = ..., root_hash: _Optional[bytes] = ...) -> None: ...

class ProveConsistencyRequest(_message.Message):
    __slots__ = ("from_size", "tree_size")
    FROM_SIZE_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    from_size: int
    tree_size: int
    def __init__(self, from_size: _Optional[int] = ..., tree_size: _Optional[int] = ...) -> None: ...

class ProveConsistencyResponse(_message.Message):
    __slots__ = ("from_size", "tree_size", "hashes")
    FROM_SIZE_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    from_size: int
    tree_size: int
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, from_size: _Optional[int] = ..., tree_size: _Optional[int] = ..., hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SubjectReportRequest(_message.Message):
    __slots__ = ("subject",)
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    subject: str
    def __init__(self, subject: _Optional[str] = ...) -> None: ...

class SubjectReportResponse(_message.Message):
    __slots__ = ("subject", "entries", "recipients", "checkpoint")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    subject: str
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    recipients: _containers.RepeatedCompositeFieldContainer[Recipient]
    checkpoint: GetCheckpointResponse
    def __init__(self, subject: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ..., recipients: _Optional[_Iterable[_Union[Recipient, _Mapping]]] = ..., checkpoint: _Optional[_Union[GetCheckpointResponse, _Mapping]] = ...) -> None: ...

class Recipient(_message.Message):
    __slots__ = ("id", "region", "company", "contact", "country")
    ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    COMPANY_FIELD_NUMBER: _ClassVar[int]
    CONTACT_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    id: str
    region: str
    company: str
    contact: str
    country: str
    def __init__(self, id: _Optional[str] = ..., region: _Optional[str] = ..., company: _Optional[str] = ..., contact: _Optional[str] = ..., country: _Optional[str] = ...) -> None: ...

class GetReviewContextRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetReviewContextResponse(_message.Message):
    __slots__ = ("region", "recipients", "sensitive_fields", "rules_version", "home_region")
    REGION_FIELD_NUMBER: _ClassVar[int]
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    SENSITIVE_FIELDS_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOME_REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    recipients: _containers.RepeatedCompositeFieldContainer[Recipient]
    sensitive_fields: _containers.RepeatedScalarFieldContainer[str]
    rules_version: str
    home_region: str
    def __init__(self, region: _Optional[str] = ..., recipients: _Optional[_Iterable[_Union[Recipient, _Mapping]]] = ..., sensitive_fields: _Optional[_Iterable[str]] = ..., rules_version: _Optional[str] = ..., home_region: _Optional[str] = ...) -> None: ...
