"""Regenerates the JSON Schemas of the config files (server/config/jsonschema/*.json) from
their pydantic models.

`python scripts/gen_jsonschema.py` writes them; `--check` exits 1 if the committed ones
differ from what the models give (a test runs this).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import BaseModel

from residency.server.config import JSONSCHEMA
from residency.server.config.access import AccessFile
from residency.server.config.node import NodeFile
from residency.server.config.rules import RulesFile
from residency.server.config.schema import SchemaFile

MODELS: dict[str, tuple[type[BaseModel], str]] = {
    "node": (NodeFile, "residency node config"),
    "schema": (SchemaFile, "residency schema"),
    "rules": (RulesFile, "residency transfer rules"),
    "access": (AccessFile, "residency access policy"),
}


def generate() -> dict[str, str]:
    """File name -> contents."""
    out = {}
    for name, (model, title) in MODELS.items():
        schema: dict[str, Any] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            **model.model_json_schema(),
            "title": title,
        }
        out[f"{name}.json"] = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the JSON Schemas are stale")
    args = parser.parse_args()
    fresh = generate()
    if args.check:
        stale = [
            n
            for n, text in fresh.items()
            if not (JSONSCHEMA / n).is_file() or (JSONSCHEMA / n).read_text() != text
        ]
        stale += sorted({p.name for p in JSONSCHEMA.glob("*.json")} - set(fresh))
        if stale:
            print("stale JSON Schemas, run scripts/gen_jsonschema.py:", ", ".join(stale))
            return 1
        print(f"JSON Schemas are current ({len(fresh)} files)")
        return 0
    JSONSCHEMA.mkdir(exist_ok=True)
    for name, text in fresh.items():
        (JSONSCHEMA / name).write_text(text)
    print(f"wrote {len(fresh)} files to {JSONSCHEMA}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
