"""The data subject's own export (issue 18.3): `residency subject export` against a running
deployment, `residency subject verify` offline with the log's verifier key, and who may ask."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from residency.cli.main import main
from residency.server.core.checkpoint import Checkpoint, LogSigner, open_note
from residency.server.deployment import PRIMARY
from residency.v1 import disclosure_pb2, records_pb2, records_pb2_grpc
from tests.conftest import Cluster, ctx
from tests.test_access import entries, permission_of

SG, IE = "ap-southeast-1", "eu-west-1"
USER, OTHER = "x-1", "x-2"
SCRIPT = "<script>alert(1)</script>"
VALUES = {
    "name": f"Li {SCRIPT}",
    "email": "li.wei@example.cn",
    "phone": "+8613800138000",
    "language": "zh",
    "pages_visited": ["/home", "/orders"],
    "national_id": "110101199003077777",
    "password": "correct horse battery",
}
OTHERS = {"name": "Zhang Min", "email": "zhang.min@example.cn", "phone": "+8613900139000", "language": "en"}
PURPOSE = "essential.legal_obligation"
# billing may state payment purposes only; every other service, any purpose.
ACCESS = """
services:
  - identity: spiffe://residency/service/cn-north/billing
    purposes: [essential.service.payment_processing]
  - identity: spiffe://residency/service/*/*
    purposes: ["*"]
"""


@pytest.fixture(scope="module")
async def held(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    """Two users, each with copies in both affiliate regions, a marketing consent and a
    disclosure to a court."""
    c = Cluster(tmp_path_factory.mktemp("export") / "deployment")
    (c.dir / "access.yaml").write_text(ACCESS)
    try:
        await c.start()
        for user, values in ((USER, VALUES), (OTHER, OTHERS)):
            await c.consent(user, "marketing.communications", "ie-affiliate")
            await c.put(user, values)
            await c.disclose(
                user,
                disclosure_pb2.DISCLOSURE_GROUND_JUDICIAL_OR_ADMINISTRATIVE_REQUEST,
                third_party="Haidian District Court",
                reference=f"case-{user}",
            )
        await c.replicated()
        for user in (USER, OTHER):  # both copies are there before anything is exported
            assert (await c.held(user, SG)).record.fields and (await c.held(user, IE)).record.fields
        yield c
    finally:
        await c.close()


async def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
async def exported(held: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("subject") / "x-1-export"
    code = await asyncio.to_thread(
        main, ["subject", "export", *held.target("operator"), USER, "--out", str(out), "--zip"]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
async def log_key(held: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log's verifier key as a reviewer's `log export` bundle states it."""
    bundle = tmp_path_factory.mktemp("bundle") / "log"
    assert (
        await asyncio.to_thread(main, ["log", "export", *held.target("reviewer"), "--out", str(bundle)]) == 0
    )
    return bundle / "log.pub"


def read(d: Path, name: str):
    return json.loads((d / name).read_text())


async def test_an_export_holds_the_record_its_copies_consents_and_disclosures(exported: Path):
    record = read(exported, "record.json")
    assert record["user_id"] == USER and record["home_region"] == PRIMARY
    assert record["fields"] == {k: v for k, v in VALUES.items() if k != "password"}
    assert [(w["field"], w["reason"]) for w in record["withheld"]] == [("password", "credential")]
    copies = {c["region"]: c for c in read(exported, "copies.json")}
    assert set(copies) == {SG, IE} and all(c["state"] == "held" for c in copies.values())
    sg = {f["name"]: f for f in copies[SG]["fields"]}
    assert sg["email"]["rule"] == "sg-service" and sg["email"]["legal_basis"] == "contract"
    assert (
        sg["email"]["retention_days"] == 365
        and sg["email"]["safeguards"][0]["kind"] == "cac_standard_contract"
    )
    ie = {f["name"]: f for f in copies[IE]["fields"]}
    assert ie["phone"]["rule"] == "ie-marketing" and ie["phone"]["legal_basis"] == "consent"
    assert {g["kind"] for g in ie["phone"]["safeguards"]} == {"cac_standard_contract", "scc"}
    assert "national_id" not in sg and "national_id" not in ie  # never_transfer
    (consent,) = read(exported, "consents.json")
    assert consent["purpose"] == "marketing.communications" and consent["recipient"] == "ie-affiliate"
    assert consent["evidence"] == "test suite" and consent["withdrawn_at"] is None
    (disclosure,) = read(exported, "disclosures.json")
    assert disclosure["third_party"] == "Haidian District Court" and disclosure["reference"] == "case-x-1"
    lines = [json.loads(line) for line in (exported / "entries.jsonl").read_text().splitlines()]
    kinds = {json.loads(line["entry"])["kind"] for line in lines}
    assert {"consent", "replication", "disclosure", "access"} <= kinds
    assert (exported / "checkpoint.txt").read_text().startswith("residency/cn-north\n")
    page = (exported / "index.html").read_text()
    for needle in (
        "Example Holdings Pte. Ltd.",
        "dpo@example.ie",
        "Singapore",
        "Ireland",
        "Haidian",
        "Jing-HT",
    ):
        assert needle in page, needle
    with zipfile.ZipFile(exported.parent / "x-1-export.zip") as z:
        assert {Path(n).name for n in z.namelist()} >= {
            "index.html",
            "entries.jsonl",
            "log.pub",
            "record.json",
        }


