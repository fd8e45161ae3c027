"""The GEMV called by address (``kernels_addr``) gives exactly what the numpy-view path gave: the same
float32 sums, the bias added in float32, torch's rounding to bf16 (NaN included), for any layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zipmoe_run import kernels

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="numba kernel unavailable")


def _old(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``_gemv_linear`` as it was before the address path: numpy views, float32 out, torch converts."""
    n, k = w.shape
    out = np.empty(n, dtype=np.float32)
    kernels._gemv(w.view(torch.int32).numpy().view(np.uint32).reshape(n, k // 2), kernels.bf16_words(x, k)[0], out)
    y = torch.from_numpy(out)
    if b is not None:
        y += b.float()
    return y.to(torch.bfloat16).view(*x.shape[:-1], n)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _specials(g: torch.Generator, n: int) -> torch.Tensor:
    """n float32 values with NaNs, infinities, huge and tiny ones at random places."""
    v = torch.randn(n, generator=g) * torch.logspace(-30, 30, n)
    raw = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x00000001],
                       dtype=torch.int64).to(torch.int32).view(torch.float32)
    at = torch.randint(0, n, (len(raw),), generator=g)
    v[at] = raw
    return v


def test_the_address_path_is_in_use_here():
    assert kernels._NAN16 is not None, "torch's bf16 rounding here was not recognised; the old path runs"


@pytest.mark.parametrize("n,k", [(1, 2), (5, 30), (7, 64), (9, 66), (33, 1408), (60, 2048), (130, 34)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_same_bits_as_the_conversion_path(n, k, threads, bias):
    g = torch.Generator().manual_seed(n * 7 + k)
    w = (torch.randn(n, k, generator=g) * torch.logspace(-3, 3, k)).bfloat16()
    x = torch.randn(1, 1, k, generator=g).bfloat16()
    b = (torch.randn(n, generator=g) * 100).bfloat16() if bias else None
    kernels.set_threads(threads)
    y = kernels._gemv_linear(x, w, b)
    assert y.dtype is torch.bfloat16 and y.shape == (1, 1, n)
    assert torch.equal(_bits(y), _bits(_old(x, w, b)))


@pytest.mark.parametrize("bias", [False, True])
def test_nan_inf_overflow_and_subnormal_results_round_as_torch(bias):
    """Weights with NaN, infinities and values whose sums overflow or are subnormal: every output bit,
    NaN's pattern included, is what torch's conversion of the float32 sums gives."""
    g = torch.Generator().manual_seed(5)
    n, k = 200, 64
    w = _specials(g, n * k).view(n, k).bfloat16()
    x = torch.randn(1, k, generator=g).bfloat16()
    b = _specials(g, n).bfloat16() if bias else None
    y = kernels._gemv_linear(x, w, b)
    old = _old(x, w, b)
    assert torch.isnan(old).any() and torch.isinf(old).any()
    assert torch.equal(_bits(y), _bits(old))


@pytest.mark.parametrize("layout", ["odd offset", "strided", "batched view", "row of a batch"])
def test_inputs_of_every_layout_read_as_the_old_path(layout):
    k = 66
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(5, k, generator=g) * torch.logspace(-3, 3, k)).bfloat16()
    big = torch.randn(3, 2 * k + 2, generator=g).bfloat16()
    x = {"odd offset": big[1:2, 1:k + 1], "strided": big[1:2, : 2 * k : 2],
         "batched view": big[1:2, 1:k + 1].view(1, 1, k), "row of a batch": big[2:3, 2:k + 2]}[layout]
    y = kernels._gemv_linear(x, w, None)
    assert y.shape == (*x.shape[:-1], 5)
    assert torch.equal(_bits(y), _bits(_old(x, w, None)))
    assert torch.equal(big, big.clone())  # the input is not written


def test_weight_views_of_a_larger_buffer_and_a_float32_bias():
    """A weight that is a row slice of a bigger tensor (even offset) reads only its rows; a bias that
    is not bf16 takes the conversion path (``y += b.float()``) and gives what it always gave."""
    g = torch.Generator().manual_seed(2)
    big = torch.randn(40, 128, generator=g).bfloat16()
    w = big[10:30]
    x = torch.randn(1, 128, generator=g).bfloat16()
    assert torch.equal(_bits(kernels._gemv_linear(x, w, None)), _bits(_old(x, w, None)))
    b32 = torch.randn(20, generator=g)
    assert torch.equal(_bits(kernels._gemv_linear(x, w, b32)), _bits(_old(x, w, b32)))


def test_outputs_are_fresh_tensors():
    """Each call returns its own tensor: a result kept by the caller is not overwritten by the next."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g).bfloat16()
    x1, x2 = torch.randn(1, 64, generator=g).bfloat16(), torch.randn(1, 64, generator=g).bfloat16()
    y1 = kernels._gemv_linear(x1, w, None)
    keep = y1.clone()
    y2 = kernels._gemv_linear(x2, w, None)
    assert y1.data_ptr() != y2.data_ptr() and torch.equal(_bits(y1), _bits(keep))


def test_nan_pattern_is_what_torch_gives_here():
    from zipmoe_run import kernels_addr as ka

    f = np.array([np.nan, -np.nan, 1.0, 3e38, 1e-45], dtype=np.float32)
    ref = torch.from_numpy(f).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ka.round_reference(f, ka.nan_pattern()), ref)


def test_a_torch_that_rounds_otherwise_keeps_the_conversion_path(monkeypatch):
    """Where torch's conversion is not round-to-nearest-even with one NaN pattern, the kernel's own
    rounding is not used (``nan_pattern`` says None)."""
    from zipmoe_run import kernels_addr as ka

    real = torch.Tensor.to

    def truncating(self, *a, **kw):  # float32 -> bf16 by dropping the low half (no rounding)
        if self.dtype is torch.float32 and torch.bfloat16 in a:
            return torch.from_numpy((self.numpy().view(np.uint32) >> 16).astype(np.uint16).view(np.int16)) \
                .view(torch.bfloat16)
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "to", truncating)
    assert ka.nan_pattern() is None


def test_mismatched_shapes_raise_and_never_read_past_the_input():
    """An input shorter than the weight rows is refused (as before: an error, not a read past its end)."""
    w = torch.randn(4, 128).bfloat16()
    with pytest.raises(RuntimeError):
        kernels._gemv_linear(torch.randn(1, 64).bfloat16(), w, None)
    with pytest.raises(RuntimeError):
        kernels._gemv_linear(torch.randn(1, 66).bfloat16(), w, None)


def test_a_meta_weight_is_an_error_not_a_crash():
    w = torch.empty(4, 64, dtype=torch.bfloat16, device="meta")
    with pytest.raises((RuntimeError, TypeError, NotImplementedError)):
        kernels._gemv_linear(torch.randn(1, 64).bfloat16(), w, None)
