"""The errors switchformer raises for a user's mistake: one type per kind of failure.

Every class derives from ``SwitchformerError``, which the command line catches and prints as one line (the
traceback only with ``--debug``). Each also derives from the built-in exception a Python caller would expect
(``ValueError`` for bad values, ``OSError`` for files), so ``except ValueError`` keeps working.

This module imports only the standard library.
"""

from __future__ import annotations


class SwitchformerError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class ConfigError(SwitchformerError, ValueError):
    """A config value, override or recipe is invalid (unknown key, wrong type, out of range)."""


class CheckpointError(SwitchformerError, ValueError):
    """A checkpoint (a run's training checkpoint or a transformers-format directory) is missing, unreadable,
    corrupt or does not match the model."""


class DataError(SwitchformerError, ValueError):
    """A corpus, tokenizer or data file cannot be used as given."""


class RunError(SwitchformerError, ValueError):
    """A run directory cannot be used as asked (e.g. ``--resume`` of a run with a different model)."""
