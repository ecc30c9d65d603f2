"""The Kubernetes manifests (`deploy/k8s/`): every overlay renders with `kubectl kustomize`,
every object validates against the Kubernetes schemas (kubernetes-validate, strict), and per
overlay the objects agree with the node config they carry: region, role and namespace; the
ports the config listens on and the probes; a restricted securityContext and resources for
every container; every path the config names mounted, and only the data volume writable;
ingress on the mutual-TLS port only; the primary's egress to its affiliates' addresses and its
key service and nowhere else."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from residency.cli.main import build_parser
from residency.server.config.node import NodeFile
from residency.server.config.rules import rules_from_bytes
from residency.server.config.schema import SchemaFile, load_schema
from tests.container import Image

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
REGIONS = ("cn-north", "ap-southeast-1", "eu-west-1")
KUBERNETES = "1.32.0"
PROBE = ["residency", "health", "--config", "/etc/residency/node.yaml", "--service"]
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def render(region: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / region)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def one(objects: list[dict], kind: str, name: str) -> dict:
    """The object of `kind` named `name` (a generated ConfigMap's name has a hash after it)."""
    (found,) = [
        o for o in objects if o["kind"] == kind and o["metadata"]["name"] in (name, *_hashed(o, name))
    ]
    return found


def _hashed(o: dict, name: str) -> list[str]:
    n = o["metadata"]["name"]
    return [n] if n.startswith(name + "-") and len(n) == len(name) + 11 else []


def port_of(host_port: str) -> int:
    return int(host_port.rpartition(":")[2])


@pytest.fixture(scope="module", params=REGIONS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict], dict]:
    region = request.param
    objects = render(region)
    config_map = one(objects, "ConfigMap", "residency-config")
    return region, objects, yaml.safe_load(config_map["data"]["node.yaml"])


def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    _, objects, _ = overlay
    assert {o["kind"] for o in objects} >= {
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "NetworkPolicy",
    }
    for o in objects:
        kubernetes_validate.validate(o, KUBERNETES, strict=True)  # raises naming the field


def test_the_config_is_valid_and_names_the_overlays_region_and_role(overlay, tmp_path: Path):
    region, objects, config = overlay
    node = NodeFile.model_validate(config)  # as `residency serve` reads it
    assert node.region == region
    for o in objects:
        labels = o["metadata"].get("labels", {})
        assert labels.get("residency.io/region") == region and labels.get("residency.io/role") == node.role
        assert o["metadata"].get("namespace") == f"residency-{region}"
    # The policy files in the ConfigMap load, and their rules know this region.
    data = one(objects, "ConfigMap", "residency-config")["data"]
    for name in ("schema.yaml", "rules.yaml", "access.yaml"):
        (tmp_path / name).write_text(data[name])
    SchemaFile.model_validate(yaml.safe_load(data["schema.yaml"]))
    rules = rules_from_bytes(data["rules.yaml"].encode(), load_schema(tmp_path / "schema.yaml"), "rules.yaml")
    assert region in rules.regions
    assert (node.role == "primary") == (region == rules.home_region)


