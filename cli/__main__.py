"""`python -m residency.cli`: the same as the `residency` command."""

from residency.cli.main import main

raise SystemExit(main())
