"""The benchmarks' one error class for a request they cannot serve (an unknown system or dataset,
sizes out of range, a checkpoint without what the benchmark needs). It is a ``ZmoeError`` (the CLI
prints it as one line) and a ``ValueError`` (what these functions raised before)."""
from __future__ import annotations

from formats.errors import InputError

__all__ = ["BenchInputError"]


class BenchInputError(InputError, ValueError):
    """Bad benchmark input; the message is one line naming the option or file."""