def containers(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(pod spec, container) of every workload's containers and init containers."""
    out = []
    for o in objects:
        if o["kind"] in ("StatefulSet", "Deployment"):
            spec = o["spec"]["template"]["spec"]
            out += [(spec, c) for c in spec.get("initContainers", []) + spec["containers"]]
    return out


def test_every_container_is_restricted_and_has_resources(overlay):
    _, objects, _ = overlay
    for pod, c in containers(objects):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
        assert pod["automountServiceAccountToken"] is False


def test_ports_probes_and_the_images_command_agree_with_the_config(overlay):
    _, objects, config = overlay
    node = one(objects, "StatefulSet", "residency-node")
    (c,) = node["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": port_of(config["listen"]), "metrics": port_of(config["metrics"]["listen"])}
    # No plaintext port: every probe runs `residency health` on the node's own config, which
    # asks over mutual TLS (tests/test_health.py runs it against a node, test_image.py in the
    # pod's layout), and the CLI takes it as written.
    assert "health" not in config
    parser = build_parser()
    for probe, service in (
        ("startupProbe", "liveness"),
        ("livenessProbe", "liveness"),
        ("readinessProbe", "readiness"),
    ):
        assert set(c[probe]) - {"periodSeconds", "failureThreshold", "timeoutSeconds"} == {"exec"}, probe
        command = c[probe]["exec"]["command"]
        assert command == [*PROBE, service]
        args = parser.parse_args(command[1:])
        assert (args.command, args.service) == ("health", service)
        # Python's start and the command's own 3 s fit in the probe's time, and no probe runs
        # more often than every 2 s.
        assert c[probe]["timeoutSeconds"] >= 5 and c[probe]["periodSeconds"] >= 2, probe
    assert c["livenessProbe"]["periodSeconds"] >= 10 and c["readinessProbe"]["periodSeconds"] >= 5
    for _, container in containers(objects):  # nor any other container's probe on a port
        probes = [container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in container]
        assert all(set(p) & {"grpc", "httpGet", "tcpSocket"} == set() for p in probes), container["name"]
    image = Image.read(ROOT / "deploy" / "Dockerfile")
    assert c["args"][: len(image.cmd)] == image.cmd  # the image's own command, plus JSON logs
    assert c["image"].endswith("/residency:0.1.0")
    service = one(objects, "Service", "residency-node")
    assert [p["port"] for p in service["spec"]["ports"]] == [ports["grpc"]]


def mounts(pod: dict, container: dict) -> dict[PurePosixPath, bool]:
    """Mount path -> writable."""
    return {PurePosixPath(m["mountPath"]): not m.get("readOnly", False) for m in container["volumeMounts"]}


def config_paths(config: dict) -> dict[str, tuple[str, bool]]:
    """What the node reads or writes, by config key: (absolute path, must be writable)."""
    base = PurePosixPath("/etc/residency")
    paths = {k: (str(base / config[k]), False) for k in ("schema", "rules", "access")}
    paths |= {f"tls.{k}": (v, False) for k, v in config["tls"].items()}
    paths["data_dir"] = (config["data_dir"], True)
    paths["keys.dir"] = (config["keys"]["dir"], True)
    for k in ("passphrase_file", "token_file"):
        if k in config["keys"]:
            paths[f"keys.{k}"] = (config["keys"][k], False)
    for a in config.get("affiliates", []):
        paths[f"affiliates.{a['region']}"] = (a["public_key"], False)
    if "home" in config:
        paths["home.signing_key"] = (config["home"]["signing_key"], False)
    return paths


def test_every_path_the_config_names_is_mounted_and_only_data_is_writable(overlay):
    _, objects, config = overlay
    for o in objects:
        if o["kind"] not in ("StatefulSet", "Deployment"):
            continue
        (c,) = o["spec"]["template"]["spec"]["containers"]
        where = mounts(o["spec"]["template"]["spec"], c)
        assert [p for p, writable in where.items() if writable] == [PurePosixPath("/var/lib/residency")]
        for key, (path, writable) in config_paths(config).items():
            p = PurePosixPath(path)
            mount = max(
                (m for m in where if m == p or m in p.parents), key=lambda m: len(m.parts), default=None
            )
            assert mount is not None, f"{o['metadata']['name']}: {key} {path} is on no volume"
            assert where[mount] == writable, f"{key} {path}: mounted {'rw' if where[mount] else 'ro'}"


def policies(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}


def test_ingress_is_the_mutual_tls_port_and_egress_goes_only_where_the_config_sends(overlay):
    _, objects, config = overlay
    specs = policies(objects)
    deny = specs["residency-default-deny"]
    assert (
        set(deny["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in deny and "egress" not in deny
    )
    ingress = [rule for s in specs.values() for rule in s.get("ingress", [])]
    open_rules = [r for r in ingress if "from" not in r]
    assert [[p["port"] for p in r["ports"]] for r in open_rules] == [[port_of(config["listen"])]]
    for r in ingress:
        if "from" in r:  # only Prometheus in the monitoring namespace, only the metrics port
            assert [p["port"] for p in r["ports"]] == [port_of(config["metrics"]["listen"])]
            (peer,) = r["from"]
            assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    egress = [rule for s in specs.values() for rule in s.get("egress", [])]
    dns = [r for r in egress if {p["port"] for p in r["ports"]} == {53}]
    assert len(dns) == 1
    wanted = set()
    for a in config.get("affiliates", []):
        target = a.get("address") or urlparse(a["endpoint_url"]).netloc
        host, _, port = target.rpartition(":")
        wanted.add((f"{ipaddress.ip_address(host)}/32", int(port)))
    sent = set()
    for r in egress:
        if r in dns:
            continue
        (peer,) = r["to"]
        ports = [p["port"] for p in r["ports"]]
        if "ipBlock" in peer:
            assert "except" not in peer["ipBlock"]
            sent |= {(peer["ipBlock"]["cidr"], port) for port in ports}
        else:  # the key service, in-cluster
            assert config["keys"]["provider"] == "openbao"
            assert ports == [urlparse(config["keys"]["address"]).port]
            namespace = urlparse(config["keys"]["address"]).hostname.split(".")[1]
            assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}
    assert sent == wanted  # every affiliate reachable, and nothing else
    if config["role"] == "region":
        assert not [r for r in egress if r not in dns]  # a region node calls nobody


def test_every_pod_is_under_the_default_deny_and_the_policies_that_open_it(overlay):
    """A policy selects pods by their template's labels, not the workload's: every pod of the
    overlay must match the default deny, the DNS rule and (the primary's) egress, and the
    ingress rule of its own component."""
    _, objects, config = overlay
    specs = policies(objects)
    pods = [o for o in objects if o["kind"] in ("StatefulSet", "Deployment")]
    assert pods
    for o in pods:
        labels = o["spec"]["template"]["metadata"]["labels"]
        component = labels["app.kubernetes.io/component"]
        selected = {
            name
            for name, spec in specs.items()
            if spec["podSelector"]["matchLabels"].items() <= labels.items()
        }
        wanted = {"residency-default-deny", "residency-dns", f"residency-{component}-ingress"}
        if config["role"] == "primary":
            wanted.add("residency-primary-egress")
        assert selected == wanted, (o["metadata"]["name"], labels, selected)


def test_the_primary_runs_a_standalone_replicator_on_its_store(overlay):
    _, objects, config = overlay
    workers = [
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "residency-replicator"
    ]
    if config["role"] != "primary":
        assert not workers
        return
    (worker,) = workers
    spec = worker["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["args"][:3] == ["replicate", "--config", "/etc/residency/node.yaml"]
    # Its metrics on the node's metrics port, open to Prometheus in `monitoring` alone.
    metrics = c["args"][c["args"].index("--metrics-listen") + 1]
    assert port_of(metrics) == port_of(config["metrics"]["listen"])
    assert [p["containerPort"] for p in c["ports"]] == [port_of(metrics)]
    (ingress,) = policies(objects)["residency-replicator-ingress"]["ingress"]
    (peer,) = ingress["from"]
    assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert [p["port"] for p in ingress["ports"]] == [port_of(metrics)]
    (claim,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    node = one(objects, "StatefulSet", "residency-node")
    template = node["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert claim["persistentVolumeClaim"]["claimName"] == f"{template}-{node['metadata']['name']}-0"
    affinity = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert affinity["labelSelector"]["matchLabels"] == {"app.kubernetes.io/component": "node"}
