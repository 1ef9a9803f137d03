"""The detector's user-error types: a file, a field or a value that is wrong, not a bug.

Each message names the file (and the field) at fault and what is allowed; the harness CLI prints it
as one line and exits 2 (`detector.api.USER_ERRORS`). This module imports nothing heavy, so the
harness can catch these types without importing torch.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that does not exist; the message names the field and the allowed values."""


class DataError(ValueError):
    """Bad or inconsistent data on disk; the message names the file (and the field) at fault."""


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names the file."""


USER_ERRORS: tuple[type[ValueError], ...] = (ConfigError, DataError, WeightsError)
