"""The package's shape: one top-level import package, layers that only point down, no import
cycles, a type-checked core and no hand-written module over 400 lines (DESIGN.md, STYLE.md).

The source folders (`protos/residency`, `server/`, `replicator/`, `cli/`) are mapped onto one
package, `residency`, by pyproject's `package-dir`. import-linter and mypy find modules on
disk, so they run over a tree of symbolic links laid out as the installed package.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"v1": "protos/residency/v1", "server": "server", "replicator": "replicator", "cli": "cli"}
LIMIT = 400


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def installed_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`DIR/residency/...` as the wheel installs it, linked to the working tree."""
    top = tmp_path_factory.mktemp("tree")
    pkg = top / "residency"
    pkg.mkdir()
    (pkg / "__init__.py").symlink_to(ROOT / "protos" / "residency" / "__init__.py")
    for name, folder in SOURCES.items():
        (pkg / name).symlink_to(ROOT / folder)
    (top / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")
    return top


def test_wheel_installs_exactly_one_top_level_package(tmp_path: Path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("residency-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"residency", next(t for t in tops if t.endswith(".dist-info"))}, tops
    # Every module of every source folder is in it, at its place in the package (a subpackage
    # missing from pyproject's list would install a node that cannot start).
    expected = {
        f"residency/{name}/{path.relative_to(ROOT / folder).as_posix()}"
        for name, folder in SOURCES.items()
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert not expected - set(names), sorted(expected - set(names))
    assert "residency/v1/records.proto" in names


def test_layers_point_down_and_the_core_does_no_io(installed_tree: Path):
    """pyproject [tool.importlinter]: cli > node > api | replicator > vault > storage | keys >
    config > core, and the core imports no gRPC, storage, keys, YAML or service stubs."""
    r = subprocess.run(
        [_tool("lint-imports")], cwd=installed_tree, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout + r.stderr


def test_no_import_cycles(installed_tree: Path):
    code = f"""
import sys
sys.path.insert(0, {str(installed_tree)!r})
import grimp
g = grimp.build_graph("residency")
mods = sorted(m for m in g.modules if not m.startswith("residency.v1"))
edges = {{m: sorted(d for d in g.find_modules_directly_imported_by(m) if d in mods) for m in mods}}
# Tarjan's strongly connected components: any component of two or more modules is a cycle.
index, low, stack, on, out, n = {{}}, {{}}, [], set(), [], [0]
def visit(v):
    index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            out.append(sorted(comp))
sys.setrecursionlimit(10000)
for m in mods:
    if m not in index:
        visit(m)
print(out)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"import cycles: {r.stdout}"


def _mypy(tree: Path, package: str) -> subprocess.CompletedProcess[str]:
    mypy = [_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "-p", package]
    return subprocess.run(mypy, cwd=tree, capture_output=True, text=True, timeout=600)


def test_core_type_checks_strictly(installed_tree: Path):
    """pyproject [tool.mypy]: the core under the per-module flags that `--strict` sets."""
    r = _mypy(installed_tree, "residency.server.core")
    assert r.returncode == 0, r.stdout + r.stderr


def test_whole_package_type_checks(installed_tree: Path):
    """Every caller is checked against the Protocols it is given (e.g. the store's)."""
    r = _mypy(installed_tree, "residency")
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_hand_written_module_over_400_lines():
    long = []
    for folder in ("server", "replicator", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > LIMIT:
                long.append(f"{path.relative_to(ROOT)}: {lines}")
    assert not long, f"modules over {LIMIT} lines: {long}"
