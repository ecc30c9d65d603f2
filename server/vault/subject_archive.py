"""A data subject's export on disk: what `residency subject export` writes and `residency
subject verify` checks offline, trusting nothing but the log's verifier key.

The archive is a folder (and, on request, a `.zip` of it):
- `index.html`: the summary a person reads (`core.report.subject`);
- `record.json`: the record as held at home, every field's value (credentials never);
- `copies.json`: per region, the copy there (held or withdrawn) with its fields, rule, legal
  basis, retention and safeguards: worked out from the entries alone, so verify recomputes it;
- `consents.json`, `disclosures.json`: the user's consents (with their evidence) and
  disclosure requests, as the node answered;
- `entries.jsonl`: every transfer-log entry about the user, one a line: `{"leaf_index",
  "entry", "hashes"}`, `entry` being exactly the bytes hashed into the leaf and `hashes` its
  inclusion proof (hex, from the leaf up) against the one signed checkpoint;
- `checkpoint.txt`: that checkpoint (C2SP signed note); `log.pub`: the verifier key the node
  stated (pin the one you trust instead: anyone who rewrites the folder can re-sign it);
- `rules.json`: the recipients and rules in force when exported.
The entries, and the copies derived from them, are what the signature covers; the record's
values, consents and disclosures are the node's word (the log never holds values)."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from residency.server.core import codec, merkle
from residency.server.core.checkpoint import (
    Checkpoint,
    fingerprint,
)
from residency.server.core.errors import ResidencyError
from residency.server.core.report import subject as page
from residency.server.vault.bundle import open_checkpoint
from residency.v1 import records_pb2

INDEX, RECORD, COPIES, CONSENTS = "index.html", "record.json", "copies.json", "consents.json"
DISCLOSURES, ENTRIES, CHECKPOINT, KEY, RULES = (
    "disclosures.json",
    "entries.jsonl",
    "checkpoint.txt",
    "log.pub",
    "rules.json",
)


class ArchiveError(ResidencyError):
    """An export does not verify; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class VerifiedExport:
    checkpoint: Checkpoint
    user_id: str
    entries: int
    key: str
    pinned: bool


def _message(m: Any) -> dict[str, Any]:
    return json_format.MessageToDict(m, preserving_proto_field_name=True)


def _text(path: Path, text: str) -> None:
    """Writes a file of the archive readable by its owner only (0600, whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _json(path: Path, doc: Any) -> None:
    _text(path, json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def prepare(directory: Path, make_zip: bool = False) -> None:
    """Makes the export's folder, readable by its owner only (0700): refused (ArchiveError)
    unless it is new or empty, so that nothing else lands in the export or its `.zip`."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ArchiveError(f"{directory} is not empty: an export goes into a new or empty folder")
    if make_zip and (zipped := directory.with_name(directory.name + ".zip")).exists():
        raise ArchiveError(f"{zipped} exists already: an export's .zip is written new")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)


def discard(directory: Path, make_zip: bool = False) -> None:
    """Removes what a failed export wrote (the folder `prepare` made, and its `.zip`)."""
    shutil.rmtree(directory, ignore_errors=True)
    if make_zip:
        directory.with_name(directory.name + ".zip").unlink(missing_ok=True)


def documents(reply: records_pb2.ExportSubjectResponse) -> dict[str, Any]:
    """The archive's documents, from the node's answer."""
    rec = reply.record
    fields = {n: codec.to_json(codec.from_value(v)) for n, v in sorted(rec.fields.items())}
    rows = [json.loads(e.entry_json) for e in reply.entries]
    own = next((r for r in rows if r["sequence"] == reply.log_sequence), None)
    rules = [_message(r) for r in reply.rules]
    return {
        "record": {
            "user_id": rec.user_id,
            "version": rec.version,
            "source": rec.source,
            "home_region": rec.home_region,
            "created_at": rec.created_at.ToJsonString(),
            "updated_at": rec.updated_at.ToJsonString(),
            "fields": fields,
            "withheld": [_message(w) for w in reply.withheld],
            "export": {"log_sequence": reply.log_sequence, "rules_version": reply.rules_version},
        },
        # The export's own entry names each field handed over with its category.
        "categories": {f["name"]: f["category"] for f in (own or {}).get("fields", [])},
        "copies": page.copies(rows, rules),
        "consents": [
            {
                "purpose": c.purpose,
                "recipient": c.recipient,
                "sensitive": c.sensitive,
                "evidence": c.evidence,
                "actor": c.actor,
                "granted_at": c.granted_at.ToJsonString(),
                "withdrawn_at": c.withdrawn_at.ToJsonString() if c.HasField("withdrawn_at") else None,
            }
            for c in reply.consents
        ],
        "disclosures": [_message(d) for d in reply.disclosures],
        "recipients": [_message(r) for r in reply.recipients],
        "rules": rules,
        "rows": rows,
    }


def write(directory: Path, reply: records_pb2.ExportSubjectResponse, make_zip: bool = False) -> Path | None:
    """Writes the archive into `directory` (new or empty: `prepare`; the files 0600), verified
    first: a node's answer that does not verify against its own key is not handed on, and
    what was written of it is removed. Returns the `.zip` written (0600), if asked for."""
    prepare(directory, make_zip)
    try:
        return _write(directory, reply, make_zip)
    except BaseException:
        discard(directory, make_zip)
        raise


