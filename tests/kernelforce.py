"""A test that is about one kernel forces it (``ZIPMOE_KERNEL``): ``auto`` would choose per host by measurement."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def forced_kernel(monkeypatch, name: str) -> Iterator[None]:
    """``ZIPMOE_KERNEL=name`` with the kernel choices reset before and after, and the kernel's threads back
    at torch's count afterwards."""
    from zipmoe_run import kernel_select, kernels

    monkeypatch.setenv(kernel_select.ENV, name)
    kernel_select.reset()
    try:
        yield
    finally:
        kernel_select.reset()
        kernels.set_threads(torch.get_num_threads())
