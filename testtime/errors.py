"""Errors in what the user asked for: a model path, a checkpoint, a data file, a setting.

They carry a message that says what is wrong and how to fix it, so the command line prints that
message alone and exits with status 1 (`TESTTIME_TRACEBACK=1` adds the traceback); so does a
`FileNotFoundError`, which names the missing path. Each also
derives from the built-in exception a caller would expect (`FileNotFoundError`, `ValueError`,
...), so `except FileNotFoundError` keeps working in a notebook.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message says why."""


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model path, alias or hub id that cannot be loaded here."""


class MissingPackageError(UserError, ModuleNotFoundError):
    """An optional package a feature needs is not installed (the message gives the pip command)."""


class HubUnreachableError(UserError, OSError):
    """A hub id that is not cached locally while the Hugging Face Hub cannot be reached."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or exported folder that does not fit: weights missing, sizes or settings that disagree."""


class DataError(UserError, ValueError):
    """A data file or record that cannot be used (named, with the record and field)."""


class SettingError(UserError, ValueError):
    """A value in a config or on the command line that a class refused while being built (the CLI
    turns the ValueError of a constructor into it)."""


class UsageError(UserError, RuntimeError):
    """A command that the chosen module or recipe does not support (e.g. `fit` on an evaluation-only method)."""
