"""Typed configuration files: node config, schema and transfer rules."""
