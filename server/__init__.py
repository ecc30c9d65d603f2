"""The residency node: the layers below the command line (core, config, storage, keys, vault, api) and
the composition root (`node`, `deployment`)."""
