"""The local Compose stack (`deploy/compose.yaml`): it validates against the Compose
Specification's JSON Schema; every command it gives the image is one the CLI takes; every
file it mounts exists once `residency init DIR --compose` has run; its regions, roles, ports
and mounts agree with the node configs it carries; no secret is written into it. Then its
services run natively as their containers would (no container runtime is reachable here:
`tests/container.py` gives each a mount namespace, read-only but for its volumes, as the
image's user; only addresses are rewritten to loopback ports): the key bootstrap against a
real OpenBao dev server, SeaweedFS with the stack's identity file, the three nodes and the
standalone worker, each node's own healthcheck; a user written to the primary arrives in a
region."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import httpx
import jsonschema
import pytest
import yaml
from cryptography import x509

from residency.cli.main import build_parser
from residency.server.bootstrap import COMPOSE_SECRETS
from residency.server.config.node import NodeFile
from residency.server.deployment import AFFILIATES, PRIMARY, free_ports
from residency.v1 import common_pb2, records_pb2, records_pb2_grpc
from tests.conftest import BAO_TOKEN
from tests.container import Image, run_natively
from tests.harness import Deployment

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
BIN = Path(sys.executable).parent
REGIONS = (PRIMARY, *AFFILIATES)
NODE_CONFIG = "/etc/residency/node.yaml"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def ours(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the residency image (built from deploy/Dockerfile)."""
    return {
        n: s
        for n, s in doc["services"].items()
        if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def mounts(doc: dict[str, Any], service: dict[str, Any]) -> dict[str, Path]:
    """Path in the container -> the file (relative to deploy/) of each config and secret."""
    out = {}
    for kind in ("configs", "secrets"):
        for m in service.get(kind, []):
            target = m["target"] if m["target"].startswith("/") else f"/run/secrets/{m['target']}"
            out[target] = Path(doc[kind][m["source"]]["file"])
    return out


def node_config(doc: dict[str, Any], service: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / mounts(doc, service)[NODE_CONFIG]).read_text())


def port(host_port: str) -> int:
    return int(host_port.rpartition(":")[2])


def test_the_file_validates_against_the_compose_specification():
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    doc = compose()
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    # The validator does refuse what Compose would: a misspelt key, a condition it lacks.
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"][PRIMARY]["helthcheck"] = broken["services"][PRIMARY].pop("healthcheck")
    broken["services"]["replicator"]["depends_on"][PRIMARY]["condition"] = "service_up"
    found = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(broken)]
    assert any("'helthcheck' was unexpected" in e for e in found), found
    assert any(e.startswith("$.services.replicator.depends_on") for e in found), found


