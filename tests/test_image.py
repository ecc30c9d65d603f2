"""The container image (`deploy/Dockerfile`): hadolint finds nothing, its build stage's files
make the package, and its own command runs a node the way the container would (read-only
root, non-root user, configuration and secrets read-only, only the data volume writable) and
serves the operator commands too. No container runtime is reachable on these machines."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from residency.cli.channel import Credentials
from residency.server.deployment import PRIMARY, free_ports, init_deployment
from tests.container import Image, run_natively
from tests.harness import wait_serving

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BIN = Path(sys.executable).parent


def test_hadolint_finds_nothing():
    r = subprocess.run([str(BIN / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == ""


def test_the_image_is_multi_stage_slim_and_runs_as_a_user_with_no_privileges():
    image = Image.read(DOCKERFILE)
    bases = re.findall(r"^ARG PYTHON=(\S+)", DOCKERFILE.read_text(), re.M)
    assert bases and bases[0].endswith("-slim-bookworm"), bases
    assert image.stages == 2
    assert image.user[0] != 0 and image.user[1] != 0
    assert image.entrypoint == ["residency"]
    assert image.cmd == ["serve", "--config", "/etc/residency/node.yaml"]
    assert image.volumes == ["/var/lib/residency"]
    assert image.env["RESIDENCY_LOG_FORMAT"] == "json"


def test_the_build_stage_copies_all_the_package_needs(tmp_path: Path):
    """A wheel built from exactly the files the build stage COPYs (after .dockerignore) holds the
    generated API, the config schemas and the migrations: nothing the node reads is left out."""
    context = tmp_path / "context"
    context.mkdir()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            *sources, _ = line.split()[1:]
            for s in sources:
                src = ROOT / s.rstrip("/")
                if src.is_dir():
                    shutil.copytree(src, context / s, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(src, context / s)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, "."],
        cwd=context,
        check=True,
        timeout=300,
    )
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {"server": "residency/server", "replicator": "residency/replicator", "cli": "residency/cli"}
    packaged["protos/residency"] = "residency"
    wanted = {
        f"{into}/{f.relative_to(ROOT / source)}"
        for source, into in packaged.items()
        for f in (ROOT / source).rglob("*")
        if f.suffix in (".py", ".sql", ".json", ".yaml") and "__pycache__" not in f.parts
    }
    assert len(wanted) > 100
    assert wanted <= names, sorted(wanted - names)[:10]


Volumes = dict[str, tuple[Path, bool]]


def _image_layout(deployment: Path, root: Path, uid: int, gid: int) -> tuple[Volumes, str]:
    """The primary of a `residency init` deployment as the image expects it: configuration at
    /etc/residency, certificates and the passphrase under /run/secrets/residency, keys and
    store in the data volume /var/lib/residency. Returns the volumes and the listen address."""
    conf, secrets, data = root / "etc", root / "secrets", root / "data"
    for d in (conf, secrets / "tls", data / "keys"):
        d.mkdir(parents=True)
    node = yaml.safe_load((deployment / f"{PRIMARY}.yaml").read_text())
    (port,) = free_ports(1)
    node.update(
        listen=f"127.0.0.1:{port}",
        data_dir="/var/lib/residency/data",
        tls={
            "cert": "/run/secrets/residency/tls/node.crt",
            "key": "/run/secrets/residency/tls/node.key",
            "ca": "/run/secrets/residency/tls/ca.crt",
        },
    )
    node["keys"].update(dir="/var/lib/residency/keys", passphrase_file="/run/secrets/residency/passphrase")
    for a in node["affiliates"]:
        shutil.copy2(deployment / a["public_key"], conf / f"{a['region']}.pub")
        a["public_key"] = f"{a['region']}.pub"
    (conf / "node.yaml").write_text(yaml.safe_dump(node))
    for name in ("schema.yaml", "rules.yaml", "access.yaml"):
        shutil.copy2(deployment / name, conf / name)
    shutil.copy2(deployment / "pki" / f"{PRIMARY}.crt", secrets / "tls" / "node.crt")
    shutil.copy2(deployment / "pki" / f"{PRIMARY}.key", secrets / "tls" / "node.key")
    shutil.copy2(deployment / "pki" / "ca.crt", secrets / "tls" / "ca.crt")
    shutil.move(deployment / "keys" / PRIMARY / "passphrase", secrets / "passphrase")
    shutil.copytree(deployment / "keys" / PRIMARY, data / "keys", dirs_exist_ok=True)
    # As a ConfigMap's files are: readable by all (whatever umask the test process runs under).
    subprocess.run(["chmod", "-R", "a+rX", str(conf)], check=True)
    # As Kubernetes' fsGroup and a Secret's defaultMode would: the image's user owns its volume
    # and can read its secrets; nobody else can.
    subprocess.run(["chown", "-R", f"{uid}:{gid}", str(data), str(secrets)], check=True)
    subprocess.run(["chmod", "-R", "go-rwx", str(data), str(secrets)], check=True)
    volumes = {
        "/etc/residency": (conf, False),
        "/run/secrets/residency": (secrets, False),
        "/var/lib/residency": (data, True),
    }
    return volumes, f"127.0.0.1:{port}"


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="mount namespaces need util-linux unshare and root (CI has both)",
)
async def test_the_images_command_runs_a_node_read_only_as_its_user(tmp_path: Path):
    image = Image.read(DOCKERFILE)
    deployment = tmp_path / "deployment"
    init_deployment(deployment)
    volumes, address = _image_layout(deployment, tmp_path / "container", *image.user)
    operator = Credentials.files(deployment / "pki" / "operator", deployment / "pki" / "ca.crt")
    log = tmp_path / "node.log"
    node = run_natively(image, volumes, log=log)
    try:
        try:
            await wait_serving(address, operator, deadline=60.0)
        except Exception:
            pytest.fail(f"the image's command did not serve: {log.read_text()[-3000:]}")
        # A write goes through the store, the keyring and the transfer log, all in the volume.
        service = tmp_path / "service"
        subprocess.run(
            [
                BIN / "residency",
                "certs",
                "issue",
                "--deployment",
                deployment,
                "--role",
                "service",
                "--region",
                PRIMARY,
                "--name",
                "app",
                "--out",
                service,
            ],
            check=True,
            capture_output=True,
        )
        put = subprocess.run(
            [
                BIN / "residency",
                "records",
                "put",
                "--target",
                address,
                "--cert",
                f"{service}.crt",
                "--key",
                f"{service}.key",
                "--ca",
                deployment / "pki" / "ca.crt",
                "--purpose",
                "essential.service",
                "u-image",
                "email=a@example.com",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert put.returncode == 0, put.stderr
        # The operator commands run from the same image (their certificate mounted as a secret).
        op = tmp_path / "operator-secrets"
        op.mkdir()
        for name in ("operator.crt", "operator.key", "ca.crt"):
            shutil.copy2(deployment / "pki" / name, op / name)
        subprocess.run(["chown", "-R", f"{image.user[0]}:{image.user[1]}", str(op)], check=True)
        status_log = tmp_path / "status.log"
        status = run_natively(
            image,
            {"/run/secrets/residency": (op, False)},
            [
                "status",
                "--target",
                address,
                "--cert",
                "/run/secrets/residency/operator.crt",
                "--key",
                "/run/secrets/residency/operator.key",
                "--ca",
                "/run/secrets/residency/ca.crt",
            ],
            log=status_log,
        )
        assert await asyncio.to_thread(status.wait, 60) == 0, status_log.read_text()
        reply = json.loads(status_log.read_text()[status_log.read_text().index("{") :])
        assert reply["node"]["role"] == "primary"
        # Everything the node wrote is in its volume, owned by its user.
        written = [p for p in (tmp_path / "container" / "data").rglob("*")]
        assert any(p.name == "node.db" for p in written)
        assert {p.stat().st_uid for p in written} == {image.user[0]}
    finally:
        node.terminate()
        code = await asyncio.to_thread(node.wait, 60)
    assert code == 0, log.read_text()[-3000:]
    assert "Read-only file system" not in log.read_text()
    # The image logs one JSON event per line.
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(e["event"].startswith("primary node for cn-north listening") for e in events)


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0 or shutil.which("kubectl") is None,
    reason="mount namespaces need util-linux unshare and root, and the overlay kubectl (CI has all)",
)
async def test_a_kubernetes_overlays_pod_runs_natively(tmp_path: Path):
    """ap-southeast-1's overlay as its pod would run: the rendered `node.yaml` and policy files
    at /etc/residency, the peers' keys, the Secrets' files, the init container's own command
    seeding the volume, then the node's own arguments, read-only but for the volume, as 10001."""
    from tests.test_k8s import one, render

    region = "ap-southeast-1"
    image = Image.read(DOCKERFILE)
    deployment = tmp_path / "deployment"
    init_deployment(deployment)
    objects = render(region)
    data = one(objects, "ConfigMap", "residency-config")["data"]
    pod = one(objects, "StatefulSet", "residency-node")["spec"]["template"]["spec"]
    conf, peers, secrets, keys, volume = (tmp_path / n for n in ("etc", "peers", "secrets", "keys", "data"))
    for d in (conf, peers, secrets / "tls", keys, volume):
        d.mkdir(parents=True)
    node = yaml.safe_load(data["node.yaml"])
    grpc_port, metrics_port = free_ports(2)
    # Loopback ports of this machine; the node listens on every address, as in its pod.
    node.update(listen=f"0.0.0.0:{grpc_port}")
    node["metrics"]["listen"] = f"127.0.0.1:{metrics_port}"
    data["node.yaml"] = yaml.safe_dump(node)
    for name, text in data.items():
        (conf / name).write_text(text)
    shutil.copy2(deployment / "keys" / PRIMARY / "copy.pub", peers / "cn-north-copy.pub")
    for ours, theirs in (
        ("tls/node.crt", f"{region}.crt"),
        ("tls/node.key", f"{region}.key"),
        ("tls/ca.crt", "ca.crt"),
    ):
        shutil.copy2(deployment / "pki" / theirs, secrets / ours)
    shutil.move(deployment / "keys" / region / "passphrase", secrets / "key-provider")
    for f in (deployment / "keys" / region).iterdir():
        shutil.copy2(f, keys / f.name)
    subprocess.run(["chown", "-R", f"{image.user[0]}:{image.user[1]}", str(tmp_path)], check=True)
    # The init container, with its own command, seeds the volume from the keys Secret.
    (seed,) = pod["initContainers"]
    seeding = run_natively(
        replace(image, entrypoint=seed["command"], cmd=[]),
        {"/var/lib/residency": (volume, True), "/run/secrets/residency/keys": (keys, False)},
        [],
        log=tmp_path / "seed.log",
    )
    assert await asyncio.to_thread(seeding.wait, 60) == 0, (tmp_path / "seed.log").read_text()
    assert {p.name for p in (volume / "keys").iterdir()} == {p.name for p in keys.iterdir()}
    (container,) = pod["containers"]
    log = tmp_path / "node.log"
    mounted = {
        "/etc/residency": (conf, False),
        "/etc/residency-peers": (peers, False),
        "/run/secrets/residency": (secrets, False),
        "/var/lib/residency": (volume, True),
    }
    running = run_natively(image, mounted, container["args"], log=log)

    def probe(kind: str) -> tuple[int, str]:
        """The pod's own probe command, run as the kubelet runs it: in the node's container."""
        out = tmp_path / f"{kind}.log"
        command = container[kind]["exec"]["command"]
        check = run_natively(replace(image, entrypoint=command, cmd=[]), mounted, [], log=out)
        return check.wait(60), out.read_text()

    try:
        operator = Credentials.files(deployment / "pki" / "operator", deployment / "pki" / "ca.crt")
        try:
            await wait_serving(f"127.0.0.1:{grpc_port}", operator, deadline=60.0)
        except Exception:
            pytest.fail(f"the pod's node did not serve: {log.read_text()[-3000:]}")
        # Its probes pass: over mutual TLS, with the node's certificate from the Secret.
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            code, said = await asyncio.to_thread(probe, kind)
            assert (code, said) == (0, "SERVING\n"), (kind, said)
    finally:
        running.terminate()
        code = await asyncio.to_thread(running.wait, 60)
    assert code == 0, log.read_text()[-3000:]
    assert all(json.loads(line)["level"] in ("info", "warning") for line in log.read_text().splitlines())
