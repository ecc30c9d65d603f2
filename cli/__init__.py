"""`residency`: the command line for operators and reviewers, one module per command group."""
