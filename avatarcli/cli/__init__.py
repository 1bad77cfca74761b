"""The ``avatar`` command line: one module per command, imported lazily (no torch for --help)."""
