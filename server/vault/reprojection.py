"""A rule change's re-projection of every live record, in the background, page by page (each
page its own short transaction, so writes go on). Its state (rules version, the last user
done) is in the store (`rules_state`), written with the change's log entry and with each page:
a restart resumes it, and a primary started under another rules file than the one its records
were last re-projected for logs the change and re-projects (review finding 2)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from residency.server.storage.rules_state import RulesState
from residency.server.storage.thread import StoreThread
from residency.server.vault.rules_change import RulesChange

log = logging.getLogger("residency.node")
PAGE = 500
# How long a re-projection waits after a failed page (the disk full, the key service down).
RETRY_SECONDS = 5.0


class Reprojection:
    """The primary's re-projection, at most one at a time. `progress(done, total)` and `wake()`
    are called after each page (the node's status, the replicator)."""

    def __init__(
        self,
        db: StoreThread[Any],
        policy: RulesChange,
        progress: Callable[[int, int], None],
        wake: Callable[[], None],
    ):
        self.db, self.policy, self.progress, self.wake = db, policy, progress, wake
        self._task: asyncio.Task[None] | None = None

    def resume(self, state: RulesState | None) -> None:
        """At start, from `state` (what `RulesChange.rules_at_start` returned: a change of the
        rules file made while the node was stopped, or a re-projection a stop cut short), if
        there is one to do."""
        if state is not None:
            log.info(
                "rules %s: re-projecting from %d of %d records",
                state.version,
                state.done,
                max(state.total, state.done),
            )
            self._start(state)

    async def restart(self, state: RulesState | None) -> None:
        """After a swap: the new rules' re-projection (the saved `state`) replaces the one
        under way."""
        await self.stop()
        if state is not None:
            self._start(state)

    def _start(self, state: RulesState) -> None:
        self._task = asyncio.create_task(self._run(state), name="reproject")

    async def _run(self, state: RulesState) -> None:
        self.progress(state.done, max(state.total, state.done))
        while state.after is not None:
            try:
                state = await self.db.write(functools.partial(self.policy.reproject, PAGE), weight=PAGE)
            except Exception as e:  # logged by kind only; the saved cursor is where it goes on
                log.warning("rules re-projection paused (%s); retrying", type(e).__name__)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self.progress(state.done, max(state.total, state.done))
            self.wake()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
