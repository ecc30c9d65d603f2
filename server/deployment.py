"""`residency init`: writes a complete local three-region deployment (configs, schema,
rules, keys) with the example schema and rules that follow the privacy policy; and the one
way to run one of its nodes as a process (the demo and the test harness both do)."""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from residency.server.config import JSONSCHEMA
from residency.server.config.node import load_config
from residency.server.keys import pki
from residency.server.keys.copykey import create_copy_key
from residency.server.keys.files import KeyExists
from residency.server.keys.hashkey import KEY as HASH_KEY
from residency.server.keys.hashkey import create_hash_key
from residency.server.keys.logkey import create_log_key
from residency.server.keys.providers import open_log_provider, open_provider
from residency.server.keys.providers.local import LocalProvider
from residency.server.keys.region import RegionKey

PRIMARY = "cn-north"
AFFILIATES = ("ap-southeast-1", "eu-west-1")

# Every kind of data the privacy policy names (section 1), with its Fides category.
EXAMPLE_SCHEMA = """\
# Fields a record may hold. category: a Fides data category (fideslang); sensitive:
# sensitive personal information (PIPL Art. 28); out_of_scope: data the policy (1c) puts
# outside its scope, transferred only under a rule naming its category explicitly;
# source: registration (policy 1a), automatic (1b) or partner (1c); lookup: a blind index is
# kept so that FindRecords finds users by the field, of its value normalised by `normalize`.
version: 1
fields:
  name:              {category: user.name, type: string, max_bytes: 256, source: registration,
                      description: "Name given at registration"}
  phone:             {category: user.contact.phone_number, type: string, max_bytes: 32, source: registration,
                      lookup: true, normalize: e164, description: "Mobile phone number"}
  email:             {category: user.contact.email, type: string, max_bytes: 320, source: registration,
                      lookup: true, normalize: email, description: "E-mail address"}
  address:           {category: user.contact.address, type: string, max_bytes: 512, source: registration,
                      description: "Postal address"}
  national_id:       {category: user.government_id.national_identification_number, type: string,
                      max_bytes: 32, sensitive: true, source: registration,
                      description: "Resident identity card number"}
  password:          {category: user.authorization.password, type: string, max_bytes: 256, source: registration,
                      description: "Account password; stored only as an Argon2id hash"}
  ip_address:        {category: user.device.ip_address, type: string, max_bytes: 45, source: automatic,
                      description: "IP address of the terminal"}
  browser_type:      {category: user.device, type: string, max_bytes: 256, source: automatic,
                      description: "Browser (explorer) type"}
  language:          {category: user.demographic.language, type: string, max_bytes: 35, source: automatic,
                      description: "Language used"}
  visit_time:        {category: user.telemetry, type: timestamp, source: automatic,
                      description: "Date and time of the visit"}
  hardware_software: {category: user.device, type: string, max_bytes: 1024, source: automatic,
                      description: "Hardware and software features of the terminal"}
  pages_visited:     {category: user.behavior.browsing_history, type: list, max_bytes: 16384, max_items: 200,
                      source: automatic, description: "Web pages requested"}
  cookie_id:         {category: user.device.cookie_id, type: string, max_bytes: 128, source: automatic,
                      description: "Cookie identifier (policy 5)"}
  partner_profile:   {category: user.demographic.profile, type: string, max_bytes: 4096, source: partner,
                      description: "Profile data obtained from a business partner"}
  search_keywords:   {category: user.behavior.search_history, type: list, max_bytes: 8192, max_items: 100,
                      source: automatic, out_of_scope: true,
                      description: "Keywords typed into the search service (policy 1c-a)"}
  published_content: {category: user.content.public, type: string, max_bytes: 16384, source: registration,
                      out_of_scope: true, description: "Content the user published (policy 1c-b)"}
  transactions:      {category: user.behavior.purchase_history, type: list, max_bytes: 16384, max_items: 200,
                      source: automatic, out_of_scope: true,
                      description: "Transactions and evaluations (policy 1c-b)"}
  violation_records: {category: user.criminal_history, type: list, max_bytes: 8192, max_items: 100,
                      sensitive: true, out_of_scope: true, source: automatic,
                      description: "Violations of law or of the app's rules, and measures taken (policy 1c-c)"}
"""