def _write(directory: Path, reply: records_pb2.ExportSubjectResponse, make_zip: bool) -> Path | None:
    cp = reply.checkpoint
    doc = documents(reply)
    lines = []
    for e, p in zip(reply.entries, reply.proofs, strict=True):
        line = {"leaf_index": p.leaf_index, "entry": e.entry_json, "hashes": [h.hex() for h in p.hashes]}
        lines.append(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")
    _text(directory / ENTRIES, "".join(lines))
    _text(directory / CHECKPOINT, cp.checkpoint)
    _text(directory / KEY, cp.verifier_key.strip() + "\n")
    for name, key in (
        (RECORD, "record"),
        (COPIES, "copies"),
        (CONSENTS, "consents"),
        (DISCLOSURES, "disclosures"),
    ):
        _json(directory / name, doc[key])
    _text(directory / RULES, page.rules_text(doc["recipients"], doc["rules"]))
    checked = verify(directory)
    doc["checkpoint"] = {
        "origin": checked.checkpoint.origin,
        "tree_size": checked.checkpoint.size,
        "root_hash": checked.checkpoint.root.hex(),
        "key_fingerprint": fingerprint(checked.key),
    }
    _text(directory / INDEX, page.render_page(doc, time.time()))
    if not make_zip:
        return None
    zipped = Path(
        shutil.make_archive(str(directory), "zip", root_dir=directory.parent, base_dir=directory.name)
    )
    zipped.chmod(0o600)
    return zipped


def _read(directory: Path, name: str) -> Any:
    try:
        return json.loads((directory / name).read_text(encoding="utf-8"))
    except OSError as e:
        raise ArchiveError(f"{directory} is not a complete export: cannot read {name}: {e.strerror}") from e
    except ValueError as e:
        raise ArchiveError(f"{name}: not JSON: {e}") from e


def verify(directory: Path, key: str | None = None, origin: str | None = None) -> VerifiedExport:
    """Checks an export: the checkpoint's signature (with `key`, the verifier key the reader
    trusts, else the folder's own log.pub), each entry's inclusion proof against it, that
    every entry is the user's and the export's own entry is among them, and that copies.json
    follows from the entries. Raises ArchiveError or CheckpointError naming what fails."""
    pinned = key is not None
    try:
        key = key if key is not None else (directory / KEY).read_text()
        note = (directory / CHECKPOINT).read_text()
        lines = (directory / ENTRIES).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ArchiveError(f"{directory} is not a complete export: {e.strerror}: {e.filename}") from e
    cp, _ = open_checkpoint(note, key, pinned, origin)
    record = _read(directory, RECORD)
    if not isinstance(record, dict) or not isinstance(record.get("export"), dict):
        raise ArchiveError(f"{RECORD}: not the record of an export")
    user = record.get("user_id")
    rows: list[dict[str, Any]] = []
    leaves: list[bytes] = []
    previous = -1
    for number, text in enumerate(lines, 1):
        at = f"{ENTRIES} line {number}"
        try:
            line = json.loads(text)
            index, data = line["leaf_index"], line["entry"].encode()
            hashes = [bytes.fromhex(h) for h in line["hashes"]]
            row = json.loads(data)
            sequence, subject = row["sequence"], row["subject"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ArchiveError(f"{at}: not an entry with its proof ({type(e).__name__}: {e})") from e
        if not isinstance(index, int) or index <= previous or sequence != index + 1:
            raise ArchiveError(
                f"{at}: leaf index {index} is out of order or not the entry's (sequence {sequence})"
            )
        if subject != user:
            raise ArchiveError(f"{at}: the entry at leaf index {index} is not about {user}")
        try:
            merkle.verify_inclusion(index, cp.size, merkle.leaf_hash(data), hashes, cp.root)
        except merkle.ProofError as e:
            raise ArchiveError(f"{at}: the entry at leaf index {index} is not in the signed tree: {e}") from e
        rows.append(row)
        leaves.append(merkle.leaf_hash(data))
        previous = index
    own = record["export"].get("log_sequence")
    mine = next((r for r in rows if r["sequence"] == own and r["kind"] == "access"), None)
    if mine is None:
        raise ArchiveError(f"{ENTRIES}: the export's own entry ({own}) is not among the proved entries")
    _check_commitment(directory, record, mine, rows, leaves)
    rules = _read(directory, RULES).get("rules", [])
    if _read(directory, COPIES) != json.loads(json.dumps(page.copies(rows, rules))):
        raise ArchiveError(f"{COPIES} does not follow from the verified entries")
    return VerifiedExport(cp, str(user), len(rows), key.strip(), pinned)


def _check_commitment(
    directory: Path,
    record: dict[str, Any],
    own: dict[str, Any],
    rows: list[dict[str, Any]],
    leaves: list[bytes],
) -> None:
    """The export's own entry (proved) commits to the entries before it and to rules.json: an
    entry left out, or a rule's retention or safeguards edited, no longer matches."""
    made = own.get("export")
    if not isinstance(made, dict):
        raise ArchiveError(f"{ENTRIES}: the export's own entry commits to no set of entries")
    try:
        rules_file = (directory / RULES).read_text(encoding="utf-8")
    except OSError as e:
        raise ArchiveError(f"{directory} is not a complete export: cannot read {RULES}: {e.strerror}") from e
    earlier = [leaf for r, leaf in zip(rows, leaves, strict=True) if r["sequence"] < own["sequence"]]
    found = page.commitment(earlier, rules_file)
    for key, what in (
        ("earlier_entries", f"{ENTRIES} holds {found['earlier_entries']} entries before the export's own"),
        ("earlier_sha256", f"{ENTRIES}: the entries before the export's own are not those it committed to"),
        ("rules_sha256", f"{RULES} is not the rules file the export committed to"),
    ):
        if made.get(key) != found[key]:
            raise ArchiveError(f"{what} (its entry says {made.get(key)})")
    if record["export"].get("rules_version") != own.get("rules_version"):
        raise ArchiveError(
            f"{RECORD}: the rules version is not the export entry's ({own.get('rules_version')})"
        )
