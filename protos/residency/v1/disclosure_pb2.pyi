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
DISCLOSURE_GROUND_UNSPECIFIED: DisclosureGround
DISCLOSURE_GROUND_CONSENT: DisclosureGround
DISCLOSURE_GROUND_REQUESTED_SERVICE: DisclosureGround
DISCLOSURE_GROUND_JUDICIAL_OR_ADMINISTRATIVE_REQUEST: DisclosureGround
DISCLOSURE_GROUND_VIOLATION_OF_LAW_OR_AGREEMENT: DisclosureGround
DISCLOSURE_GROUND_IP_COMPLAINT: DisclosureGround
DISCLOSURE_GROUND_TRANSACTION_DISPUTE: DisclosureGround
DISCLOSURE_GROUND_OTHER_LEGAL_BASIS: DisclosureGround

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
