"""Developer tools run as modules, e.g. ``python -m diffmem.tools.layers`` (the import rule)."""
