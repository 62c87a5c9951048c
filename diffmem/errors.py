"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class DiffmemError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class ConfigError(DiffmemError):
    """A config value is missing, unknown or out of range."""


class DataError(DiffmemError):
    """An input file (image, manifest, prompt list, feature file, weights) is unusable."""


class OutputError(DiffmemError):
    """An output file cannot be written there (read-only, no permission, disk full, size limit)."""
