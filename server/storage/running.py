"""Whether a node is running on a data folder: `residency serve` and `residency replicate` hold
a shared lock on `DATA_DIR/running.lock` for as long as they run (the kernel drops it when the
process ends, killed or not); what must not run beside them (`residency keys ... --config`)
holds it alone, or is refused."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from residency.server.core.errors import FailedPrecondition

LOCK = "running.lock"


def _open(data_dir: Path) -> int:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return os.open(data_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)


def hold_running(data_dir: Path) -> int:
    """Marks the node as running until the returned descriptor is closed (or the process ends).
    Refused while a command works on the stopped node's keys."""
    fd = _open(data_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FailedPrecondition(
            f"a `residency keys` command is working on the keys of the node of {data_dir}: "
            "start the node once it has finished"
        ) from None
    return fd


def hold_stopped(data_dir: Path) -> int:
    """Keeps the node from starting until the returned descriptor is closed. Refused while the
    node (or a replication worker of it) runs: its keys are then the running node's to change."""
    fd = _open(data_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FailedPrecondition(
            f"the node of {data_dir} is running (it holds {data_dir / LOCK}), or a replication "
            "worker of it: send the command to it with --target HOST:PORT (and the operator's "
            "--cert --key --ca) so that it switches at once; --config is for a stopped node only. "
            "Nothing was changed"
        ) from None
    return fd
