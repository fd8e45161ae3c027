"""Keep a loaded model's dense bf16 weights in the 12-bit form (``x12``) instead of bf16.

``to_x12(model)`` replaces every bf16 ``layers.Linear`` (attention projections, shared experts, dense
MLPs, lm_head) by an :class:`X12Linear` holding the same weight in the 12-bit form (about 0.75 of
the bytes, exactly invertible), by module name; nothing is monkeypatched. The routed experts are the
store's and stay as they are.

What each product computes (so that results stay bit-identical to the bf16 model's, on every host):

* where the bf16 model would run the numba GEMV (the kernel chosen for this shape on this host,
  ``kernel_select``): one bf16 input row, or the M rows of a ``kernels.decode_rows_scope`` (batched
  decode), go through ``x12_kernel.gemv``, which reads the 12-bit form directly and sums every row in
  the numba GEMV's fixed order: bit for bit the bf16 model's result (M rows rebuild each weight row
  once);
* anything else (prefill, shapes where torch's kernel was chosen, float32 inputs): the weight is
  decoded to a temporary bf16 tensor and handed to ``kernels.linear``, i.e. exactly the bf16 model's
  path (correct, but it pays a decode per product: :func:`to_x12` therefore converts by default only
  the modules whose shape uses the numba GEMV).

``load(path, resident="x12")`` is ``api.load`` followed by :func:`to_x12`; ``ZIPMOE_RESIDENT=x12``
asks for the same through :func:`resident_mode` (read by whoever wires it into ``api.load``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from . import kernels as K
from . import x12 as X
from . import x12_kernel as XK

__all__ = ["ENV", "MODES", "X12Linear", "to_x12", "x12_linear", "resident_mode", "load"]

log = logging.getLogger(__name__)

ENV = "ZIPMOE_RESIDENT"
MODES = ("bf16", "x12")


def resident_mode(requested: str | None = None) -> str:
    """``requested`` if given, else ``$ZIPMOE_RESIDENT``, else bf16 (a ValueError names a bad value)."""
    m = (requested if requested is not None else os.environ.get(ENV, "bf16")).strip().lower() or "bf16"
    if m not in MODES:
        raise ValueError(f"resident form {m!r} is not one of {', '.join(MODES)}")
    return m


def _u16(w: torch.Tensor) -> np.ndarray:
    """bf16 [N, K] -> its bit patterns uint16 [N, K] (a view when contiguous)."""
    return w.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def _bf16(x12: X.X12) -> torch.Tensor:
    """The bf16 weight [N, K] decoded from ``x12`` (a new tensor)."""
    return torch.from_numpy(X.to_bf16(x12).view(np.int16)).view(torch.bfloat16)


def x12_linear(x: torch.Tensor, w: X.X12, b: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 rows x [..., K] times w [N, K] in x12 (+ b [N]) -> bf16 [..., N], each row as
    ``kernels._gemv_linear`` computes it with the bf16 weight (same float32 sum, bias, rounding)."""
    n, k = w.shape
    xf = x.reshape(-1, k).float().numpy()  # [M, K]
    y = torch.from_numpy(XK.gemv(w, xf))  # [M, N] float32
    if b is not None:
        y += b.float()
    return y.to(torch.bfloat16).view(*x.shape[:-1], n)


def numba_chosen(n: int, k: int) -> bool:
    """Whether the bf16 model's one-row product of an [n, k] weight is the numba GEMV here (the kernel
    chosen for this shape at this thread count; chosen now if it has not been)."""
    t = K._scope_threads or torch.get_num_threads()
    kern = K.CHOICE.get((n, k, t))
    if kern is None:
        from .kernel_select import kernel_for

        kern = kernel_for(n, k, t)
    return kern == "numba" and K.enabled()


class X12Linear(nn.Module):
    """A bias-optional linear layer whose weight [out, in] is held in the 12-bit form."""

    def __init__(self, weight: X.X12, bias: torch.Tensor | None = None):
        super().__init__()
        self.x12 = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "X12Linear":
        return cls(X.from_bf16(_u16(lin.weight)), lin.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The bf16 weight [out, in], decoded now (a new tensor each time; for inspection and tests)."""
        return _bf16(self.x12)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bytes={self.x12.nbytes} (x{self.x12.ratio:.3f} of bf16), escapes={self.x12.escapes}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        k = self.in_features
        if (x.dtype is torch.bfloat16 and k % 2 == 0 and (x.numel() == k or (K._decode_rows and x.numel() > 0))
                and XK.available() and numba_chosen(self.out_features, k)):
            return x12_linear(x, self.x12, self.bias)
        return K.linear(x, _bf16(self.x12), self.bias)  # exactly the bf16 model's path


def to_x12(model: nn.Module, select: Callable[[str, int, int], bool] | None = None) -> dict:
    """Replace the model's bf16 ``layers.Linear`` modules (2-D weight, even in-features) by
    :class:`X12Linear`; returns ``{"modules", "bf16_bytes", "x12_bytes", "escapes"}``. ``select(name,
    out, in)`` picks the modules; the default picks those whose shape uses the numba GEMV on this host
    (:func:`numba_chosen`; elsewhere x12 would cost a decode per product). A weight shared with another
    module (a tied lm_head) is converted too; the other module keeps its bf16 tensor."""
    from .layers import Linear

    if not XK.available():
        log.warning("resident x12: the numba kernels are unavailable; weights stay bf16")
        return {"modules": 0, "bf16_bytes": 0, "x12_bytes": 0, "escapes": 0}
    if select is None:
        def select(name: str, n: int, k: int) -> bool:
            return numba_chosen(n, k)

    todo = [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, Linear) and mod.weight.dtype is torch.bfloat16 and mod.weight.dim() == 2
            and mod.weight.shape[1] % 2 == 0 and select(name, *mod.weight.shape)]
    stats = {"modules": 0, "bf16_bytes": 0, "x12_bytes": 0, "escapes": 0}
    for name, mod in todo:
        new = X12Linear.from_linear(mod)
        owner_path, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner_path) if owner_path else model, leaf, new)
        stats["modules"] += 1
        stats["bf16_bytes"] += new.x12.bf16_nbytes
        stats["x12_bytes"] += new.x12.nbytes
        stats["escapes"] += new.x12.escapes
    log.info("resident x12: %d linear layers, %d -> %d bytes (x%.3f), %d escapes", stats["modules"],
             stats["bf16_bytes"], stats["x12_bytes"], stats["x12_bytes"] / max(1, stats["bf16_bytes"]),
             stats["escapes"])
    return stats


def load(path, *, resident: str | None = None, **kw):
    """``api.load(path, **kw)``, then the dense weights in the ``resident`` form (default
    ``$ZIPMOE_RESIDENT``, else bf16). x12 applies to bf16 runs only (float32 weights are not bf16)."""
    from .api import load as api_load

    mode = resident_mode(resident)
    lm = api_load(path, **kw)
    if mode == "x12":
        if lm.dtype is torch.bfloat16:
            lm.model.x12_stats = to_x12(lm.model)
        else:
            log.info("resident x12 ignored: the run is %s, not bfloat16", lm.dtype)
    return lm