async def test_the_export_is_logged_as_an_access_naming_fields_never_values(held: Cluster, exported: Path):
    own = read(exported, "record.json")["export"]["log_sequence"]
    (entry,) = [e for e in await entries(held, kind="access", subject=USER) if e["sequence"] == own]
    assert entry["outcome"] == "allowed" and entry["actor"] == "spiffe://residency/operator/cn-north/operator"
    assert entry["purpose"] == PURPOSE
    assert {f["name"] for f in entry["fields"]} == set(VALUES) - {"password"}
    text = json.dumps(entry)
    assert all(str(v) not in text for k, v in VALUES.items() if k != "language")


async def test_the_export_verifies_offline_with_the_logs_verifier_key(
    exported: Path, log_key: Path, capsys: pytest.CaptureFixture[str]
):
    code, out, err = await run(capsys, "subject", "verify", str(exported), "--key", str(log_key))
    assert code == 0, err
    result = json.loads(out)
    assert result["verified"] and result["key"] == "pinned" and result["user_id"] == USER
    lines = (exported / "entries.jsonl").read_text().splitlines()
    assert result["entries"] == len(lines) >= 6 and result["origin"] == "residency/cn-north"


def _tamper(exported: Path, tmp_path: Path, name: str, change) -> Path:
    d = tmp_path / "tampered"
    shutil.copytree(exported, d)
    (d / name).write_text(change((d / name).read_text()))
    return d


def _entry_line(change):
    """Changes the first replication entry's line of entries.jsonl with `change(line)`."""

    def apply(text: str) -> str:
        lines = [json.loads(line) for line in text.splitlines()]
        i = next(i for i, line in enumerate(lines) if '"kind":"replication"' in line["entry"])
        lines[i] = change(lines[i])
        return "".join(json.dumps(line) + "\n" for line in lines)

    return apply


@pytest.mark.parametrize(
    ("name", "change", "says"),
    [
        # The entry says the copy was refused; its proof no longer leads to the signed root.
        (
            "entries.jsonl",
            _entry_line(lambda x: {**x, "entry": x["entry"].replace('"allowed"', '"denied"')}),
            "not in the signed tree",
        ),
        # One hash of a proof flipped.
        (
            "entries.jsonl",
            _entry_line(
                lambda x: {**x, "hashes": [("0" if x["hashes"][0][0] != "0" else "1") + x["hashes"][0][1:]]}
            ),
            "not in the signed tree",
        ),
        # The proof of another leaf index given for the entry.
        ("entries.jsonl", _entry_line(lambda x: {**x, "leaf_index": x["leaf_index"] + 1}), "leaf index"),
        # An entry left out: the export's own.
        ("entries.jsonl", lambda t: "".join(t.splitlines(keepends=True)[:-1]), "export's own entry"),
        # A copy hidden from the summary.
        ("copies.json", lambda t: json.dumps(json.loads(t)[:1]), "copies.json"),
    ],
)
async def test_a_tampered_entry_proof_or_copy_fails_verify(
    exported: Path, log_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name, change, says
):
    d = _tamper(exported, tmp_path, name, change)
    code, out, err = await run(capsys, "subject", "verify", str(d), "--key", str(log_key))
    assert code == 1 and out == "" and says in err, err


