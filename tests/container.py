"""Runs an image's command natively the way its container would run it: in a mount namespace
of its own where every filesystem is read-only except the volumes bound into it, under the
image's non-root user. No container runtime is reachable on these machines; this keeps the
properties the manifests rely on (read-only root, non-root, only the data volume writable)
checked for real, with the image's own ENTRYPOINT and CMD."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Filesystems that are not storage: left as they are (a container gets its own /proc, /dev).
_VIRTUAL = {"proc", "sysfs", "devtmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "securityfs"}

# Runs as root inside `unshare --mount`: mounts, then drops to the image's user and execs.
_SETUP = r"""
import json, os, subprocess, sys
spec = json.loads(sys.argv[1])
os.umask(0o022)  # a container's default, whatever the test process had
def run(*a):
    subprocess.run(a, check=True)
# Directories the image creates (/etc/residency, /run/secrets/...) are made in overlays and a
# fresh /run, visible in this namespace only.
for parent, upper in spec["overlays"].items():
    os.makedirs(upper + "/u"); os.makedirs(upper + "/w")
    os.chmod(upper + "/u", os.stat(parent).st_mode & 0o7777)  # the overlay's root looks like it
    run("mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={parent},upperdir={upper}/u,workdir={upper}/w", parent)
run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run")
# The test environment's interpreter may sit under a folder others cannot enter (/root): that
# folder is replaced by an empty one others can enter, holding only the paths the program needs.
for i, (blocked, child) in enumerate(spec["reveal"]):
    keep = f"{spec['scratch']}/reveal-{i}"
    os.makedirs(keep)
    run("mount", "--bind", f"{blocked}/{child}", keep)
    spec["reveal"][i].append(keep)
for blocked in sorted({b for b, _, _ in spec["reveal"]}):
    run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", blocked)
for blocked, child, keep in spec["reveal"]:
    os.makedirs(f"{blocked}/{child}")
    run("mount", "--bind", keep, f"{blocked}/{child}")
os.makedirs(spec["workdir"], exist_ok=True)  # the image makes it
for target, (source, writable) in spec["volumes"].items():
    os.makedirs(target, exist_ok=True)
    run("mount", "--bind", source, target)
# Every storage filesystem read-only (the root, /tmp, /work, the overlays), then the volumes
# marked writable made writable again.
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    point, fstype = fields[4], fields[fields.index("-") + 1]
    if fstype not in spec["virtual"] and point not in spec["volumes"]:
        subprocess.run(["mount", "-o", "remount,bind,ro", point], stderr=subprocess.DEVNULL)
for target, (source, writable) in spec["volumes"].items():
    run("mount", "-o", "remount,bind," + ("rw" if writable else "ro"), target)
os.chdir(spec["workdir"])
os.setgroups([]); os.setgid(spec["gid"]); os.setuid(spec["uid"])
os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
"""


@dataclass(frozen=True)
class Image:
    """What a Dockerfile's final stage says about how its container runs."""

    user: tuple[int, int]
    workdir: str
    entrypoint: list[str]
    cmd: list[str]
    volumes: list[str]
    stages: int
    env: dict[str, str]

    @classmethod
    def read(cls, dockerfile: Path) -> Image:
        text = re.sub(r"\\\n", " ", dockerfile.read_text())
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        final = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
        found: dict[str, str] = {}
        for ln in lines[final:]:
            word, _, rest = ln.partition(" ")
            found[word.upper()] = rest.strip()
        uid, _, gid = found["USER"].partition(":")
        return cls(
            user=(int(uid), int(gid or uid)),
            workdir=found.get("WORKDIR", "/"),
            entrypoint=json.loads(found["ENTRYPOINT"]),
            cmd=json.loads(found.get("CMD", "[]")),
            volumes=json.loads(found.get("VOLUME", "[]")),
            stages=sum(1 for ln in lines if ln.upper().startswith("FROM ")),
            env=dict(
                pair.split("=", 1) for pair in found.get("ENV", "").split() if "=" in pair and "$" not in pair
            ),
        )


def _reveal(paths: list[Path]) -> list[list[str]]:
    """[folder others cannot enter, its child on the way to a path] for each such step."""
    steps: list[list[str]] = []
    for path in paths:
        path = path.resolve()
        for parent, child in zip(reversed(path.parents), path.parts[1:], strict=False):
            if not parent.stat().st_mode & 0o001 and [str(parent), child] not in steps:
                steps.append([str(parent), child])
                break
    return steps


def run_natively(
    image: Image,
    volumes: dict[str, tuple[Path, bool]],
    args: list[str] | None = None,
    log: Path | None = None,
    environment: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Starts the image's ENTRYPOINT with `args` (default: its CMD) as its container would run:
    `volumes` maps a path in the container to (a folder here, writable?); nothing else is
    writable, and the process runs as the image's USER, with the image's ENV and
    `environment` (a service's own). The image's installed program is this interpreter's (the
    test environment's `residency`), first on PATH."""
    # A fresh folder per run: `id(volumes)` once named it, and a dict made after another was
    # freed can get the same id (two services of one stack then collided).
    scratch = Path(tempfile.mkdtemp(prefix="container-"))
    overlays = {parent: str(scratch / parent.strip("/").replace("/", "_")) for parent in ("/etc", "/var/lib")}
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", **image.env, **(environment or {})}
    spec = {
        "scratch": str(scratch),
        "reveal": _reveal([Path(sys.base_prefix), Path(sys.prefix), Path(__file__).resolve().parent.parent]),
        "overlays": overlays,
        "volumes": {target: (str(source), writable) for target, (source, writable) in volumes.items()},
        "virtual": sorted(_VIRTUAL),
        "workdir": image.workdir,
        "uid": image.user[0],
        "gid": image.user[1],
        "argv": image.entrypoint + (image.cmd if args is None else args),
        "env": env,
    }
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _SETUP, json.dumps(spec)]
    if log is None:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
