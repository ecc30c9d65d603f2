"""The bounded cache of opened keys (data, wrapping and transit keys), so that wrapping or
unwrapping is not paid on every field."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any


class KeyCache:
    """Bounded by size and age: the least recently used entry goes first."""

    def __init__(self, max_entries: int = 100_000, max_age: float = 600.0):
        self._items: OrderedDict[object, tuple[float, Any]] = OrderedDict()
        self.max_entries = max_entries
        self.max_age = max_age

    def get(self, key: object) -> Any:
        hit = self._items.get(key)
        if hit is None:
            return None
        born, value = hit
        if time.monotonic() - born > self.max_age:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: object, value: object) -> None:
        self._items[key] = (time.monotonic(), value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def drop(self, key: object) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()