async def test_a_checkpoint_signed_by_another_key_fails_verify(
    exported: Path, log_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Whoever rewrites the folder can re-sign its checkpoint with a key of the log's name and
    replace log.pub: the export then verifies against its own key, and the pinned one refuses it."""
    d = tmp_path / "resigned"
    shutil.copytree(exported, d)
    cp = open_note((d / "checkpoint.txt").read_text(), log_key.read_text())
    liar = LogSigner.new("residency/cn-north")
    (d / "checkpoint.txt").write_text(liar.sign(Checkpoint(cp.origin, cp.size, cp.root)))
    (d / "log.pub").write_text(liar.verifier_key + "\n")
    code, _, err = await run(capsys, "subject", "verify", str(d))
    assert code == 0 and "pin yours with --key" in err
    code, _, err = await run(capsys, "subject", "verify", str(d), "--key", str(log_key))
    assert code == 1 and "checkpoint" in err, err


async def test_no_other_users_data_is_in_the_export(exported: Path):
    for path in [p for p in exported.rglob("*") if p.is_file()]:
        text = path.read_text()
        assert OTHER not in text and "case-x-2" not in text, path.name
        for value in [OTHERS["name"], OTHERS["email"], OTHERS["phone"]]:
            assert value not in text, (path.name, value)


async def test_a_field_value_with_a_script_renders_as_text(exported: Path, tmp_path: Path):
    page = (exported / "index.html").read_text()
    assert "Li &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    for external in ("http://", "https://", "<link", "src="):
        assert external not in page, external
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    proc = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--dump-dom",
        (exported / "index.html").as_uri(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    dom, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    rendered = dom.decode()
    # The browser parsed the value as text in a cell, not as an element.
    assert "Li &lt;script&gt;alert(1)&lt;/script&gt;" in rendered and "<script" not in rendered
    assert "Where each copy went" in rendered and "Timeline of the transfer log" in rendered


def _export(c: Cluster, role: str, purpose: str = PURPOSE, location: str = PRIMARY, name: str | None = None):
    stub = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, role, location, name))
    return stub.ExportSubject(
        records_pb2.ExportSubjectRequest(context=ctx("", purpose), user_id=USER), timeout=30
    )


async def collect(call) -> records_pb2.ExportSubjectResponse:
    """The streamed export merged into one message, as the command does."""
    whole = records_pb2.ExportSubjectResponse()
    async for message in call:
        whole.MergeFrom(message)
    return whole


async def _refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await collect(call)
    return e.value


async def test_only_an_operator_or_a_service_allowed_the_purpose_may_export(held: Cluster):
    size = len(await held.log())
    # A reviewer reads the log, not the data.
    e = await _refused(_export(held, "reviewer"))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and permission_of(e) == "subjects.export"
    # billing's access policy does not let it state the purpose.
    e = await _refused(_export(held, "service", name="billing"))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and permission_of(e) == f"purpose {PURPOSE}"
    # A service that may state anything, stating another purpose.
    e = await _refused(_export(held, "service", purpose="essential.service"))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and PURPOSE in e.details()
    # A service located abroad, and one that claims to be at home while its certificate is not.
    e = await _refused(_export(held, "service", location=SG))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "located in cn-north" in e.details()
    stub = records_pb2_grpc.RecordServiceStub(held.channel(PRIMARY, "service", SG))
    lie = stub.ExportSubject(
        records_pb2.ExportSubjectRequest(context=ctx(PRIMARY, PURPOSE), user_id=USER), timeout=30
    )
    assert (await _refused(lie)).code() == grpc.StatusCode.PERMISSION_DENIED
    # Each refusal is logged against the user (the false location as a remote read), and
    # none exported anything.
    refused = [json.loads(e) for _, e, _ in (await held.log())[size:]]
    assert [(e["kind"], e["subject"], e["outcome"]) for e in refused] == [("access", USER, "denied")] * 4 + [
        ("remote_read", USER, "denied")
    ]
    # A service acting for the user, with the purpose its policy allows, is answered.
    reply = await collect(_export(held, "service"))
    assert reply.record.user_id == USER and reply.record.fields["email"].string_value == VALUES["email"]
    assert len(reply.proofs) == len(reply.entries) and reply.checkpoint.tree_size >= reply.log_sequence
    assert "password" not in reply.record.fields


async def test_bad_requests_get_a_clear_status_and_change_nothing(held: Cluster):
    stub = records_pb2_grpc.RecordServiceStub(held.channel(PRIMARY, "operator"))

    def ask(user: str, region: str = PRIMARY):
        s = (
            stub
            if region == PRIMARY
            else records_pb2_grpc.RecordServiceStub(held.channel(region, "operator", PRIMARY))
        )
        return s.ExportSubject(
            records_pb2.ExportSubjectRequest(context=ctx("", PURPOSE), user_id=user), timeout=30
        )

    size = len(await held.log())
    assert (await _refused(ask("nobody-here"))).code() == grpc.StatusCode.NOT_FOUND
    assert (await _refused(ask("not a user id!"))).code() == grpc.StatusCode.INVALID_ARGUMENT
    e = await _refused(ask(USER, SG))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "primary" in e.details()
    assert len(await held.log()) == size


# ---- the folder on disk ----------------------------------------------------------------------


async def test_the_export_is_readable_by_its_owner_only_whatever_the_umask(held: Cluster, tmp_path: Path):
    """The command runs under umask 077; the archive does not count on it."""
    from residency.server.vault import subject_archive

    reply = await collect(_export(held, "operator"))
    out = tmp_path / "export"
    umask = os.umask(0o022)
    try:
        subject_archive.write(out, reply, True)
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o700
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"record.json", "entries.jsonl", "index.html", "rules.json"}
    for p in [*files, tmp_path / "export.zip"]:
        assert p.stat().st_mode & 0o777 == 0o600, p.name


async def test_a_folder_that_is_not_empty_is_refused_before_anything_is_exported(
    held: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "out"
    (out / "x-2-export").mkdir(parents=True)
    (out / "x-2-export" / "record.json").write_text('{"user_id": "x-2"}')
    size = len(await held.log())
    code, stdout, err = await run(
        capsys, "subject", "export", *held.target("operator"), USER, "--out", str(out)
    )
    assert code == 2 and stdout == "" and "not empty" in err, err
    assert len(await held.log()) == size  # the node was not asked
    assert [p.name for p in out.rglob("*")] == ["x-2-export", "record.json"]


async def test_an_answer_that_does_not_verify_leaves_nothing_on_disk(held: Cluster, tmp_path: Path):
    from residency.server.vault import subject_archive

    reply = await collect(_export(held, "operator"))
    reply.entries[0].entry_json = reply.entries[0].entry_json.replace('"allowed"', '"denied"')
    out = tmp_path / "export"
    with pytest.raises(subject_archive.ArchiveError, match="not in the signed tree"):
        subject_archive.write(out, reply, True)
    assert not out.exists() and not (tmp_path / "export.zip").exists()


# ---- the export commits to the whole set -----------------------------------------------------


def _without(exported: Path, tmp_path: Path, drop) -> Path:
    """The export with the entries `drop(entry)` picks removed, and copies.json rebuilt from
    what is left, as anyone can with the public `copies`."""
    from residency.server.core.report import subject as page

    d = tmp_path / "thinned"
    shutil.copytree(exported, d)
    lines = [json.loads(line) for line in (d / "entries.jsonl").read_text().splitlines()]
    kept = [line for line in lines if not drop(json.loads(line["entry"]))]
    assert len(kept) < len(lines)
    (d / "entries.jsonl").write_text("".join(json.dumps(line) + "\n" for line in kept))
    rows = [json.loads(line["entry"]) for line in kept]
    (d / "copies.json").write_text(json.dumps(page.copies(rows, read(d, "rules.json")["rules"])))
    return d


@pytest.mark.parametrize(
    "drop",
    [
        # The transfer to Ireland hidden: its replication entries, and the copy they made.
        lambda e: e["kind"] == "replication" and e["destination_region"] == IE,
        # The disclosure to the court.
        lambda e: e["kind"] == "disclosure",
    ],
)
async def test_an_export_with_entries_removed_fails_verify(
    exported: Path, log_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], drop
):
    d = _without(exported, tmp_path, drop)
    code, out, err = await run(capsys, "subject", "verify", str(d), "--key", str(log_key))
    assert code == 1 and out == "" and "entries before the export's own" in err, err


async def test_an_export_with_its_rules_edited_fails_verify(
    exported: Path, log_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """retention_days and safeguards come from rules.json, which the export's entry commits to."""

    def shorter(text: str) -> str:
        doc = json.loads(text)
        for rule in doc["rules"]:
            rule["retention_days"] = 30
            rule["safeguards"] = []
        return json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=True) + "\n"

    d = _tamper(exported, tmp_path, "rules.json", shorter)
    from residency.server.core.report import subject as page

    rows = [json.loads(json.loads(line)["entry"]) for line in (d / "entries.jsonl").read_text().splitlines()]
    (d / "copies.json").write_text(json.dumps(page.copies(rows, read(d, "rules.json")["rules"])))
    code, out, err = await run(capsys, "subject", "verify", str(d), "--key", str(log_key))
    assert code == 1 and out == "" and "rules.json is not the rules file" in err, err


