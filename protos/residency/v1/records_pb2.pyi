import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from residency.v1 import common_pb2 as _common_pb2
from residency.v1 import consent_pb2 as _consent_pb2
from residency.v1 import disclosure_pb2 as _disclosure_pb2
from residency.v1 import translog_pb2 as _translog_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Record(_message.Message):
    __slots__ = ("user_id", "version", "source", "fields", "home_region", "created_at", "updated_at")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Value, _Mapping]] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    HOME_REGION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    version: int
    source: str
    fields: _containers.MessageMap[str, _common_pb2.Value]
    home_region: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., version: _Optional[int] = ..., source: _Optional[str] = ..., fields: _Optional[_Mapping[str, _common_pb2.Value]] = ..., home_region: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PutRecordRequest(_message.Message):
    __slots__ = ("context", "record")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.CallContext
    record: Record
    def __init__(self, context: _Optional[_Union[_common_pb2.CallContext, _Mapping]] = ..., record: _Optional[_Union[Record, _Mapping]] = ...) -> None: ...

class PutRecordResponse(_message.Message):
    __slots__ = ("user_id", "version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    version: int
    def __init__(self, user_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PutRecordsRequest(_message.Message):
    __slots__ = ("context", "records")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.CallContext
    records: _containers.RepeatedCompositeFieldContainer[Record]
    def __init__(self, context: _Optional[_Union[_common_pb2.CallContext, _Mapping]] = ..., records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ...) -> None: ...

class PutRecordsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PutRecordResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[PutRecordResponse, _Mapping]]] = ...) -> None: ...

class GetRecordRequest(_message.Message):
    __slots__ = ("context", "user_id")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.CallContext
    user_id: str
    def __init__(self, context: _Optional[_Union[_common_pb2.CallContext, _Mapping]] = ..., user_id: _Optional[str] = ...) -> None: ...

class GetRecordResponse(_message.Message):
    __slots__ = ("record", "withheld", "log_sequence", "forms")
    class FormsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RECORD_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_FIELD_NUMBER: _ClassVar[int]
    LOG_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FORMS_FIELD_NUMBER: _ClassVar[int]
    record: Record
    withheld: _containers.RepeatedCompositeFieldContainer[_common_pb2.WithheldField]
    log_sequence: int
    forms: _containers.ScalarMap[str, str]
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ..., withheld: _Optional[_Iterable[_Union[_common_pb2.WithheldField, _Mapping]]] = ..., log_sequence: _Optional[int] = ..., forms: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DeleteRecordRequest(_message.Message):
    __slots__ = ("context", "user_id")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.CallContext
    user_id: str
    def __init__(self, context: _Optional[_Union[_common_pb2.CallContext, _Mapping]] = ..., user_id: _Optional[str] = ...) -> None: ...

