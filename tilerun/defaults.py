"""Defaults shared by the library and the CLI, importable without torch."""

DEFAULT_TILE = 512
DEFAULT_BATCH = 4