def test_every_command_is_one_the_image_and_the_cli_take():
    doc, image = compose(), Image.read(DEPLOY / "Dockerfile")
    assert image.entrypoint == ["residency"]
    parser = build_parser()
    for name, service in ours(doc).items():
        args = parser.parse_args(service["command"])  # exits 2 on anything the CLI refuses
        assert args.command in ("serve", "replicate", "keys"), name
        if "healthcheck" in service:  # `CMD residency ...`: the image's program
            check = parser.parse_args(service["healthcheck"]["test"][2:])
            assert service["healthcheck"]["test"][1] == image.entrypoint[0] and check.command == "health"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert "user" not in service, f"{name} runs as the image's user"
    # Every node is started by its key bootstrap, which OpenBao's Transit engine precedes.
    for region in REGIONS:
        needs = doc["services"][region]["depends_on"]
        assert needs[f"keys-{region}"] == {"condition": "service_completed_successfully"}
        assert doc["services"][f"keys-{region}"]["command"][:2] == ["keys", "init"]
    assert doc["services"][f"keys-{PRIMARY}"]["depends_on"]["openbao-transit"] == {
        "condition": "service_completed_successfully"
    }
    assert doc["services"]["replicator"]["depends_on"][PRIMARY] == {"condition": "service_healthy"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/ with `residency init local --compose` run in it, as the docs say."""
    root = tmp_path_factory.mktemp("stack") / "deploy"
    root.mkdir()
    shutil.copy2(COMPOSE, root / "compose.yaml")
    shutil.copytree(DEPLOY / "compose", root / "compose")
    out = subprocess.run(
        [BIN / "residency", "init", root / "local", "--compose"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return root


def test_every_file_it_mounts_exists_after_init_and_each_is_declared_once(deployment: Path):
    doc = compose()
    for kind in ("configs", "secrets"):
        for name, entry in doc[kind].items():
            assert set(entry) == {"file"}, f"{kind}.{name}: from a file, never inline"
            assert (deployment / entry["file"]).is_file(), f"{kind}.{name}: {entry['file']}"
        entries = [m for s in doc["services"].values() for m in s.get(kind, [])]
        used = {m if isinstance(m, str) else m["source"] for m in entries}
        assert used == set(doc[kind]), f"{kind}: used but undeclared, or declared but unused"
    # What is private (keys, passphrases, the token, the S3 key pair) is only ever a secret;
    # configs are node configs, policy files and public keys.
    assert all(e["file"].endswith((".yaml", ".pub")) for e in doc["configs"].values())
    assert set(COMPOSE_SECRETS) <= {Path(e["file"]).name for e in doc["secrets"].values()}


def test_regions_roles_ports_and_mounts_agree_with_the_node_configs(deployment: Path):
    doc = compose()
    services = ours(doc)
    rules = yaml.safe_load((deployment / "local" / "rules.yaml").read_text())
    for region in REGIONS:
        service = services[region]
        config = node_config(doc, service)
        node = NodeFile.model_validate(config)  # as `residency serve` reads it
        # The service's name is the region and the host name its certificate names.
        assert node.region == region and (node.role == "primary") == (region == rules["home_region"])
        cert = x509.load_pem_x509_certificate((deployment / "local" / "pki" / f"{region}.crt").read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert region in names.get_values_for_type(x509.DNSName)
        # Ports: the mutual-TLS one published on loopback only, and no plaintext one: the
        # healthcheck asks that port with the node's own certificate, from the mounted config.
        assert [p.rpartition(":")[2] for p in service["ports"]] == [str(port(node.listen))]
        assert all(p.startswith("127.0.0.1:") for p in service["ports"])
        assert "health" not in config
        assert service["healthcheck"]["test"] == ["CMD", "residency", "health", "--config", NODE_CONFIG]
        # The keys bootstrap reads the same config and writes the same volume.
        keys = services[f"keys-{region}"]
        assert mounts(doc, keys)[NODE_CONFIG] == mounts(doc, service)[NODE_CONFIG]
        assert keys["volumes"] == service["volumes"]
        # Every absolute path the config names is mounted: read-only files, or the volume.
        volume = {v.split(":")[1] for v in service["volumes"]}
        (data,) = volume
        assert node.data_dir.startswith(data + "/") and node.keys.dir.startswith(data + "/")
        named = [node.tls.cert, node.tls.key, node.tls.ca]
        named += [
            getattr(node.keys, k) for k in ("passphrase_file", "token_file") if getattr(node.keys, k, None)
        ]
        named += [a.public_key for a in node.affiliates] + ([node.home.signing_key] if node.home else [])
        for path in named:
            assert path in mounts(doc, service), f"{region}: {path} is not mounted"
        for rel in (node.schema_, node.rules, node.access):
            assert str(PurePosixPath(NODE_CONFIG).parent / rel) in mounts(doc, service)
    primary = NodeFile.model_validate(node_config(doc, services[PRIMARY]))
    # The primary dials each region node by its service name, on the port that node listens on.
    for a in primary.affiliates:
        theirs = NodeFile.model_validate(node_config(doc, services[a.region]))
        assert a.address == f"{a.region}:{port(theirs.listen)}"
        assert mounts(doc, services[PRIMARY])[a.public_key].as_posix().endswith(f"keys/{a.region}/region.pub")
    for r in AFFILIATES:
        home = NodeFile.model_validate(node_config(doc, services[r])).home
        assert home is not None and home.region == PRIMARY
        assert mounts(doc, services[r])[home.signing_key].as_posix().endswith(f"keys/{PRIMARY}/copy.pub")
    # Its key service and archive are the stack's OpenBao and SeaweedFS.
    assert primary.keys.provider == "openbao" and primary.keys.address == "http://openbao:8200"
    assert primary.archive is not None and primary.archive.endpoint == "http://seaweedfs:8333"
    # The standalone worker: the primary's config and store.
    worker = services["replicator"]
    assert worker["command"][0] == "replicate" and worker["volumes"] == services[PRIMARY]["volumes"]
    assert mounts(doc, worker) == mounts(doc, services[PRIMARY])


# A secret written out: PEM, or a long random-looking value after a secret's name.
SECRET = re.compile(
    r"-----BEGIN|(?i:(secret|token|password|passphrase|access_key)[a-z_]*\s*[:=]\s*['\"]?"
    r"(?!/run/secrets/)[A-Za-z0-9+/=_-]{8,})"
)
SECRET_NAME = re.compile(r"(?i)secret|token|password|passphrase|private|access_key|credential")


def inlined_secrets(doc: Any, key: str = "") -> list[str]:
    """Every value in a loaded YAML document that is a secret itself rather than the path of
    a mounted one (comments are not values: they may say "token")."""
    if isinstance(doc, dict):
        return [f for k, v in doc.items() for f in inlined_secrets(v, str(k))]
    if isinstance(doc, list):
        return [f for v in doc for f in inlined_secrets(v, key)]
    if not isinstance(doc, str):
        return []
    # (a service's `secrets: [NAME]` lists the names of mounted secrets)
    named = bool(SECRET_NAME.search(key)) and key != "secrets" and not doc.startswith("/run/secrets/")
    return [f"{key}: {doc[:12]}..."] if named or SECRET.search(doc) else []


def test_no_secret_is_written_into_the_stack(deployment: Path):
    texts = {p.name: p.read_text() for p in (COMPOSE, *(DEPLOY / "compose").glob("*.yaml"))}
    for name, text in texts.items():
        assert "-----BEGIN" not in text, name
        assert not inlined_secrets(yaml.safe_load(text)), name
    # Nor any of the secrets of a real deployment (its tokens, keys and passphrases).
    local = deployment / "local"
    values = [(local / "compose" / f).read_text() for f in COMPOSE_SECRETS]
    values += [(local / "keys" / r / "passphrase").read_text() for r in AFFILIATES]
    for text in texts.values():
        for value in values:
            for line in value.splitlines():
                word = line.rpartition("=")[2].strip().strip('",')
                assert len(word) < 12 or word not in text
    # The check finds what it looks for, and passes a mounted secret's path.
    token = (local / "compose" / "openbao-token").read_text().strip()
    assert inlined_secrets({"environment": {"BAO_TOKEN": token}})
    assert inlined_secrets({"environment": ["VAULT_TOKEN=" + token]})
    assert inlined_secrets({"archive": {"secret_access_key": "abcdefgh12345678"}})
    assert inlined_secrets({"command": ["sh", "-c", f"bao login {token} && export BAO_TOKEN={token}"]})
    assert inlined_secrets({"x-ca": (local / "pki" / "ca.key").read_text()})
    assert not inlined_secrets({"keys": {"token_file": "/run/secrets/residency/key-provider"}})
    # Every node reads its secrets from files under /run/secrets, never from its environment.
    doc = compose()
    for name, service in ours(doc).items():
        if name in REGIONS:
            keys = node_config(doc, service)["keys"]
            assert "token_env" not in keys and "passphrase_env" not in keys


# ---- the stack's commands, run natively ------------------------------------------------------


class NativeStack:
    """The services of deploy/compose.yaml run as their containers would (`tests/container.py`:
    a mount namespace each, read-only but for the service's volumes, as the image's user),
    with their own commands and environment. Each service's configs and secrets are laid out
    under `root/SERVICE`, its volumes under `root/volumes` (shared as Compose shares them); its
    node config's addresses are rewritten to loopback ports here (its paths are the
    container's), service names to the port that service's node listens on."""

    def __init__(self, doc: dict[str, Any], deploy: Path, root: Path, addresses: dict[str, str]):
        self.doc, self.deploy, self.root = doc, deploy, root
        self.image = Image.read(DEPLOY / "Dockerfile")
        self.addresses = dict(addresses)  # "openbao:8200" -> "127.0.0.1:P", ...
        self.ports: dict[tuple[str, int], int] = {}  # (config, container port) -> host port
        self.procs: dict[str, subprocess.Popen] = {}
        self.volumes: dict[str, dict[str, tuple[Path, bool]]] = {}  # service -> its mounts

    def host_port(self, config: str, container_port: int) -> int:
        if (config, container_port) not in self.ports:
            (self.ports[config, container_port],) = free_ports(1)
        return self.ports[config, container_port]

    def lay_out(self, name: str) -> dict[str, tuple[Path, bool]]:
        """The service's mounts for `run_natively`: container folder -> (here, writable?)."""
        service = self.doc["services"][name]
        uid, gid = self.image.user
        folders: dict[str, Path] = {}
        for target, source in mounts(self.doc, service).items():
            parts = PurePosixPath(target).parts
            root = PurePosixPath(*parts[: 4 if parts[1:3] == ("run", "secrets") else 3])
            folders[str(root)] = here = self.root / name / str(root).lstrip("/")
            (here / PurePosixPath(target).relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.deploy / source, here / PurePosixPath(target).relative_to(root))
        if NODE_CONFIG in mounts(self.doc, service):
            source = mounts(self.doc, service)[NODE_CONFIG].name
            config = self.rewrite(source, node_config(self.doc, service))
            (folders["/etc/residency"] / "node.yaml").write_text(yaml.safe_dump(config))
        for root, here in folders.items():
            # Configs readable by all; secrets the image user's alone (as `chown` of the
            # files, or an ACL granting it, leaves them: docs/operators.md).
            if root.startswith("/run/secrets/"):
                subprocess.run(["chown", "-R", f"{uid}:{gid}", str(here)], check=True)
                subprocess.run(["chmod", "-R", "go-rwx", str(here)], check=True)
            else:
                subprocess.run(["chmod", "-R", "a+rX", str(here)], check=True)
        volumes = {root: (here, False) for root, here in folders.items()}
        for v in service.get("volumes", []):
            volume, target = v.split(":")[:2]
            here = self.root / "volumes" / volume
            here.mkdir(parents=True, exist_ok=True)
            os.chown(here, uid, gid)  # a new named volume takes the image's folder's owner
            volumes[target] = (here, True)
        return volumes

    def rewrite(self, source: str, config: Any) -> Any:
        if isinstance(config, dict):
            return {k: self.rewrite(source, v) for k, v in config.items()}
        if isinstance(config, list):
            return [self.rewrite(source, v) for v in config]
        if not isinstance(config, str):
            return config
        if config.startswith("0.0.0.0:"):
            return f"127.0.0.1:{self.host_port(source, port(config))}"
        for name, address in self.addresses.items():
            config = config.replace(name, address)
        return config

    def start(self, name: str) -> None:
        service = self.doc["services"][name]
        volumes = self.volumes[name] = self.lay_out(name)
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        self.procs[name] = run_natively(
            self.image, volumes, service["command"], self.root / f"{name}.log", env
        )

    def run(self, name: str) -> tuple[int, str]:
        """A one-shot service, to its end: its exit status and output."""
        self.start(name)
        code = self.procs.pop(name).wait(120)
        return code, (self.root / f"{name}.log").read_text(errors="replace")

    def healthcheck(self, name: str) -> bool:
        """The running service's own healthcheck command, run as Compose runs it: in the
        service's container (its mounts, its user), against its node config as laid out here."""
        service = self.doc["services"][name]
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        image = replace(self.image, entrypoint=test[1:], cmd=[])
        check = run_natively(image, self.volumes[name], [], self.root / f"{name}-health.log", env)
        return check.wait(60) == 0

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> dict[str, int]:
        for proc in self.procs.values():
            proc.terminate()
        return {name: proc.wait(60) for name, proc in self.procs.items()}


def keys_report(output: str) -> dict[str, Any]:
    """What `residency keys init` printed (among the JSON log lines the image writes)."""
    (report,) = [json.loads(line) for line in output.splitlines() if line.startswith('{"region"')]
    return report


def seaweedfs(doc: dict[str, Any], where: Path, identity: Path) -> tuple[subprocess.Popen, str]:
    """SeaweedFS with the stack's command (its identity file), on loopback ports of its own."""
    weed = shutil.which("weed") or str(BIN / "weed")
    command = [
        a.replace("/run/secrets/seaweedfs-s3.json", str(identity))
        for a in doc["services"]["seaweedfs"]["command"]
    ]
    p = free_ports(8)
    flags = [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
    ]
    argv = [
        weed,
        *command,
        f"-dir={where}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    argv += [f"-{f}={n}" for f, n in zip(flags, p, strict=True)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    log = open(where / "weed.log", "ab")  # noqa: SIM115 - handed to the child process
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), f"127.0.0.1:{p[6]}"


async def wait_for(check: Any, what: str, deadline: float, diagnose: Any = lambda: "") -> None:
    end = time.monotonic() + deadline
    while not await asyncio.to_thread(check):
        if time.monotonic() > end:
            pytest.fail(f"{what} within {deadline} s: {diagnose()}")
        await asyncio.sleep(0.2)  # polling interval, not synchronisation


@pytest.mark.skipif(
    shutil.which("unshare") is None
    or os.geteuid() != 0
    or not (shutil.which("weed") or (BIN / "weed").exists()),
    reason="mount namespaces need util-linux unshare and root, and SeaweedFS (`weed`) (CI has all)",
)
async def test_the_stacks_commands_run_a_user_into_a_region(tmp_path: Path, bao_address: str):
    started = time.monotonic()
    doc = compose()
    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY / "compose", deploy / "compose")
    out = subprocess.run(
        [BIN / "residency", "init", deploy / "local", "--compose"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    local = deploy / "local"
    # This machine's OpenBao dev server (the fixture) has its own root token.
    (local / "compose" / "openbao-token").write_text(BAO_TOKEN + "\n")
    (tmp_path / "weed").mkdir()
    weed, s3 = seaweedfs(doc, tmp_path / "weed", local / "compose" / "seaweedfs-s3.json")
    stack = NativeStack(
        doc,
        deploy,
        tmp_path / "stack",
        {"openbao:8200": bao_address.removeprefix("http://"), "seaweedfs:8333": s3},
    )
    for region in AFFILIATES:  # the primary dials each region node by its service name
        stack.addresses[f"{region}:8443"] = f"127.0.0.1:{stack.host_port(f'{region}.yaml', 8443)}"
    try:
        # openbao-transit: the stack's own command (the fixture enabled Transit already: it
        # must find it and succeed).
        transit = doc["services"]["openbao-transit"]["command"][0].replace("$$", "$")
        transit = transit.replace("/run/secrets/openbao-token", str(local / "compose" / "openbao-token"))
        env = {**os.environ, "BAO_ADDR": bao_address}
        t = subprocess.run(["/bin/sh", "-ec", transit], capture_output=True, text=True, env=env, timeout=60)
        assert t.returncode == 0, t.stderr
        # The key bootstraps; a second run changes nothing.
        for region in REGIONS:
            code, output = stack.run(f"keys-{region}")
            assert code == 0, output
            made = keys_report(output)
            assert made["region"] == region and "log.key" in made["created"]
        keys = tmp_path / "stack" / "volumes" / f"{PRIMARY}-data" / "keys"
        held = {p.name: p.read_bytes() for p in keys.iterdir()}
        code, output = stack.run(f"keys-{PRIMARY}")
        assert code == 0 and keys_report(output)["created"] == [], output
        assert {p.name: p.read_bytes() for p in keys.iterdir()} == held
        # The primary's region key is wrapped by Transit (`vault:v1:`); its copy key is the
        # one `init` wrote, whose copy.pub the region nodes check copies with.
        assert (keys / "region.key").read_bytes().startswith(b"vault:v1:")
        assert (keys / "copy.key").read_bytes() == (local / "keys" / PRIMARY / "copy.key").read_bytes()
        weed_log = tmp_path / "weed" / "weed.log"
        await wait_for(
            lambda: _ok(
                doc["services"]["seaweedfs"]["healthcheck"]["test"][-1].replace("127.0.0.1:8333", s3)
            ),
            "SeaweedFS's healthcheck passing",
            60,
            lambda: weed_log.read_text()[-2000:],
        )
        for region in REGIONS:
            stack.start(region)
        for region in REGIONS:
            await wait_for(
                lambda r=region: stack.healthcheck(r),
                f"{region}'s healthcheck passing",
                60,
                lambda r=region: stack.log(f"{r}-health") + stack.log(r),
            )
        stack.start("replicator")
        await wait_for(
            lambda: "started for" in stack.log("replicator"),
            "the standalone worker running",
            60,
            lambda: stack.log("replicator"),
        )
        # A user written to the primary through its mutual-TLS port, read in ap-southeast-1.
        dep = Deployment(local)
        primary = dep.credentials("service", PRIMARY).channel(
            f"127.0.0.1:{stack.host_port('cn-north.yaml', 8443)}"
        )
        region = "ap-southeast-1"
        there = dep.credentials("service", region).channel(
            f"127.0.0.1:{stack.host_port(f'{region}.yaml', 8443)}"
        )
        record = records_pb2.Record(user_id="u-compose", source="registration")
        record.fields["email"].string_value = "compose@example.com"
        context = common_pb2.CallContext(location=PRIMARY, purpose="essential.service")
        await records_pb2_grpc.RecordServiceStub(primary).PutRecord(
            records_pb2.PutRecordRequest(context=context, record=record), timeout=30
        )
        reader = records_pb2_grpc.RecordServiceStub(there)
        read = records_pb2.GetRecordRequest(
            context=common_pb2.CallContext(location=region, purpose="essential.service"), user_id="u-compose"
        )
        end = time.monotonic() + 30
        while True:
            try:
                reply = await reader.GetRecord(read, timeout=10)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > end:
                    raise
                await asyncio.sleep(0.2)  # polling interval, not synchronisation
        assert reply.record.fields["email"].string_value == "compose@example.com"
        assert stack.procs["replicator"].poll() is None, stack.log("replicator")
        # The primary made its archive bucket with the stack's key pair; without it SeaweedFS
        # answers nobody.
        assert "residency-translog" in _buckets(s3, local / "compose" / "s3-credentials")
        assert httpx.get(f"http://{s3}/").status_code == 403
        await primary.close()
        await there.close()
    finally:
        codes = stack.stop()
        weed.kill()
        weed.wait()
    assert codes == {name: 0 for name in codes}, {n: stack.log(n) for n, c in codes.items() if c}
    for name in (*REGIONS, "replicator"):
        assert "Traceback" not in stack.log(name) and "Read-only file system" not in stack.log(name), name
    # Everything the services wrote is in their volumes, owned by the image's user.
    written = list((tmp_path / "stack" / "volumes").rglob("*"))
    assert any(p.name == "node.db" for p in written)
    assert {p.stat().st_uid for p in written} == {stack.image.user[0]}
    assert time.monotonic() - started < 90


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _buckets(endpoint: str, credentials: Path) -> set[str]:
    import boto3

    env = {"AWS_SHARED_CREDENTIALS_FILE": str(credentials)}
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    os.environ.update(env)
    try:
        s3 = boto3.session.Session().client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1")
        return {b["Name"] for b in s3.list_buckets()["Buckets"]}
    finally:
        for k in env:
            os.environ.pop(k)
        os.environ.update(saved)


def _keys_init(config: Path, *seed: Path) -> subprocess.CompletedProcess:
    extra = ["--seed", str(seed[0])] if seed else []
    return subprocess.run(
        [BIN / "residency", "keys", "init", "--config", config, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keys_init_keeps_every_key_and_refuses_keys_its_provider_cannot_open(
    tmp_path: Path, bao_address: str
):
    """`residency keys init` for a Transit-backed node: creates the Transit keys and the key
    files once; run again, or with a seed whose files differ, it replaces nothing; keys of
    another provider, a token OpenBao refuses and a missing seed folder are refused with one
    line that says why, and no traceback."""
    local = tmp_path / "local"
    subprocess.run([BIN / "residency", "init", local], check=True, capture_output=True, timeout=120)
    (tmp_path / "token").write_text(BAO_TOKEN + "\n")
    config = yaml.safe_load((local / f"{PRIMARY}.yaml").read_text())
    config["keys"] = {
        "provider": "openbao",
        "dir": str(tmp_path / "keys"),
        "address": bao_address,
        "transit_key": f"compose-{tmp_path.name}",
        "token_file": str(tmp_path / "token"),
    }
    node = local / "bao-node.yaml"
    node.write_text(yaml.safe_dump(config))
    made = _keys_init(node)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["created"] == [
        "copy.key",
        "copy.pub",
        "hash.key",
        "log.key",
        "log.pub",
        "region.key",
        "region.pub",
    ]
    held = {p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()}
    # A seed that differs from what is there (another deployment's keys) replaces nothing.
    again = _keys_init(node, local / "keys" / PRIMARY)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["created"] == [] and set(report["seeded"]) == {"kek-v1.key", "log-kek-v1.key", "passphrase"}
    assert {n: (tmp_path / "keys" / n).read_bytes() for n in held} == held
    # The local provider's keys seeded into a Transit-backed node's empty folder: refused.
    config["keys"]["dir"] = str(tmp_path / "other-keys")
    node.write_text(yaml.safe_dump(config))
    wrong = _keys_init(node, local / "keys" / PRIMARY)
    assert wrong.returncode == 2 and "do not open with the node's openbao provider" in wrong.stderr
    assert list((tmp_path / "other-keys").iterdir()) == []  # what it seeded, taken back
    # A token OpenBao does not know.
    (tmp_path / "token").write_text("not-the-token\n")
    config["keys"]["dir"] = str(tmp_path / "third-keys")
    node.write_text(yaml.safe_dump(config))
    denied = _keys_init(node)
    assert denied.returncode == 2 and "openbao provider cannot make the keys" in denied.stderr
    assert list((tmp_path / "third-keys").iterdir()) == []
    missing = _keys_init(node, tmp_path / "no-such-folder")
    assert missing.returncode == 2 and "--seed" in missing.stderr
    for out in (wrong, denied, missing):
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


async def test_the_openbao_service_serves_with_the_token_of_its_secret(tmp_path: Path):
    """OpenBao's service command (dev mode, its root token read from the secret file), run
    natively on a port of its own: its healthcheck passes, the token in the file is its root
    token, and a token not in the file is refused."""
    service = compose()["services"]["openbao"]
    secret = tmp_path / "openbao-token"
    secret.write_text("a-token-of-the-stack\n")
    (bao_port,) = free_ports(1)
    command = service["command"][0].replace("$$", "$").replace("/run/secrets/openbao-token", str(secret))
    command = command.replace("0.0.0.0:8200", f"127.0.0.1:{bao_port}")
    env = {**os.environ, "BAO_ADDR": f"http://127.0.0.1:{bao_port}", "PATH": f"{BIN}:{os.environ['PATH']}"}
    log = open(tmp_path / "bao.log", "wb")  # noqa: SIM115 - handed to the child process
    bao = subprocess.Popen(["/bin/sh", "-ec", command], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        check = service["healthcheck"]["test"][1:]
        await wait_for(
            lambda: subprocess.run(check, env=env, capture_output=True).returncode == 0,
            "OpenBao's healthcheck passing",
            30,
            lambda: (tmp_path / "bao.log").read_text()[-2000:],
        )
        url = f"http://127.0.0.1:{bao_port}/v1/sys/mounts"
        assert httpx.get(url, headers={"X-Vault-Token": "a-token-of-the-stack"}).status_code == 200
        assert httpx.get(url, headers={"X-Vault-Token": "residency-test-root"}).status_code == 403
    finally:
        bao.terminate()
        bao.wait(30)
        log.close()