async def test_the_exports_entry_commits_to_the_entries_before_it_and_the_rules(exported: Path):
    import hashlib

    from residency.server.core import merkle

    own = read(exported, "record.json")["export"]["log_sequence"]
    lines = [json.loads(line) for line in (exported / "entries.jsonl").read_text().splitlines()]
    (entry,) = [json.loads(x["entry"]) for x in lines if json.loads(x["entry"])["sequence"] == own]
    earlier = [x["entry"].encode() for x in lines if json.loads(x["entry"])["sequence"] < own]
    assert entry["export"] == {
        "earlier_entries": len(earlier),
        "earlier_sha256": hashlib.sha256(b"".join(merkle.leaf_hash(e) for e in earlier)).hexdigest(),
        "rules_sha256": hashlib.sha256((exported / "rules.json").read_bytes()).hexdigest(),
    }
    assert len(earlier) >= 5


# ---- an id erased and given out again ----------------------------------------------------------


def _grants_naming(c: Cluster, user: str) -> int:
    with sqlite3.connect(c.data_dir(PRIMARY) / "node.db") as db:
        return db.execute("SELECT count(*) FROM grant_users WHERE user_id=?", (user,)).fetchone()[0]


async def test_an_erased_then_recreated_ids_export_holds_nothing_of_the_previous_person(
    held: Cluster, log_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    reused, before = "x-9", {"name": "Wang Fang", "email": "wang.fang@example.cn", "phone": "+8613700137000"}
    await held.consent(reused, "marketing.communications", "ie-affiliate")
    await held.grant([reused], ["user.behavior.browsing_history"], recipient="sg-affiliate")
    await held.put(reused, {**before, "pages_visited": ["/cart"]})
    await held.disclose(
        reused,
        disclosure_pb2.DISCLOSURE_GROUND_JUDICIAL_OR_ADMINISTRATIVE_REQUEST,
        third_party="Chaoyang District Court",
        reference="case-previous-holder",
    )
    await held.replicated()
    assert "phone" in (await held.held(reused, IE)).record.fields  # under the consent
    assert _grants_naming(held, reused) == 1
    await held.delete(reused)
    erased = [
        e
        for e in await entries(held, kind="erasure", subject=reused)
        if e["destination_region"] == e["source_region"] == PRIMARY
    ]
    assert [e["outcome"] for e in erased] == ["allowed"]
    now = {
        "name": "Zhao Lei",
        "email": "zhao.lei@example.cn",
        "phone": "+8613600136000",
        "pages_visited": ["/"],
    }
    await held.put(reused, now)
    await held.replicated()
    # The previous holder's consent and grant do not carry over to the new person's copies.
    assert "phone" not in (await held.held(reused, IE)).record.fields
    assert _grants_naming(held, reused) == 0

    out = tmp_path / "reused"
    code, _, err = await run(capsys, "subject", "export", *held.target("operator"), reused, "--out", str(out))
    assert code == 0, err
    assert read(out, "consents.json") == [] and read(out, "disclosures.json") == []
    rows = [json.loads(json.loads(x)["entry"]) for x in (out / "entries.jsonl").read_text().splitlines()]
    assert rows and all(r["sequence"] > erased[0]["sequence"] for r in rows)
    assert "consent" not in {r["kind"] for r in rows} and "disclosure" not in {r["kind"] for r in rows}
    for path in [p for p in out.rglob("*") if p.is_file()]:
        text = path.read_text()
        for old in ("Wang Fang", "wang.fang@example.cn", "Chaoyang", "case-previous-holder"):
            assert old not in text, (path.name, old)
    code, _, err = await run(capsys, "subject", "verify", str(out), "--key", str(log_key))
    assert code == 0, err
