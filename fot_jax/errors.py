"""Errors every layer raises (the lowest module of the package: it imports nothing of it)."""


class ConfigError(ValueError):
    """A config field holds a value the system cannot run with."""
