"""Exceptions raised by peftvision. Every message names the problem and, where there is one, the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftVisionError(Exception):
    """Base class of every error peftvision raises on purpose."""


class ConfigError(PeftVisionError, ValueError):
    """A method configuration value is invalid."""


class UnknownMethodError(PeftVisionError, KeyError):
    """The method name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TargetError(PeftVisionError, ValueError):
    """The target specification matched no module of the model."""


class UnsupportedArchitectureError(PeftVisionError, ValueError):
    """The method does not support this model architecture."""


class NotAppliedError(PeftVisionError, ValueError):
    """The operation needs a model that peftvision.apply has changed."""


class MergeError(PeftVisionError, RuntimeError):
    """The applied adapters cannot be merged (or unmerged)."""


class OfflineError(PeftVisionError, ConnectionError):
    """The Hugging Face Hub cannot be reached and the operation needs it."""


class AdapterLoadError(PeftVisionError, ValueError):
    """An adapter checkpoint cannot be loaded onto this model."""


class CorruptAdapterError(AdapterLoadError):
    """An adapter file is truncated, corrupt or does not match its config."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """" (did you mean 'lora'?)" for the closest choices, or "" when none is close."""
    close = difflib.get_close_matches(str(word).lower(), list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
