"""The error a user can fix: bad data, a bad setting, a model and pruner that do not go together.

Every such error subclasses :class:`UserError` (next to the built-in type callers already
catch, ``ValueError`` or ``FileNotFoundError``), and its message says what was wrong and how
to fix it. The entry points print it as one line, ``error: <message>``, and exit with status
2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors a user fixes by changing the data, the settings or the command."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder a setting names does not exist; the message names the setting."""


class ConfigError(UserError, ValueError):
    """A model or run setting is invalid; the message names the setting, the value and what is allowed."""


class DataError(UserError, ValueError):
    """A data file or data setting is unusable; the message says what and how to fix it."""
