"""Errors every layer raises (the lowest module of the package: it imports nothing of it).

Every error that fot_jax raises on purpose is a `FotError`: a message meant for the user, which the
command line prints as one line (exit status 2) instead of a traceback. Each subsystem's error also
derives from the built-in class that says what went wrong (ValueError: a bad value; RuntimeError:
a failed operation), so `except ValueError` still catches it.
"""


class FotError(Exception):
    """An error whose message is for the user: what is wrong and what to do."""


class ConfigError(FotError, ValueError):
    """A config field holds a value the system cannot run with."""


class UsageError(FotError, ValueError):
    """A command-line or call mistake (a missing flag, a bad path): one line naming the fix."""
