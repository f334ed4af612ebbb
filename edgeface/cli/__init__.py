"""The `edgeface` command line: one module per command group."""
