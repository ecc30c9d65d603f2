import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from residency.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DisclosureGround(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISCLOSURE_GROUND_UNSPECIFIED: _ClassVar[DisclosureGround]
    DISCLOSURE_GROUND_CONSENT: _ClassVar[DisclosureGround]
    DISCLOSURE_GROUND_REQUESTED_SERVICE: _ClassVar[DisclosureGround]
    DISCLOSURE_GROUND_JUDICIAL_OR_ADMINISTRATIVE_REQUEST: _ClassVar[DisclosureGround]
    DISCLOSURE_GROUND_VIOLATION_OF_LAW_OR_AGREEMENT: _ClassVar[DisclosureGround]
    DISCLOSURE_GROUND_IP_COMPLAINT: _ClassVar[DisclosureGround]
    DISCLOSURE_GROUND_TRANSACTION_DISPUTE: _ClassVar[DisclosureGround]
    DISCLOSURE_GROUND_OTHER_LEGAL_BASIS: _ClassVar[DisclosureGround]

class DisclosureState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISCLOSURE_STATE_UNSPECIFIED: _ClassVar[DisclosureState]
    DISCLOSURE_STATE_REQUESTED: _ClassVar[DisclosureState]
    DISCLOSURE_STATE_APPROVED: _ClassVar[DisclosureState]
    DISCLOSURE_STATE_DENIED: _ClassVar[DisclosureState]
    DISCLOSURE_STATE_RELEASED: _ClassVar[DisclosureState]
    DISCLOSURE_STATE_EXPIRED: _ClassVar[DisclosureState]
DISCLOSURE_GROUND_UNSPECIFIED: DisclosureGround
DISCLOSURE_GROUND_CONSENT: DisclosureGround
DISCLOSURE_GROUND_REQUESTED_SERVICE: DisclosureGround
DISCLOSURE_GROUND_JUDICIAL_OR_ADMINISTRATIVE_REQUEST: DisclosureGround
DISCLOSURE_GROUND_VIOLATION_OF_LAW_OR_AGREEMENT: DisclosureGround
DISCLOSURE_GROUND_IP_COMPLAINT: DisclosureGround
DISCLOSURE_GROUND_TRANSACTION_DISPUTE: DisclosureGround
DISCLOSURE_GROUND_OTHER_LEGAL_BASIS: DisclosureGround
DISCLOSURE_STATE_UNSPECIFIED: DisclosureState
DISCLOSURE_STATE_REQUESTED: DisclosureState
DISCLOSURE_STATE_APPROVED: DisclosureState
DISCLOSURE_STATE_DENIED: DisclosureState
DISCLOSURE_STATE_RELEASED: DisclosureState
DISCLOSURE_STATE_EXPIRED: DisclosureState

class DiscloseRequest(_message.Message):
    __slots__ = ("context", "user_id", "third_party", "ground", "fields", "reference", "approver", "provision", "service", "destination_country")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    THIRD_PARTY_FIELD_NUMBER: _ClassVar[int]
    GROUND_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    PROVISION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_COUNTRY_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.CallContext
    user_id: str
    third_party: str
    ground: DisclosureGround
    fields: _containers.RepeatedScalarFieldContainer[str]
    reference: str
    approver: str
    provision: str
    service: str
    destination_country: str
    def __init__(self, context: _Optional[_Union[_common_pb2.CallContext, _Mapping]] = ..., user_id: _Optional[str] = ..., third_party: _Optional[str] = ..., ground: _Optional[_Union[DisclosureGround, str]] = ..., fields: _Optional[_Iterable[str]] = ..., reference: _Optional[str] = ..., approver: _Optional[str] = ..., provision: _Optional[str] = ..., service: _Optional[str] = ..., destination_country: _Optional[str] = ...) -> None: ...

class DiscloseResponse(_message.Message):
    __slots__ = ("fields", "withheld", "log_sequence")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Value, _Mapping]] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_FIELD_NUMBER: _ClassVar[int]
    LOG_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.MessageMap[str, _common_pb2.Value]
    withheld: _containers.RepeatedCompositeFieldContainer[_common_pb2.WithheldField]
    log_sequence: int
    def __init__(self, fields: _Optional[_Mapping[str, _common_pb2.Value]] = ..., withheld: _Optional[_Iterable[_Union[_common_pb2.WithheldField, _Mapping]]] = ..., log_sequence: _Optional[int] = ...) -> None: ...