EXAMPLE_RULES = """\
# What may leave the home region. Default deny: a field goes only where a rule sends it.
version: 1
home_region: cn-north
recipients:                      # PIPL Art. 39: the user is told each recipient's name and contact
  - id: sg-affiliate
    region: ap-southeast-1
    company: Example Holdings Pte. Ltd.
    contact: dpo@example.sg
    country: SG
  - id: ie-affiliate
    region: eu-west-1
    company: Example Europe Ltd.
    contact: dpo@example.ie
    country: IE
never_transfer: [user.authorization, user.government_id, user.behavior.search_history]
rules:
  - id: sg-service               # the Singapore affiliate serves the account
    recipient: sg-affiliate
    purposes: [essential.service]
    legal_basis: contract
    categories: [user.name, user.contact, user.device, user.demographic.language]
    exclude: [user.contact.address]
    retention_days: 365
    safeguards:
      - {kind: cac_standard_contract, reference: "filed with the Beijing CAC, no. Jing-HT-2025-0173"}
  - id: ie-analytics             # the Irish affiliate reports on service use
    recipient: ie-affiliate
    purposes: [analytics.reporting]
    legal_basis: contract
    categories: [user.demographic.language, user.telemetry, user.behavior.browsing_history]
    retention_days: 180
    safeguards:
      - {kind: cac_standard_contract, reference: "filed with the Beijing CAC, no. Jing-HT-2025-0173"}
      - {kind: scc, reference: "EU SCCs 2021/914 module 1, onward transfers, 2025-03-01"}
  - id: ie-support               # ... and answers support requests
    recipient: ie-affiliate
    purposes: [essential.service.operations.support]
    legal_basis: contract
    categories: [user.contact.email, user.behavior.purchase_history]
    retention_days: 365
    safeguards:
      - {kind: cac_standard_contract, reference: "filed with the Beijing CAC, no. Jing-HT-2025-0173"}
      - {kind: scc, reference: "EU SCCs 2021/914 module 1, onward transfers, 2025-03-01"}
  - id: ie-marketing             # policy 2c: partner marketing only with the user's prior consent
    recipient: ie-affiliate
    purposes: [marketing.communications]
    legal_basis: consent
    categories: [user.name, user.contact.phone_number]
    retention_days: 90
    safeguards:
      - {kind: cac_standard_contract, reference: "filed with the Beijing CAC, no. Jing-HT-2025-0173"}
      - {kind: scc, reference: "EU SCCs 2021/914 module 1, onward transfers, 2025-03-01"}
"""

EXAMPLE_ACCESS = """\
# Which purposes each service may state in its calls (a service is the holder of a certificate
# spiffe://residency/service/REGION/NAME). The first entry whose identity matches decides; a
# service no entry matches may state no purpose. '*' in an identity matches within one part;
# a purpose allows its narrower ones ('marketing' allows 'marketing.communications').
# Reread on SIGHUP. Other roles are not listed here: what a role may call is fixed (README).
services:
  # Narrowing examples: put them above the catch-all, which lets every service state every purpose.
  # - identity: spiffe://residency/service/cn-north/billing
  #   purposes: [essential.service.payment_processing]
  # - identity: spiffe://residency/service/*/newsletter
  #   purposes: [marketing.communications]
  # - identity: spiffe://residency/service/eu-west-1/*
  #   purposes: [essential.service.operations.support, analytics.reporting]
  - identity: spiffe://residency/service/*/*
    purposes: ["*"]
"""


def origin(region: str) -> str:
    """The transfer log's checkpoint origin line (and signing key name) of a region's node."""
    return f"residency/{region}"


def editor_schema(kind: str) -> str:
    """The first line of a written file: it points editors that use yaml-language-server
    (VS Code's YAML extension, Neovim, Helix, ...) at the JSON Schema of `kind`, which `init`
    copies into the deployment's `schemas/` folder. A path relative to the file, so the
    bytes of the file (and the rules version hashed from them) are the same on every
    machine, wherever the package is installed."""
    return f"# yaml-language-server: $schema=schemas/{kind}.json\n"


