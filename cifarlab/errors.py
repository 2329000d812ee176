"""Errors cifarlab raises for bad input. The CLI prints their message and exits with status 2."""


class CifarlabError(Exception):
    """Base class: a problem with the user's input, config or files, not a bug."""


class ConfigError(CifarlabError, ValueError):
    """An invalid configuration value (flag, YAML field, recipe name)."""


class DataError(CifarlabError, ValueError):
    """A dataset file or folder that is missing, corrupt or not in the expected layout."""


class CheckpointError(CifarlabError, ValueError):
    """A checkpoint or saved state that is missing, corrupt or incompatible."""
