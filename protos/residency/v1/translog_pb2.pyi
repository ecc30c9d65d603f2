from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TailEntriesRequest(_message.Message):
    __slots__ = ("after_sequence", "limit")
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after_sequence: int
    limit: int
    def __init__(self, after_sequence: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class TailEntriesResponse(_message.Message):
    __slots__ = ("sequence", "entry_json", "chain_hash")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_JSON_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    entry_json: str
    chain_hash: bytes
    def __init__(self, sequence: _Optional[int] = ..., entry_json: _Optional[str] = ..., chain_hash: _Optional[bytes] = ...) -> None: ...
