"""Typed configuration files: node config, schema and transfer rules."""

from pathlib import Path

# The files' JSON Schemas, generated from their models by scripts/gen_jsonschema.py and
# installed with the package, so that operators' editors validate the files as they type.
JSONSCHEMA = Path(__file__).parent / "jsonschema"
