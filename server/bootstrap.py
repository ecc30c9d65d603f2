"""What a containerised node starts from beyond `residency init`'s folder: its keys made in
its provider's care (`residency keys init`) and the Compose stack's own secrets (`init --compose`)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from residency.server.config.node import load_config
from residency.server.core.errors import ConfigError, ResidencyError
from residency.server.deployment import generate_keys, make_private
from residency.server.keys.copykey import create_copy_key
from residency.server.keys.files import write_private
from residency.server.keys.hashkey import open_hash_keys
from residency.server.keys.logkey import load_log_key
from residency.server.keys.providers import open_log_provider, open_provider
from residency.server.keys.region import RegionKey


def init_node_keys(config_path: Path, seed: Path | None = None) -> dict[str, Any]:
    """The keys of the node `config_path` configures, in its `keys.dir`. First the files of
    `seed` (e.g. a mounted Secret holding what `residency init` wrote) that the folder lacks
    are copied in; then whatever is still missing is created with the node's provider (its
    Transit or KMS key included), as `residency init` does. Nothing there is ever
    overwritten, so running it again changes nothing. Last, the keys are opened as the node
    will open them: keys its provider cannot unwrap (seeded from a deployment of another
    provider, say) are refused here rather than at the node's start, and a refused run takes
    back every file it added (a Transit or KMS key it made stays, for the next run to use)."""
    config = load_config(config_path)
    if seed is not None and not seed.is_dir():
        raise ConfigError(f"--seed {seed}: no such folder; nothing was written")
    folder = config.keys_dir
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    before = {p.name for p in folder.iterdir()}
    seeded = []
    try:
        for f in sorted(seed.iterdir()) if seed is not None else ():
            if f.is_file() and not (folder / f.name).exists():
                write_private(folder / f.name, f.read_bytes(), exclusive=True)
                seeded.append(f.name)
        _make_and_open(config_path)
    except BaseException:
        # A refused run leaves the folder as it found it (it only ever added files).
        for path in folder.iterdir():
            if path.name not in before:
                path.unlink()
        raise
    created = sorted({p.name for p in folder.iterdir()} - before - set(seeded))
    return {"region": config.region, "dir": str(folder), "seeded": seeded, "created": created}


def _make_and_open(config_path: Path) -> None:
    """Creates what the node's key folder lacks, then opens its keys as the node will."""
    config = load_config(config_path)
    folder, provider = config.keys_dir, config.keys.provider
    try:
        generate_keys(config_path)
    except ResidencyError as e:
        hint = ""
        if provider == "openbao":
            hint = f" (is the Transit engine enabled at '{config.keys.mount}'? `bao secrets enable transit`)"
        raise ConfigError(f"{folder}: the {provider} provider cannot make the keys: {e}{hint}") from e
    if not config.copy_key.exists():
        create_copy_key(config.region, folder)
    make_private(folder)
    keys, log_keys = open_provider(config.keys), open_log_provider(config.keys)
    try:
        RegionKey.load(config.region, folder, keys)
        load_log_key(config.log_key, log_keys)
        if config.is_primary:
            open_hash_keys(folder, log_keys)
    except (ResidencyError, ValueError) as e:  # ValueError: material not even in the provider's format
        raise ConfigError(
            f"{folder}: the keys there do not open with the node's {provider} provider ({e}); "
            "were they made for another provider? Nothing was written"
        ) from e
    finally:
        keys.close()
        log_keys.close()


# The files of `DIR/compose`, as `deploy/compose.yaml` names them.
COMPOSE_SECRETS = ("openbao-token", "s3-credentials", "seaweedfs-s3.json")


def write_compose_secrets(deployment: Path) -> Path:
    """What `deploy/compose.yaml` needs besides the deployment, in `DIR/compose`, mode 0600:
    the dev OpenBao's root token, and one S3 key pair written twice, as SeaweedFS's identity
    file and as the shared-credentials file boto3 reads for the primary's log archive.
    Random, so no two stacks share them; written once (kept if there)."""
    folder = deployment / "compose"
    folder.mkdir(mode=0o700, exist_ok=True)
    if any((folder / name).exists() for name in COMPOSE_SECRETS):
        return folder
    token = base64.urlsafe_b64encode(os.urandom(24)).decode()
    key_id, secret = f"RESIDENCY{os.urandom(6).hex().upper()}", base64.b64encode(os.urandom(30)).decode()
    identity = {
        "identities": [
            {
                "name": "residency",
                "credentials": [{"accessKey": key_id, "secretKey": secret}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    texts = (
        token + "\n",
        f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n",
        json.dumps(identity, indent=2) + "\n",
    )
    for name, text in zip(COMPOSE_SECRETS, texts, strict=True):
        write_private(folder / name, text.encode(), exclusive=True)
    return folder