class RequestDisclosureRequest(_message.Message):
    __slots__ = ("context", "user_id", "third_party", "ground", "fields", "reference", "provision", "service", "destination_country")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    THIRD_PARTY_FIELD_NUMBER: _ClassVar[int]
    GROUND_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PROVISION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_COUNTRY_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.CallContext
    user_id: str
    third_party: str
    ground: DisclosureGround
    fields: _containers.RepeatedScalarFieldContainer[str]
    reference: str
    provision: str
    service: str
    destination_country: str
    def __init__(self, context: _Optional[_Union[_common_pb2.CallContext, _Mapping]] = ..., user_id: _Optional[str] = ..., third_party: _Optional[str] = ..., ground: _Optional[_Union[DisclosureGround, str]] = ..., fields: _Optional[_Iterable[str]] = ..., reference: _Optional[str] = ..., provision: _Optional[str] = ..., service: _Optional[str] = ..., destination_country: _Optional[str] = ...) -> None: ...

class RequestDisclosureResponse(_message.Message):
    __slots__ = ("id", "expires_at", "log_sequence")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LOG_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    expires_at: _timestamp_pb2.Timestamp
    log_sequence: int
    def __init__(self, id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., log_sequence: _Optional[int] = ...) -> None: ...

class ApproveDisclosureRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ApproveDisclosureResponse(_message.Message):
    __slots__ = ("log_sequence",)
    LOG_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    log_sequence: int
    def __init__(self, log_sequence: _Optional[int] = ...) -> None: ...

class DenyDisclosureRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DenyDisclosureResponse(_message.Message):
    __slots__ = ("log_sequence",)
    LOG_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    log_sequence: int
    def __init__(self, log_sequence: _Optional[int] = ...) -> None: ...

class ReleaseDisclosureRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ReleaseDisclosureResponse(_message.Message):
    __slots__ = ("fields", "withheld", "log_sequence", "disclosure")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Value, _Mapping]] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_FIELD_NUMBER: _ClassVar[int]
    LOG_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DISCLOSURE_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.MessageMap[str, _common_pb2.Value]
    withheld: _containers.RepeatedCompositeFieldContainer[_common_pb2.WithheldField]
    log_sequence: int
    disclosure: Disclosure
    def __init__(self, fields: _Optional[_Mapping[str, _common_pb2.Value]] = ..., withheld: _Optional[_Iterable[_Union[_common_pb2.WithheldField, _Mapping]]] = ..., log_sequence: _Optional[int] = ..., disclosure: _Optional[_Union[Disclosure, _Mapping]] = ...) -> None: ...

class ListDisclosuresRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: DisclosureState
    def __init__(self, state: _Optional[_Union[DisclosureState, str]] = ...) -> None: ...

class ListDisclosuresResponse(_message.Message):
    __slots__ = ("disclosures",)
    DISCLOSURES_FIELD_NUMBER: _ClassVar[int]
    disclosures: _containers.RepeatedCompositeFieldContainer[Disclosure]
    def __init__(self, disclosures: _Optional[_Iterable[_Union[Disclosure, _Mapping]]] = ...) -> None: ...

class Disclosure(_message.Message):
    __slots__ = ("id", "user_id", "third_party", "destination_country", "ground", "fields", "reference", "provision", "service", "purpose", "state", "requester", "decided_by", "decision_reason", "requested_at", "expires_at", "decided_at", "released_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    THIRD_PARTY_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_COUNTRY_FIELD_NUMBER: _ClassVar[int]
    GROUND_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PROVISION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    RELEASED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    user_id: str
    third_party: str
    destination_country: str
    ground: DisclosureGround
    fields: _containers.RepeatedScalarFieldContainer[str]
    reference: str
    provision: str
    service: str
    purpose: str
    state: DisclosureState
    requester: str
    decided_by: str
    decision_reason: str
    requested_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    decided_at: _timestamp_pb2.Timestamp
    released_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., user_id: _Optional[str] = ..., third_party: _Optional[str] = ..., destination_country: _Optional[str] = ..., ground: _Optional[_Union[DisclosureGround, str]] = ..., fields: _Optional[_Iterable[str]] = ..., reference: _Optional[str] = ..., provision: _Optional[str] = ..., service: _Optional[str] = ..., purpose: _Optional[str] = ..., state: _Optional[_Union[DisclosureState, str]] = ..., requester: _Optional[str] = ..., decided_by: _Optional[str] = ..., decision_reason: _Optional[str] = ..., requested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., released_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
