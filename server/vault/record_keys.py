"""The data keys a node's records open and seal under: cached in the keyring's memory, read
from the keyring (`keys.db`, or the shared store's) when not, and read again when another
process replaced the one cached."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from residency.server.core.sealing import DataKey, SealError
from residency.server.keys.keyring import Keyring
from residency.server.storage.keyring import KeyStore

T = TypeVar("T")


class RecordKeys:
    """Users' data keys, for `Records`."""

    region: str
    keyring: Keyring
    store: KeyStore

    def _data_key(self, user_id: str) -> DataKey:
        """The user's DEK, from the cache or the keyring: the primary's under one of its
        wrapping keys; a region's as the primary sent it, or rewrapped by a rotation. A cached
        one too is refused while the keyring is shredded or suspended."""
        self.keyring.check()
        dek = self.keyring.data_keys.get(user_id)
        if dek is None:
            found = self.store.data_keys([user_id]).get(user_id)
            if found is None:
                raise SealError(
                    f"the data key of user {user_id} is not in the keyring of {self.region}: "
                    "the record was erased (its key crypto-shredded) or the keyring is not this data's"
                )
            dek = self.keyring.open_stored_key(user_id, *found)
            self.keyring.data_keys.put(user_id, dek)
        return dek

    def _opened_by(self, user_id: str, open_: Callable[[DataKey], T]) -> tuple[DataKey, T]:
        """`open_` under the user's DEK; if it does not open under the cached one, under the
        keyring's, once more: another process replaced the key since this one cached it (an
        erased user written again, which a standalone worker on SQLite hears nothing of; at a
        region, a copy applied under a new key through another front end)."""
        dek = self._data_key(user_id)
        try:
            return dek, open_(dek)
        except SealError:
            self.keyring.data_keys.drop(user_id)
            dek = self._data_key(user_id)
            return dek, open_(dek)

    def warm_keys(self, user_ids: list[str]) -> None:
        """Loads the DEKs of `user_ids` that are not cached with one query, so that opening
        a batch of records (a worker after a restart, a standalone worker) does not query the
        keyring once per record. A missing key is left for `_data_key` to report."""
        missing = [u for u in user_ids if self.keyring.data_keys.get(u) is None]
        if missing:
            self.keyring.check()
            for user_id, found in self.store.data_keys(missing).items():
                self.keyring.data_keys.put(user_id, self.keyring.open_stored_key(user_id, *found))
