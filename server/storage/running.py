"""Whether a node is running on a data folder: `residency serve` and `residency replicate` hold
a shared lock on `DATA_DIR/running.lock` for as long as they run (the kernel drops it when the
process ends, killed or not); what must not run beside them (`residency keys ... --config`)
holds it alone, or is refused. `residency serve` also holds `DATA_DIR/serving-LISTEN.lock`
alone, so that one config is not served twice on one host, and writes into it the name its
health answers carry (`residency health` tells its own node from another front end sharing
the address by it)."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from residency.server.core.errors import FailedPrecondition

LOCK = "running.lock"


def _hold(data_dir: Path, how: int, refusal: str, name: str = LOCK) -> int:
    """A descriptor of the lock `data_dir/name` held `how` (shared or exclusive);
    FailedPrecondition(`refusal`) if it cannot be had now."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(data_dir / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FailedPrecondition(refusal) from None
    return fd


def hold_running(data_dir: Path) -> int:
    """Marks the node as running until the returned descriptor is closed (or the process ends).
    Refused while a command works on the stopped node's keys."""
    return _hold(
        data_dir,
        fcntl.LOCK_SH,
        f"a `residency keys` command is working on the keys of the node of {data_dir}: "
        "start the node once it has finished",
    )


def serving_lock(data_dir: Path, listen: str) -> Path:
    """`DATA_DIR/serving-LISTEN.lock`."""
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in listen)
    if len(safe) > 100:  # a file name has at most 255 bytes
        safe = hashlib.sha256(listen.encode()).hexdigest()[:32]
    return data_dir / f"serving-{safe}.lock"


def hold_serving(data_dir: Path, listen: str, instance: str) -> int:
    """Held alone by the one `residency serve` of this data folder and listen address: the same
    config started twice on one host would be one worker owner (host, listen address and
    data folder name it) holding one lease twice, which fencing cannot tell apart. Once held,
    the file holds `instance`, the name this process's health answers carry."""
    name = serving_lock(data_dir, listen).name
    fd = _hold(
        data_dir,
        fcntl.LOCK_EX,
        f"a node with data_dir {data_dir} and listen address {listen} already runs on this host "
        f"(it holds {data_dir / name}): a second front end needs a data_dir of its own "
        "(docs/operators.md, PostgreSQL)",
        name,
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, instance.encode(), 0)
    return fd


def serving_instance(data_dir: Path, listen: str) -> str:
    """The name the last `residency serve` of this data folder and listen address wrote (its
    health answers carry it), or "" if there is none to read."""
    try:
        return serving_lock(data_dir, listen).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def hold_stopped(data_dir: Path) -> int:
    """Keeps the node from starting until the returned descriptor is closed. Refused while the
    node (or a replication worker of it) runs: its keys are then the running node's to change."""
    return _hold(
        data_dir,
        fcntl.LOCK_EX,
        f"the node of {data_dir} is running (it holds {data_dir / LOCK}), or a replication "
        "worker of it: send the command to it with --target HOST:PORT (and the operator's "
        "--cert --key --ca) so that it switches at once; --config is for a stopped node only. "
        "Nothing was changed",
    )