class DeleteRecordResponse(_message.Message):
    __slots__ = ("user_id", "version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    version: int
    def __init__(self, user_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class VerifyCredentialRequest(_message.Message):
    __slots__ = ("context", "user_id", "field", "secret")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.CallContext
    user_id: str
    field: str
    secret: str
    def __init__(self, context: _Optional[_Union[_common_pb2.CallContext, _Mapping]] = ..., user_id: _Optional[str] = ..., field: _Optional[str] = ..., secret: _Optional[str] = ...) -> None: ...

class VerifyCredentialResponse(_message.Message):
    __slots__ = ("match",)
    MATCH_FIELD_NUMBER: _ClassVar[int]
    match: bool
    def __init__(self, match: _Optional[bool] = ...) -> None: ...

class ExportSubjectRequest(_message.Message):
    __slots__ = ("context", "user_id")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.CallContext
    user_id: str
    def __init__(self, context: _Optional[_Union[_common_pb2.CallContext, _Mapping]] = ..., user_id: _Optional[str] = ...) -> None: ...

class ExportSubjectResponse(_message.Message):
    __slots__ = ("record", "withheld", "consents", "disclosures", "entries", "proofs", "checkpoint", "recipients", "rules", "log_sequence", "rules_version")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_FIELD_NUMBER: _ClassVar[int]
    CONSENTS_FIELD_NUMBER: _ClassVar[int]
    DISCLOSURES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PROOFS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    LOG_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    record: Record
    withheld: _containers.RepeatedCompositeFieldContainer[_common_pb2.WithheldField]
    consents: _containers.RepeatedCompositeFieldContainer[_consent_pb2.Consent]
    disclosures: _containers.RepeatedCompositeFieldContainer[_disclosure_pb2.Disclosure]
    entries: _containers.RepeatedCompositeFieldContainer[_translog_pb2.LogEntry]
    proofs: _containers.RepeatedCompositeFieldContainer[_translog_pb2.ProveInclusionResponse]
    checkpoint: _translog_pb2.GetCheckpointResponse
    recipients: _containers.RepeatedCompositeFieldContainer[_translog_pb2.Recipient]
    rules: _containers.RepeatedCompositeFieldContainer[ExportedRule]
    log_sequence: int
    rules_version: str
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ..., withheld: _Optional[_Iterable[_Union[_common_pb2.WithheldField, _Mapping]]] = ..., consents: _Optional[_Iterable[_Union[_consent_pb2.Consent, _Mapping]]] = ..., disclosures: _Optional[_Iterable[_Union[_disclosure_pb2.Disclosure, _Mapping]]] = ..., entries: _Optional[_Iterable[_Union[_translog_pb2.LogEntry, _Mapping]]] = ..., proofs: _Optional[_Iterable[_Union[_translog_pb2.ProveInclusionResponse, _Mapping]]] = ..., checkpoint: _Optional[_Union[_translog_pb2.GetCheckpointResponse, _Mapping]] = ..., recipients: _Optional[_Iterable[_Union[_translog_pb2.Recipient, _Mapping]]] = ..., rules: _Optional[_Iterable[_Union[ExportedRule, _Mapping]]] = ..., log_sequence: _Optional[int] = ..., rules_version: _Optional[str] = ...) -> None: ...

class ExportedRule(_message.Message):
    __slots__ = ("id", "recipient", "purposes", "legal_basis", "categories", "retention_days", "safeguards")
    ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    PURPOSES_FIELD_NUMBER: _ClassVar[int]
    LEGAL_BASIS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    RETENTION_DAYS_FIELD_NUMBER: _ClassVar[int]
    SAFEGUARDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    recipient: str
    purposes: _containers.RepeatedScalarFieldContainer[str]
    legal_basis: str
    categories: _containers.RepeatedScalarFieldContainer[str]
    retention_days: int
    safeguards: _containers.RepeatedCompositeFieldContainer[Safeguard]
    def __init__(self, id: _Optional[str] = ..., recipient: _Optional[str] = ..., purposes: _Optional[_Iterable[str]] = ..., legal_basis: _Optional[str] = ..., categories: _Optional[_Iterable[str]] = ..., retention_days: _Optional[int] = ..., safeguards: _Optional[_Iterable[_Union[Safeguard, _Mapping]]] = ...) -> None: ...

class Safeguard(_message.Message):
    __slots__ = ("kind", "reference")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    reference: str
    def __init__(self, kind: _Optional[str] = ..., reference: _Optional[str] = ...) -> None: ...

class FindRecordsRequest(_message.Message):
    __slots__ = ("context", "field", "value", "limit", "page_token")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.CallContext
    field: str
    value: str
    limit: int
    page_token: str
    def __init__(self, context: _Optional[_Union[_common_pb2.CallContext, _Mapping]] = ..., field: _Optional[str] = ..., value: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class FindRecordsResponse(_message.Message):
    __slots__ = ("results", "next_page_token")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GetRecordResponse]
    next_page_token: str
    def __init__(self, results: _Optional[_Iterable[_Union[GetRecordResponse, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
