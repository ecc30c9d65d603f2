"""The verifiable transfer log as reviewers use it, against real nodes: export, offline
verify (and every kind of tampering it must catch), proofs, queries and reports."""

from __future__ import annotations

import asyncio
import json
import shutil
from itertools import pairwise
from pathlib import Path

import grpc
import pytest

from residency.cli.main import main
from residency.server.core import merkle
from residency.server.core.checkpoint import Checkpoint, LogSigner, fingerprint, open_note
from residency.server.deployment import PRIMARY
from residency.v1 import translog_pb2
from tests.conftest import BACKENDS, Cluster


@pytest.fixture(params=BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return str(request.param)


USERS = [f"t-{i}" for i in range(12)]


@pytest.fixture(scope="module")
async def logged(module_cluster: Cluster) -> Cluster:
    """The shared deployment with consents, replications, allowed and denied cross-location
    reads."""
    c = module_cluster
    await c.consent(USERS[:2], "analytics.reporting", "ie-affiliate")
    for u in USERS:
        await c.put(u, {"name": "Li Wei", "email": f"{u}@example.cn", "language": "zh", "national_id": "X1"})
    await c.replicated()
    for u in USERS[:4]:
        await c.get(u, location="ap-southeast-1", purpose="essential.service")
    for u in USERS[4:6]:
        with pytest.raises(grpc.aio.AioRpcError):
            await c.get(u, location="eu-west-1", purpose="marketing.communications")
    return c


@pytest.fixture(scope="module")
def bundle_dir(logged: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "export"
    assert main(["log", "export", *logged.target("reviewer"), "--out", str(out)]) == 0
    return out


def tampered(bundle_dir: Path, tmp_path: Path, change) -> Path:
    d = tmp_path / "tampered"
    shutil.copytree(bundle_dir, d)
    lines = (d / "entries.jsonl").read_bytes().split(b"\n")[:-1]
    (d / "entries.jsonl").write_bytes(b"".join(line + b"\n" for line in change(lines)))
    return d


async def cli(*args: str) -> int:
    """The command in-process, off the event loop (it runs its own)."""
    return await asyncio.to_thread(main, list(args))


def verify(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["log", "verify", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_an_export_verifies_offline_from_index_0(bundle_dir: Path, capsys):
    lines = (bundle_dir / "entries.jsonl").read_bytes().split(b"\n")[:-1]
    assert [json.loads(x)["sequence"] for x in lines] == list(range(1, len(lines) + 1))
    kinds = {json.loads(x)["kind"] for x in lines}
    assert {"replication", "remote_read"} <= kinds
    code, out, err = verify(capsys, str(bundle_dir))
    assert code == 0, err
    result = json.loads(out)
    assert result["verified"] and result["tree_size"] == len(lines)
    assert result["signer"] == "residency/cn-north"
    assert (bundle_dir / "log.pub").read_text().startswith("residency/cn-north+")
    # Without a pinned key the first thing said is where the key came from, and whose it is.
    assert out.startswith('{"key": "taken from the bundle') and "WARNING" in err
    assert result["key_fingerprint"] == fingerprint((bundle_dir / "log.pub").read_text())


def test_a_pinned_key_verifies_given_as_text_or_as_a_file(logged: Cluster, bundle_dir: Path, capsys):
    pinned = logged.dep.directory / "keys" / PRIMARY / "log.pub"
    for key in (str(pinned), pinned.read_text().strip()):
        code, out, err = verify(capsys, str(bundle_dir), "--key", key)
        assert code == 0, err
        result = json.loads(out)
        assert result["key"] == "pinned" and result["key_fingerprint"] == fingerprint(pinned.read_text())
        assert "WARNING" not in err
    # The right key, but the reviewer expects another log: refused.
    code, _, err = verify(capsys, str(bundle_dir), "--key", str(pinned), "--origin", "residency/eu-west-1")
    assert code == 1 and "not 'residency/eu-west-1'" in err, err


def test_verify_names_a_modified_entry(bundle_dir: Path, tmp_path: Path, capsys):
    def modify(lines):
        lines[5] = (
            lines[5]
            .replace(b'"outcome":"allowed"', b'"outcome":"denied"')
            .replace(b'"outcome":"denied"', b'"outcome":"failed"')
        )
        return lines

    code, _, err = verify(capsys, str(tampered(bundle_dir, tmp_path, modify)))
    assert code == 1 and "index 5" in err, err


def test_verify_names_a_dropped_entry(bundle_dir: Path, tmp_path: Path, capsys):
    code, _, err = verify(capsys, str(tampered(bundle_dir, tmp_path, lambda ls: ls[:7] + ls[8:])))
    assert code == 1 and "index 7" in err, err


def test_verify_names_an_inserted_entry(bundle_dir: Path, tmp_path: Path, capsys):
    code, _, err = verify(capsys, str(tampered(bundle_dir, tmp_path, lambda ls: ls[:3] + [ls[9]] + ls[3:])))
    assert code == 1 and "index 3" in err, err


def test_verify_names_reordered_entries(bundle_dir: Path, tmp_path: Path, capsys):
    code, _, err = verify(
        capsys, str(tampered(bundle_dir, tmp_path, lambda ls: ls[:10] + [ls[11], ls[10]] + ls[12:]))
    )
    assert code == 1 and "index 10" in err, err


def test_verify_names_the_entry_even_when_the_leaf_hashes_were_rewritten_too(
    bundle_dir: Path, tmp_path: Path, capsys
):
    d = tampered(bundle_dir, tmp_path, lambda ls: ls[:2] + ls[3:])
    lines = (d / "entries.jsonl").read_bytes().split(b"\n")[:-1]
    (d / "leaf-hashes").write_text("".join(merkle.leaf_hash(x).hex() + "\n" for x in lines))
    code, _, err = verify(capsys, str(d))
    assert code == 1 and "index 2" in err, err


def test_verify_refuses_a_forged_checkpoint(bundle_dir: Path, tmp_path: Path, capsys):
    d = tmp_path / "forged"
    shutil.copytree(bundle_dir, d)
    # A checkpoint over the same entries, signed by a key that is not the log's.
    body = (d / "checkpoint").read_text().split("\n\n")[0]
    origin, size, _root = body.split("\n")
    forger = LogSigner.new(origin)
    lines = (d / "entries.jsonl").read_bytes().split(b"\n")[:-1]
    forged_root = merkle.root([merkle.leaf_hash(x) for x in lines[:-1]])
    (d / "checkpoint").write_text(forger.sign(Checkpoint(origin, int(size), forged_root)))
    code, _, err = verify(capsys, str(d))
    assert code == 1 and "checkpoint" in err and "no signature" in err, err
    # A careful forger: drops the last two entries, re-signs the shorter tree with a key of the
    # same name and ships that key as log.pub. The bundle is consistent with itself, so without
    # a pinned key it verifies, but says the key was the bundle's and shows the forger's
    # fingerprint; against the key the reviewer pinned it fails.
    kept = lines[:-2]
    (d / "entries.jsonl").write_bytes(b"".join(x + b"\n" for x in kept))
    (d / "leaf-hashes").write_text("".join(merkle.leaf_hash(x).hex() + "\n" for x in kept))
    kept_root = merkle.root([merkle.leaf_hash(x) for x in kept])
    (d / "checkpoint").write_text(forger.sign(Checkpoint(origin, len(kept), kept_root)))
    (d / "log.pub").write_text(forger.verifier_key + "\n")
    code, out, err = verify(capsys, str(d))
    assert code == 0 and json.loads(out)["key_fingerprint"] == fingerprint(forger.verifier_key), err
    assert json.loads(out)["key_fingerprint"] != fingerprint((bundle_dir / "log.pub").read_text())
    code, _, err = verify(capsys, str(d), "--key", str(bundle_dir / "log.pub"))
    assert code == 1 and "no signature" in err, err
    shutil.rmtree(d)
    shutil.copytree(bundle_dir, d)
    # The log's own signature line kept, but over an altered body: the signature fails.
    original = (bundle_dir / "checkpoint").read_text()
    (d / "checkpoint").write_text(original.replace(f"\n{size}\n", f"\n{int(size) - 1}\n", 1))
    code, _, err = verify(capsys, str(d))
    assert code == 1 and "forged or altered" in err, err


async def test_two_checkpoints_are_consistent_and_the_log_only_grows(
    logged: Cluster, bundle_dir: Path, tmp_path: Path, capsys
):
    stub = logged.transfer_log()
    first = await stub.GetCheckpoint(translog_pb2.GetCheckpointRequest(refresh=True), timeout=30)
    await logged.get(USERS[0], location="ap-southeast-1", purpose="essential.service")
    second = await stub.GetCheckpoint(translog_pb2.GetCheckpointRequest(refresh=True), timeout=30)
    assert second.tree_size > first.tree_size
    proof = await stub.ProveConsistency(
        translog_pb2.ProveConsistencyRequest(from_size=first.tree_size, tree_size=second.tree_size),
        timeout=30,
    )
    merkle.verify_consistency(
        first.tree_size, second.tree_size, first.root_hash, second.root_hash, list(proof.hashes)
    )
    later = tmp_path / "later"
    assert await cli("log", "export", *logged.target("reviewer"), "--out", str(later)) == 0
    previous = tmp_path / "previous.checkpoint"
    previous.write_text(first.checkpoint)
    code, out, err = verify(capsys, str(later), "--previous", str(previous))
    assert code == 0, err
    assert json.loads(out)["consistent_with"]["tree_size"] == first.tree_size
    # A later bundle whose history was rewritten before the old checkpoint is caught.
    d = tampered(later, tmp_path, lambda ls: [ls[0].replace(b'"kind"', b'"kind" ')] + ls[1:])
    code, _, err = verify(capsys, str(d), "--previous", str(previous))
    assert code == 1 and "index 0" in err, err


async def test_prove_prints_an_inclusion_proof_that_verifies(logged: Cluster, capsys):
    stub = logged.transfer_log()
    cp = await stub.GetCheckpoint(translog_pb2.GetCheckpointRequest(), timeout=30)
    size, index = cp.tree_size, cp.tree_size // 2
    capsys.readouterr()
    target = logged.target("reviewer")
    assert await cli("log", "prove", *target, "--index", str(index), "--size", str(size)) == 0
    proof = json.loads(capsys.readouterr().out)
    assert proof["leaf_index"] == index and proof["tree_size"] == size
    entries = [e async for e in stub.TailEntries(translog_pb2.TailEntriesRequest(), timeout=30)]
    leaf = merkle.leaf_hash(entries[index].entry_json.encode())
    merkle.verify_inclusion(index, size, leaf, [bytes.fromhex(h) for h in proof["hashes"]], cp.root_hash)
    assert await cli("log", "prove", *target, "--from", "3", "--size", str(size)) == 0
    c = json.loads(capsys.readouterr().out)
    merkle.verify_consistency(
        3,
        size,
        merkle.root([merkle.leaf_hash(e.entry_json.encode()) for e in entries[:3]]),
        cp.root_hash,
        [bytes.fromhex(h) for h in c["hashes"]],
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ProveInclusion(
            translog_pb2.ProveInclusionRequest(leaf_index=size, tree_size=size), timeout=30
        )
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_verify_proof_checks_what_prove_prints_against_the_pinned_key(
    logged: Cluster, tmp_path: Path, capsys
):
    key = str(logged.dep.directory / "keys" / PRIMARY / "log.pub")
    stub = logged.transfer_log()
    old = await stub.GetCheckpoint(translog_pb2.GetCheckpointRequest(refresh=True), timeout=30)
    (tmp_path / "old").write_text(old.checkpoint)
    await logged.get(USERS[1], location="ap-southeast-1", purpose="essential.service")
    await stub.GetCheckpoint(translog_pb2.GetCheckpointRequest(refresh=True), timeout=30)

    async def prove(name: str, *args: str) -> Path:
        capsys.readouterr()
        assert await cli("log", "prove", *logged.target("reviewer"), *args) == 0
        (tmp_path / name).write_text(capsys.readouterr().out)
        return tmp_path / name

    def check(proof: Path, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["log", "verify-proof", str(proof), "--key", key, *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    inclusion = await prove("inclusion.json", "--index", "4")
    code, out, err = check(inclusion)
    assert code == 0, err
    assert json.loads(out)["entry"]["sequence"] == 5 and json.loads(out)["key"] == "pinned"
    consistency = await prove("consistency.json", "--from", str(old.tree_size))
    code, out, err = check(consistency, "--from-checkpoint", str(tmp_path / "old"))
    assert code == 0 and json.loads(out)["from_size"] == old.tree_size, err
    # A liar: another entry put in the proof, a hash changed, a forger's key, no older checkpoint.
    doc = json.loads(inclusion.read_text())
    lie = tmp_path / "lie.json"
    lie.write_text(json.dumps({**doc, "entry": doc["entry"].replace('"kind":"', '"kind":"x')}))
    assert check(lie)[0] == 1
    lie.write_text(json.dumps({**doc, "hashes": ["00" * 32, *doc["hashes"][1:]]}))
    code, _, err = check(lie)
    assert code == 1 and "FAILED" in err, err
    forger = LogSigner.new("residency/cn-north")
    capsys.readouterr()
    assert main(["log", "verify-proof", str(inclusion), "--key", forger.verifier_key]) == 1
    assert "no signature" in capsys.readouterr().err
    code, _, err = check(consistency)
    assert code == 1 and "--from-checkpoint" in err, err


async def test_query_filters_and_pages(logged: Cluster):
    stub = logged.transfer_log()

    async def query(**kw) -> tuple[list[dict], list[str]]:
        entries, tokens = [], []
        async for page in stub.Query(translog_pb2.QueryRequest(**kw), timeout=30):
            entries += [json.loads(e.entry_json) for e in page.entries]
            tokens.append(page.next_page_token)
        return entries, tokens

    denied, _ = await query(outcome="denied")
    assert {e["subject"] for e in denied} == set(USERS[4:6])
    assert all(e["destination_region"] == "eu-west-1" for e in denied)
    mine, _ = await query(subject=USERS[1])
    assert {e["kind"] for e in mine} >= {"replication", "remote_read"}
    contract, _ = await query(legal_basis="contract", kind="replication", region="ap-southeast-1")
    assert contract and all(e["destination_region"] == "ap-southeast-1" for e in contract)
    everything, _ = await query()
    paged, tokens = await query(page_size=5)
    assert paged == everything and len(tokens) > 2 and tokens[-1] == ""
    first, tokens = await query(limit=7)
    assert len(first) == 7 and tokens[-1]
    rest, _ = await query(page_token=tokens[-1])
    assert first + rest == everything


async def test_subject_report_names_recipients(logged: Cluster):
    r = await logged.transfer_log().SubjectReport(
        translog_pb2.SubjectReportRequest(subject=USERS[2]), timeout=30
    )
    assert r.entries and all(json.loads(e.entry_json)["subject"] == USERS[2] for e in r.entries)
    ids = {x.id: x for x in r.recipients}
    assert ids["sg-affiliate"].company == "Example Holdings Pte. Ltd."
    assert ids["sg-affiliate"].contact == "dpo@example.sg"
    assert open_note(r.checkpoint.checkpoint, r.checkpoint.verifier_key).size == r.checkpoint.tree_size


async def test_a_region_node_keeps_and_signs_its_own_log(logged: Cluster):
    region = "ap-southeast-1"
    await logged.get(USERS[3], region=region)  # a local read: logged there too
    cp = await logged.transfer_log(region).GetCheckpoint(
        translog_pb2.GetCheckpointRequest(refresh=True), timeout=30
    )
    assert cp.verifier_key.startswith(f"residency/{region}+")
    assert open_note(cp.checkpoint, cp.verifier_key).origin == f"residency/{region}"
    log = await logged.log(region)
    assert cp.tree_size == len(log) >= 1


ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


async def test_the_html_report_is_self_contained_and_renders_in_chromium(logged: Cluster, tmp_path: Path):
    out = tmp_path / "report.html"
    target = logged.target("reviewer", key_flag="--client-key")
    assert await cli("log", "report", *target, "--out", str(out), "--subject", USERS[0]) == 0
    page = out.read_text()
    for needle in (
        "verified",
        "residency/cn-north",
        "Example Holdings Pte. Ltd.",
        "dpo@example.ie",
        "Singapore",
        "100,000",
        f"Where did the data of {USERS[0]} go?",
        "<svg",
    ):
        assert needle in page, needle
    assert "national_id (never_transfer)" in page  # what was withheld, and why
    assert "Li Wei" not in page and "@example.cn" not in page  # no field values, ever
    for external in ("http://", "https://", "<script", "<link", "src="):
        assert external not in page.replace('xmlns="http://www.w3.org/2000/svg"', ""), external
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "transfer-log-report.png"
    shot.unlink(missing_ok=True)
    proc = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        out.as_uri(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    shutil.copy(out, ARTIFACTS / "transfer-log-report.html")


async def test_the_report_also_comes_as_csv_and_json_lines(logged: Cluster, tmp_path: Path):
    target = logged.target("reviewer", key_flag="--client-key")
    csv_out, jsonl_out = tmp_path / "r.csv", tmp_path / "r.jsonl"
    assert await cli("log", "report", *target, "--out", str(csv_out), "--format", "csv") == 0
    assert (
        await cli(
            "log",
            "report",
            *target,
            "--out",
            str(jsonl_out),
            "--format",
            "jsonl",
            "--subject",
            USERS[1],
        )
        == 0
    )
    header, *rows = csv_out.read_text().splitlines()
    assert header.startswith("sequence,leaf_index,time,kind,subject")
    assert any(",denied," in r for r in rows)
    lines = [json.loads(x) for x in jsonl_out.read_text().splitlines()]
    assert lines and {x["subject"] for x in lines} == {USERS[1]}


def test_the_report_builds_offline_from_a_bundle_checked_with_the_pinned_key(
    logged: Cluster, bundle_dir: Path, tmp_path: Path, capsys
):
    pinned = str(logged.dep.directory / "keys" / PRIMARY / "log.pub")
    out = tmp_path / "offline.html"
    capsys.readouterr()
    assert main(["log", "report", "--bundle", str(bundle_dir), "--key", pinned, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpoint_verified"] is True
    page = out.read_text()
    assert "Example Holdings Pte. Ltd." in page and "Singapore" in page  # the bundle's context.json
    # A bundle whose entries were rewritten (and re-signed by a forger) reports it unverified.
    d = tampered(bundle_dir, tmp_path, lambda ls: ls[:-1])
    forger = LogSigner.new("residency/cn-north")
    root = merkle.root([merkle.leaf_hash(x) for x in (d / "entries.jsonl").read_bytes().split(b"\n")[:-1]])
    (d / "checkpoint").write_text(
        forger.sign(Checkpoint("residency/cn-north", summary["tree_size"] - 1, root))
    )
    (d / "log.pub").write_text(forger.verifier_key + "\n")
    assert main(["log", "report", "--bundle", str(d), "--key", pinned, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint_verified"] is False
    # Offline needs the key the reviewer trusts; and either a node or a bundle.
    assert main(["log", "report", "--bundle", str(bundle_dir), "--out", str(out)]) == 2
    assert main(["log", "report", "--out", str(out)]) == 2


async def test_an_export_window_keeps_every_entry_and_records_the_window(
    logged: Cluster, tmp_path: Path, capsys
):
    out = tmp_path / "window"
    target = logged.target("reviewer")
    assert await cli("log", "export", *target, "--out", str(out), "--since", "2999-01-01") == 0
    window = json.loads((out / "window.json").read_text())
    assert window["entries"] == 0 and window["first_index"] is None
    code, printed, err = verify(capsys, str(out))
    assert code == 0, err
    result = json.loads(printed)
    assert result["tree_size"] == len((out / "entries.jsonl").read_bytes().splitlines()) > 0
    assert result["window"]["entries"] == 0


async def test_a_node_signs_checkpoints_at_its_interval_and_archives_them(
    idle_cluster: Cluster, s3_server, tmp_path: Path
):
    import yaml
    from botocore.exceptions import ClientError

    from residency.server.config.node import ArchiveConfig
    from residency.server.vault.archive import S3Bucket

    config = idle_cluster.dep.configs[PRIMARY]
    doc = yaml.safe_load(config.read_text())
    archive = {
        "bucket": "node-archive",
        "endpoint": s3_server.endpoint,
        "access_key_id": "test",
        "secret_access_key": "test",
        "interval_seconds": 0.2,
        "retention_days": 1,
    }
    config.write_text(yaml.safe_dump({**doc, "checkpoint_interval_seconds": 0.2, "archive": archive}))
    await idle_cluster.start(PRIMARY)
    await idle_cluster.put("w-1", {"name": "Li Wei", "language": "zh"})
    await idle_cluster.get("w-1", location="ap-southeast-1", purpose="essential.service")
    stub = idle_cluster.transfer_log()
    bucket = S3Bucket(ArchiveConfig(**archive))
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # no refresh: only the node's own schedule can have signed these
        cp = await stub.GetCheckpoint(translog_pb2.GetCheckpointRequest(), timeout=10)
        try:
            keys = await asyncio.to_thread(bucket.keys, "translog/residency/cn-north/checkpoints/")
        except ClientError:  # the node has not created its bucket yet
            keys = []
        if cp.tree_size >= 1 and keys:
            break
        assert asyncio.get_running_loop().time() < deadline, (cp.tree_size, keys)
        await asyncio.sleep(0.1)
    assert open_note(cp.checkpoint, cp.verifier_key).size == cp.tree_size


async def test_entry_times_never_go_backwards_along_the_sequence(cluster: Cluster, tmp_path: Path):
    """The replicator (copies prepared, shipped, then committed) and the servicers (reads,
    consents) append at once; every entry's time is stamped when it is appended, so a
    reviewer filtering an export by time misses nothing."""
    users = [f"o-{i}" for i in range(30)]
    fields = {"name": "Li Wei", "email": "o@example.cn", "language": "zh"}
    for u in users:
        await cluster.put(u, fields)
    await cluster.replicated()
    writing = asyncio.Event()

    async def write() -> None:
        try:
            for n in range(6):
                for u in users:
                    await cluster.put(u, {**fields, "language": f"zh-{n}"})
        finally:
            writing.set()

    async def read(i: int) -> None:
        while not writing.is_set():
            await cluster.get(users[i], location="ap-southeast-1", purpose="essential.service")
            await cluster.consent(users[i], "analytics.reporting", "ie-affiliate", withdraw=i % 2 == 0)

    await asyncio.gather(write(), *(read(i) for i in range(3)))
    await cluster.replicated()
    out = tmp_path / "export"
    assert await cli("log", "export", *cluster.target("reviewer"), "--out", str(out)) == 0
    entries = [json.loads(x) for x in (out / "entries.jsonl").read_bytes().splitlines()]
    kinds = [e["kind"] for e in entries]
    # The appends did interleave: servicers' entries sit between the replicator's.
    between = kinds[kinds.index("replication") : len(kinds) - kinds[::-1].index("replication")]
    assert {"remote_read", "consent"} <= set(between)
    backwards = [(a["sequence"], a["time"], b["time"]) for a, b in pairwise(entries) if a["time"] > b["time"]]
    assert not backwards, f"{len(backwards)} entries are older than the one before them: {backwards[:5]}"
