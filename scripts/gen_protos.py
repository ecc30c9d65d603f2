"""Regenerates the Python stubs under protos/residency/v1 from the .proto files there.

`python scripts/gen_protos.py` writes them; `--check` regenerates into a temporary
directory and exits 1 if the committed stubs differ (CI runs this).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = PROTO_ROOT / "residency" / "v1"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE.glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(GENERATED))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated_files(Path(tmp) / "residency" / "v1")
        if args.check:
            current = {p.name for p in generated_files(PACKAGE)}
            stale = [
                p.name
                for p in fresh
                if p.name not in current or not filecmp.cmp(p, PACKAGE / p.name, shallow=False)
            ]
            stale += sorted(current - {p.name for p in fresh})
            if stale:
                print("stale generated code, run scripts/gen_protos.py:", ", ".join(stale))
                return 1
            print(f"generated code is current ({len(fresh)} files)")
            return 0
        for old in generated_files(PACKAGE):
            old.unlink()
        for p in fresh:
            shutil.copy(p, PACKAGE / p.name)
        print(f"wrote {len(fresh)} files to {PACKAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
