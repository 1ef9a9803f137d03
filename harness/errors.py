"""User-facing errors: one clear line, exit code 2, no traceback (see `harness.cli.main`)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave us (a file, a flag, a name); the message names it."""