def copy_json_schemas(directory: Path) -> None:
    """The JSON Schemas the files' first lines point at, beside them."""
    (directory / "schemas").mkdir(exist_ok=True)
    for kind in ("node", "schema", "rules", "access"):
        (directory / "schemas" / f"{kind}.json").write_bytes((JSONSCHEMA / f"{kind}.json").read_bytes())


# The ports `free_ports` gave out in this process.
_GIVEN: set[int] = set()


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free now. Picked below the kernel's range of ephemeral ports
    where it is known: a port from that range, free when picked, can be taken by any outgoing
    connection (to a database, another node) before the node that is to listen on it binds it
    (seen in the test suite as "Failed to bind to address"). Never one this process gave out
    before: a deployment made earlier may start its nodes later (seen as "Address already in
    use" when two deployments of one test run drew the same port)."""
    low = _ephemeral_low()
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket()
            socks.append(s)
            for _ in range(100):
                try:
                    s.bind(("127.0.0.1", 0 if low is None else secrets.randbelow(low - 20_000) + 20_000))
                except OSError:
                    continue
                if s.getsockname()[1] not in _GIVEN:
                    break
                s.close()
                s = socks[-1] = socket.socket()
            else:
                s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in socks]
        _GIVEN.update(ports)
        return ports
    finally:
        for s in socks:
            s.close()


def _ephemeral_low() -> int | None:
    """The lowest ephemeral port (Linux), when it leaves room for ours (20000 and up)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return low if low > 21_000 else None


def local_keys(d: Path, region: str) -> dict[str, Any]:
    """The embedded default: the local provider, its passphrase in a file (mode 0600) beside
    the keys so that `residency demo` and the tests need no setup. In production, point
    `passphrase_env` at a secret the platform injects, and keep no passphrase file."""
    folder = d / "keys" / region
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "passphrase"
    if not secret.exists():
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.urlsafe_b64encode(os.urandom(32)).decode() + "\n")
    return {"provider": "local", "dir": f"keys/{region}", "passphrase_file": f"keys/{region}/passphrase"}


def node_name(region: str) -> str:
    """The NAME of a node's identity, spiffe://TD/node/REGION/NAME."""
    return "primary" if region == PRIMARY else "region"


def issue_once(
    pki_dir: Path, role: str, region: str, name: str, out: str, hosts: tuple[str, ...] = ()
) -> None:
    """Issues `pki/OUT.crt|.key` unless they exist (a deployment written again keeps them)."""
    if not (pki_dir / f"{out}.crt").exists():
        pki.issue(pki_dir, role, region, name, pki_dir / out, hosts=hosts)


def init_pki(d: Path, regions: tuple[str, ...], trust_domain: str = pki.TRUST_DOMAIN) -> None:
    """The deployment's CA (kept if there), a certificate per node, and the operator's and
    the reviewer's client certificates, under `d/pki`."""
    folder = d / "pki"
    pki.create_ca(folder, trust_domain)
    for region in regions:
        # The region's name too: the host name a node has in `deploy/compose.yaml`.
        issue_once(folder, "node", region, node_name(region), region, (*pki.NODE_HOSTS, region))
    for role in ("operator", "reviewer"):
        issue_once(folder, role, PRIMARY, role, role)


