"""The user-error types every layer raises and the CLI turns into one line with exit code 2, and the helper that
gives an exception's first line. Imports nothing of cmd-dist: every layer may import it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in a config file or override (exit code 2, no traceback)."""


class DataError(RuntimeError):
    """A missing or unreadable dataset file (one-line message naming the file)."""


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated or altered."""


class RunError(ConfigError):
    """A path or URI named as a trained run that is not one (no config.yaml), or a run's file that does not fit the
    run (a dataset of another class count): a user error, one line, exit code 2."""


class RunFolderBusy(RuntimeError):
    """Another live process holds this run folder."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
