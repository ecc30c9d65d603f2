"""The docs name only what exists: every `residency ...` command line quoted in README.md and
docs/*.md is a command of the CLI's parser with flags it takes, and every key the config tables
name is a key of the node config."""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import typing
from collections.abc import Iterator
from pathlib import Path

from residency.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

Key = tuple[str, ...]


# ---- reading the docs -------------------------------------------------------------------------


def quotes(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every code-block line, with `\\` continuations joined, and of
    every inline code span, which may wrap across the lines of a paragraph."""
    lines = text.split("\n")
    in_block = False
    paragraph: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None

    def spans() -> Iterator[tuple[int, str]]:
        joined, starts = "", []
        for number, line in paragraph:
            starts.append((len(joined), number))
            joined += line + " "
        for m in re.finditer(r"`([^`]+)`", joined):
            yield max(n for offset, n in starts if offset <= m.start()), m.group(1)

    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            yield from spans()
            paragraph = []
            in_block = not in_block
            continue
        if in_block:
            start, sofar = pending or (number, "")
            if line.rstrip().endswith("\\"):
                pending = (start, sofar + line.rstrip()[:-1] + " ")
            else:
                pending = None
                yield start, sofar + line
        elif line.strip():
            paragraph.append((number, line))
        else:
            yield from spans()
            paragraph = []
    yield from spans()


def command_lines(text: str) -> Iterator[tuple[int, str]]:
    """Quoted text that is a `residency` command line (or one step of a `&&` chain)."""
    for number, quote in quotes(text):
        for step in re.split(r"\s(?:&&|\|\||;|\|)\s", quote):
            if re.match(r"residency\s", step.strip()):
                yield number, step.strip()


def config_rows(text: str, header: str = "key") -> Iterator[tuple[int, Key, str]]:
    """(line, key, row) for every key of a config table: a table whose first header is
    `header` (`key`: the node config's; `rules key`: the rules file's).
    A table under a line that starts with `NAME:` lists the keys of NAME. The row's first
    column names its keys (dotted for nested ones); `{a, b: value, ...}` in the row names the
    keys inside the row's key."""
    section: Key = ()
    in_block = False
    config_table: bool | None = None  # None: not in a table
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
        if in_block or not line.startswith("|"):
            config_table = None
            if line.strip() and not in_block:
                intro = re.match(r"`([\w.]+):`", line.strip())
                section = tuple(intro.group(1).split(".")) if intro else ()
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if config_table is None:
            config_table = cells[0] == header
            continue
        if not config_table or set(cells[0]) <= set("-: "):
            continue
        keys = [section + tuple(k.split(".")) for k in re.findall(r"`([^`]+)`", cells[0])]
        for key in keys:
            yield number, key, line
        for braces in re.findall(r"\{([^{}]*)\}", line):
            inner = [item.split(":")[0].strip() for item in braces.split(",")]
            for name in (n for n in inner if n and n != "..."):
                if len(keys) != 1:
                    yield number, ("{" + name + "}",), "braces in a row that names more than one key"
                else:
                    yield number, keys[0] + (name,), line


# ---- what exists ------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose: words are enough to find commands
        return line.split()


def command_problems(line: str, parser: argparse.ArgumentParser, name: str = "residency") -> list[str]:
    """What in a command line (without its leading program name) the parser does not know."""
    return _walk(_words(line)[1:], parser, name)


def _walk(words: list[str], parser: argparse.ArgumentParser, name: str) -> list[str]:
    subcommands = _subcommands(parser)
    problems = []
    for i, word in enumerate(words):
        token = word.strip("[]")
        if token.startswith("-"):
            for flag in re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", token):
                if flag not in _flags(parser):
                    problems.append(f"`{name}` has no flag {flag}")
            continue
        if subcommands is None:
            continue  # an argument or a placeholder
        if token in ("...", "…"):
            return problems
        for choice in token.split("|"):
            if choice in subcommands:
                problems += _walk(words[i + 1 :], subcommands[choice], f"{name} {choice}")
            else:
                problems.append(f"`{name} {choice}` is not a command (`{name}` has {sorted(subcommands)})")
        return problems
    return problems


def _schema_keys(schema: dict[str, typing.Any]) -> set[Key]:
    """Every key path of a JSON Schema: `properties`, through `$ref`, `anyOf`/`oneOf`/`allOf`
    and array `items`."""
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    keys: set[Key] = set()

    def walk(node: typing.Any, path: Key, seen: frozenset[str]) -> None:
        if not isinstance(node, dict):
            return
        ref = node.get("$ref", "")
        name = ref.rsplit("/", 1)[-1]
        if ref and name not in seen:
            walk(defs.get(name), path, seen | {name})
        for combined in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(combined, []):
                walk(sub, path, seen)
        walk(node.get("items"), path, seen)
        for prop, sub in node.get("properties", {}).items():
            keys.add(path + (prop,))
            walk(sub, path + (prop,), seen)

    walk(schema, (), frozenset())
    return keys


def known_config_keys() -> tuple[str, set[Key]]:
    """The node config's key paths, from the model that parses node config files (the same
    JSON Schema that `scripts/gen_jsonschema.py` publishes)."""
    from residency.server.config.node import NodeFile

    return "residency.server.config.node.NodeFile", _schema_keys(NodeFile.model_json_schema())


# ---- the checks ---------------------------------------------------------------------------------


def doc_command_problems(where: str, text: str, parser: argparse.ArgumentParser) -> list[str]:
    return [
        f"{where}:{number}: {problem}  <- {line}"
        for number, line in command_lines(text)
        for problem in command_problems(line, parser)
    ]


def known_rules_keys() -> tuple[str, set[Key]]:
    """The rules file's key paths, from the model that parses rules files."""
    from residency.server.config.rules import RulesFile

    return "residency.server.config.rules.RulesFile", _schema_keys(RulesFile.model_json_schema())


def doc_key_problems(
    where: str, text: str, known: set[Key], header: str = "key", what: str = "node config"
) -> list[str]:
    return [
        f"{where}:{number}: `{'.'.join(key)}` is not a {what} key  <- {row.strip()}"
        for number, key, row in config_rows(text, header)
        if key not in known
    ]


def _name(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def test_every_command_line_in_the_docs_exists_in_the_parser() -> None:
    parser = build_parser()
    checked = [line for doc in DOCS for _, line in command_lines(doc.read_text())]
    problems = [p for doc in DOCS for p in doc_command_problems(_name(doc), doc.read_text(), parser)]
    assert len(checked) > 40, f"only {len(checked)} command lines found: is the parsing broken?"
    assert not problems, "commands or flags the docs name that the parser lacks:\n" + "\n".join(problems)


def test_every_config_key_in_the_docs_exists_in_the_node_config() -> None:
    source, known = known_config_keys()
    named = [key for doc in DOCS for _, key, _ in config_rows(doc.read_text())]
    problems = [p for doc in DOCS for p in doc_key_problems(_name(doc), doc.read_text(), known)]
    assert {("replicator", "batch_size"), ("replicator", "regions"), ("keys", "provider")} <= set(named)
    assert not problems, f"config keys the docs name that are not in {source}:\n" + "\n".join(problems)


def test_every_rules_key_in_the_docs_exists_in_the_rules_file() -> None:
    source, known = known_rules_keys()
    named = [key for doc in DOCS for _, key, _ in config_rows(doc.read_text(), "rules key")]
    problems = [
        p
        for doc in DOCS
        for p in doc_key_problems(_name(doc), doc.read_text(), known, "rules key", "rules file")
    ]
    assert {("recipients", "country"), ("rules", "safeguards", "kind")} <= set(named)
    assert not problems, f"rules keys the docs name that are not in {source}:\n" + "\n".join(problems)


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors for a page's headings."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_in_the_docs_resolves() -> None:
    problems = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().split("\n"), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"\w+://", target):
                    continue
                path, _, anchor = target.partition("#")
                linked = (doc.parent / path).resolve() if path else doc
                if not linked.exists() or (anchor and anchor not in _anchors(linked)):
                    problems.append(f"{_name(doc)}:{number}: no such page or heading: {target}")
    assert not problems, "\n".join(problems)


BROKEN = """\
```sh
residency serve --config a.yaml --port 1
residency records put --target H u-1 \\
    --frobnicate x
pip install -e . && residency demos
residency replication pause|halt --target H --region R
```

Run `residency log verify DIR
--previous OLD --strict` offline.

| key | meaning |
| --- | --- |
| `region` | fine |
| `listen`, `colour` | one good, one missing |
| `replicator` | `{enabled, batch_size, turbo}` |
| `keys.kem`, `keys.colour` | dotted: one good, one missing |

`keys:` (secrets):

| key | meaning |
| --- | --- |
| `provider` | fine |
| `passphrase_file` or `password_file` | one missing |
"""


def test_the_checks_name_the_line_of_a_missing_command_flag_or_key() -> None:
    commands = doc_command_problems("x.md", BROKEN, build_parser())
    assert [p.split("  <- ")[0] for p in commands] == [
        "x.md:2: `residency serve` has no flag --port",
        "x.md:3: `residency records put` has no flag --frobnicate",
        "x.md:5: `residency demos` is not a command (`residency` has "
        + str(sorted(_subcommands(build_parser()) or {}))
        + ")",
        "x.md:6: `residency replication halt` is not a command (`residency replication` has "
        "['pause', 'resume', 'retry', 'status'])",
        "x.md:9: `residency log verify` has no flag --strict",
    ]
    _, known = known_config_keys()
    keys = doc_key_problems("x.md", BROKEN, known)
    assert [p.split("  <- ")[0] for p in keys] == [
        "x.md:15: `colour` is not a node config key",
        "x.md:16: `replicator.turbo` is not a node config key",
        "x.md:17: `keys.colour` is not a node config key",
        "x.md:24: `keys.password_file` is not a node config key",
    ]


def test_the_json_schema_walk_follows_refs_unions_and_arrays() -> None:
    schema = {
        "properties": {
            "region": {"type": "string"},
            "keys": {"$ref": "#/$defs/Keys"},
            "archive": {"anyOf": [{"$ref": "#/$defs/Archive"}, {"type": "null"}]},
            "affiliates": {
                "type": "array",
                "items": {"oneOf": [{"$ref": "#/$defs/Replica"}, {"$ref": "#/$defs/S3"}]},
            },
        },
        "$defs": {
            "Keys": {"properties": {"provider": {}, "passphrase_file": {}}},
            "Archive": {"properties": {"bucket": {}}},
            "Replica": {"properties": {"address": {}}},
            "S3": {"allOf": [{"properties": {"bucket": {}}}]},
        },
    }
    assert _schema_keys(schema) == {
        ("region",),
        ("keys",),
        ("keys", "provider"),
        ("keys", "passphrase_file"),
        ("archive",),
        ("archive", "bucket"),
        ("affiliates",),
        ("affiliates", "address"),
        ("affiliates", "bucket"),
    }


def test_every_test_the_docs_cite_exists() -> None:
    """docs/policy.md names the tests that hold each clause: a renamed or deleted test must not
    leave the table pointing at nothing."""
    defined = {
        m for f in (ROOT / "tests").rglob("test_*.py") for m in re.findall(r"def (test_\w+)", f.read_text())
    }
    cited = {(_name(doc), t) for doc in DOCS for t in re.findall(r"`(test_\w+)`", doc.read_text())}
    missing = sorted(f"{where}: {t}" for where, t in cited if t not in defined)
    assert len(cited) > 20, "no tests cited: is the parsing broken?"
    assert not missing, "tests the docs cite that do not exist:\n" + "\n".join(missing)


def test_the_rules_key_table_names_every_key_a_rule_takes() -> None:
    """operators.md's table of a rule's keys (first header `rule key`) against the model that
    parses rules files: a key added to rules is documented, a key documented exists."""
    from residency.server.config.rules import RuleFile

    lines = (ROOT / "docs" / "operators.md").read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*rule key\s*\|", line))
    rows = [line for line in itertools.takewhile(lambda x: x.startswith("|"), lines[start + 2 :])]
    named = {re.findall(r"`([^`]+)`", row.split("|")[1])[0] for row in rows}
    assert named == set(RuleFile.model_fields), named ^ set(RuleFile.model_fields)