def init_deployment(
    directory: str | Path,
    ports: list[int] | None = None,
    keys: Callable[[Path, str], dict[str, Any]] = local_keys,
) -> dict[str, Path]:
    """Writes the deployment into `directory`; returns each region's config path. `keys`
    gives a region's `keys:` config (default: the local provider)."""
    d = Path(directory).resolve()
    if (d / "keys").is_dir() and any(p.is_file() for p in (d / "keys").rglob("*")):
        raise KeyExists(f"{d / 'keys'} already holds keys: init never overwrites a deployment's keys")
    d.mkdir(parents=True, exist_ok=True)
    regions = (PRIMARY, *AFFILIATES)
    ports = ports or free_ports(len(regions))
    copy_json_schemas(d)
    (d / "schema.yaml").write_text(editor_schema("schema") + EXAMPLE_SCHEMA)
    (d / "rules.yaml").write_text(editor_schema("rules") + EXAMPLE_RULES)
    (d / "access.yaml").write_text(editor_schema("access") + EXAMPLE_ACCESS)
    init_pki(d, regions)
    for region in regions:
        # The primary signs the copies it sends with its region's; a region node checks them
        # against the home's copy.pub (each region has one, should it become the primary).
        create_copy_key(region, d / "keys" / region)
    addresses = {r: f"127.0.0.1:{p}" for r, p in zip(regions, ports, strict=True)}
    metrics = dict(zip(regions, free_ports(len(regions)), strict=True))
    paths = {}
    for region in regions:
        config: dict[str, Any] = {
            "region": region,
            "role": "primary" if region == PRIMARY else "region",
            "listen": addresses[region],
            "tls": {"cert": f"pki/{region}.crt", "key": f"pki/{region}.key", "ca": "pki/ca.crt"},
            "data_dir": f"data/{region}",
            "schema": "schema.yaml",
            "rules": "rules.yaml",
            "access": "access.yaml",
            "keys": keys(d, region),
            "durability": "full",
            "checkpoint_interval_seconds": 60,
            # Prometheus text over plain HTTP, on loopback here: no personal data in it.
            "metrics": {"listen": f"127.0.0.1:{metrics[region]}"},
        }
        if region == PRIMARY:
            config["affiliates"] = [
                {"region": a, "address": addresses[a], "public_key": f"keys/{a}/region.pub"}
                for a in AFFILIATES
            ]
            config["replicator"] = {"enabled": True, "batch_size": 500}
        else:
            config["home"] = {"region": PRIMARY, "signing_key": f"keys/{PRIMARY}/copy.pub"}
        paths[region] = d / f"{region}.yaml"
        paths[region].write_text(editor_schema("node") + yaml.safe_dump(config, sort_keys=False))
    for region in regions:
        generate_keys(paths[region])
    make_private(d / "keys")
    return paths


def make_private(folder: Path) -> None:
    """Key folders are their owner's alone, whatever the umask was: folders 0700, files 0600
    (public keys, `*.pub`, stay readable)."""
    for path in (folder, *folder.rglob("*")):
        if path.is_dir():
            path.chmod(0o700)
        elif path.suffix != ".pub":
            path.chmod(0o600)


def generate_keys(config_path: Path) -> None:
    """Creates a region's key, its node's log signing key and, for the primary, its hash key,
    in its provider's care (each unless it is there already)."""
    config = load_config(config_path)
    c = config.keys
    if not (c.dir / "region.key").exists():
        # (the local provider just made is reused: opening it again would cost another scrypt)
        provider = LocalProvider.create(c.dir, c.passphrase) if c.provider == "local" else open_provider(c)
        try:
            if hasattr(provider, "ensure_key"):
                provider.ensure_key()
            RegionKey.generate(config.region, c.dir, provider, c.kem)
        finally:
            provider.close()
    if not config.log_key.exists():
        # Each node signs its own transfer log's checkpoints with its own key, wrapped under a
        # key of its own that a shred of the region's key leaves alone.
        log_keys = open_log_provider(c, create=True)
        try:
            create_log_key(origin(config.region), c.dir, log_keys)
        finally:
            log_keys.close()
    if config.is_primary and not (c.dir / HASH_KEY).exists():
        # The `hash` transformation's secret, under the same provider key as `log.key`.
        log_keys = open_log_provider(c)
        try:
            create_hash_key(c.dir, log_keys)
        finally:
            log_keys.close()


def start_node(config: Path) -> subprocess.Popen[bytes]:
    """`residency serve --config CONFIG` as a child process, its output appended to
    `node.log` in the node's data_dir."""
    data = load_config(config).data_dir
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(data / "node.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "residency.cli", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def check_running(procs: dict[str, subprocess.Popen[bytes]], configs: dict[str, Path]) -> None:
    """Raises, with the tail of its log, if one of the node processes has exited."""
    for region, proc in procs.items():
        if proc.poll() is not None:
            log = load_config(configs[region]).data_dir / "node.log"
            tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            raise RuntimeError(f"node {region} exited with status {proc.returncode}:\n" + "\n".join(tail))
