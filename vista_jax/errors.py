"""Errors a user can cause and fix: bad data, flags, config, cache, checkpoint
or serving request.

Every such error derives from `UserError`. `run.py` prints a `UserError` as one line (what was
wrong, where, and what to do) and exits with status 2; anything else is a bug and keeps its
traceback. Messages are written for the person at the command line, not for the code.
"""


class UserError(Exception):
    """A mistake in the user's input; the message says what, where, and how to fix it."""


class ConfigError(UserError, ValueError):
    """A bad config variant, key or value (names the key and the nearest valid one)."""


class DataError(UserError, ValueError):
    """Bad input data (names the file, line or column, and the fix)."""


class CheckpointError(UserError):
    """A missing, corrupt or mismatched checkpoint (names the directory, step or field)."""


class RequestError(UserError, ValueError):
    """A serving request that cannot be scored: unknown user, item out of range, bad shape."""


class WorkdirError(UserError):
    """A workdir that cannot be used (e.g. not writable)."""
