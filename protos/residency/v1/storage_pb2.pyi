import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StoredRecord(_message.Message):
    __slots__ = ("user_id", "version", "deleted", "source", "home_region", "created_at", "updated_at", "key_id", "wrapped_data_key", "sealed_fields")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    HOME_REGION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_DATA_KEY_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    version: int
    deleted: bool
    source: str
    home_region: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    key_id: str
    wrapped_data_key: bytes
    sealed_fields: bytes
    def __init__(self, user_id: _Optional[str] = ..., version: _Optional[int] = ..., deleted: _Optional[bool] = ..., source: _Optional[str] = ..., home_region: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_id: _Optional[str] = ..., wrapped_data_key: _Optional[bytes] = ..., sealed_fields: _Optional[bytes] = ...) -> None: ...
