"""Errors the runtime raises. Every message is one line the CLI can print as is."""
from __future__ import annotations

from formats.errors import ZmoeError

__all__ = [
    "RuntimeErrorBase",
    "UnsupportedModelError",
    "MissingWeightError",
    "TokenizerError",
    "GenerationError",
    "PromptTooLongError",
]


class RuntimeErrorBase(ZmoeError):
    """Base class for everything zipmoe_run rejects."""


class UnsupportedModelError(RuntimeErrorBase):
    """The checkpoint's model_type or one of its settings is not implemented by the runtime."""


class MissingWeightError(RuntimeErrorBase, KeyError):
    """A tensor the model needs is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TokenizerError(RuntimeErrorBase):
    """No usable tokenizer (tokenizer.json missing, or no chat template)."""


class GenerationError(RuntimeErrorBase):
    """A generation request cannot be served (bad sampling settings, empty prompt, ...)."""


class PromptTooLongError(GenerationError):
    """Prompt plus requested new tokens exceed the model's context length."""
