"""New users' data keys, made and committed to the keyring before the records sealed under
them (the first step of a write; `residency.server.storage.database` says why)."""

from __future__ import annotations

from typing import Protocol

from residency.server.core.sealing import DataKey
from residency.server.keys.keyring import Keyring
from residency.server.storage.keyring import KeyStore, WrappingKeysRenewed
from residency.server.storage.records import RecordStore
from residency.server.storage.thread import Unprepared


class NewKeysStore(RecordStore, KeyStore, Protocol):
    """Which users have a live record; the keyring the new keys go to."""


class NewKeys:
    """The keys `prepare` committed for one batch, for `put` to seal under."""

    def __init__(self, keyring: Keyring, store: NewKeysStore):
        self.keyring = keyring
        self.store = store
        # user -> (key, wrapping key id); and why a key could not be made (key service down).
        self._made: dict[str, tuple[DataKey, str]] = {}
        self._unmade: dict[str, Exception] = {}

    def prepare(self, users: list[str]) -> None:
        """A new data key for each of `users` without a live record, all committed in one
        keyring transaction (one per batch): a crash before the records leaves keys without
        records, which the node destroys at start, never a record without its key. A key is
        new even if one is stored: an erased user's key whose destruction a crash interrupted
        is never used again. The provider is called only when the cached wrapping key is too
        old; if it is down then, those users' writes fail with KeyUnavailable.

        The keys go under a wrapping key of the store's current generation (`key_generation`):
        if a rotation or a retire renewed them since, the keys are made again under a new one
        (where they are written in the records' transaction, that transaction runs again)."""
        live = self.store.live_users(users)
        new = [u for u in dict.fromkeys(users) if u not in live]
        for attempt in (1, 2):
            try:
                self._make(new)
                return
            except WrappingKeysRenewed as e:  # this process's keyring follows, and tries again
                if attempt == 2:
                    self._made, self._unmade = {}, dict.fromkeys(new, e)
            except Exception as e:  # the key service, or the keyring's disk: those writes fail
                self._made, self._unmade = {}, dict.fromkeys(new, e)
                return

    def _make(self, new: list[str]) -> None:
        self._made, self._unmade = {}, {}
        seen = self.store.seen_key_generation
        self.keyring.follow(self.store.key_generation() if seen is None else seen)
        wrapping: dict[str, bytes] = {}  # the wrapping keys the new data keys went under
        rows: list[tuple[str, str, bytes]] = []
        for u in new:
            key, wk, wrapped = self.keyring.new_data_key(u)
            wrapping[wk.id] = wk.wrapped
            rows.append((u, wk.id, wrapped))
            self._made[u] = (key, wk.id)
        if rows:
            self.store.add_data_keys(wrapping, rows, new_users_only=True, generation=self.keyring.generation)

    def take(self, user_id: str) -> tuple[DataKey, str]:
        """The key `prepare` made for a user without a live record, and its wrapping key id."""
        if user_id in self._made:
            return self._made[user_id]
        if user_id in self._unmade:
            raise self._unmade[user_id]
        # Erased earlier in this batch, after `prepare` ran: written again right after it.
        raise Unprepared(f"user {user_id} needs a new data key")
