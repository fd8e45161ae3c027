"""decode_ops: the rotary embedding bit for bit against the eager bf16 operations, RMSNorm against a
numpy reference of its fixed order, and where ``layers`` uses them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zipmoe_run import decode_ops, kernels
from zipmoe_run.layers import RMSNorm, _rotate_half, apply_rotary

BF = torch.bfloat16


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("xs,cs", [((1, 9, 1, 64), (1, 64)), ((3, 4, 1, 8), (3, 1, 1, 8)), ((2, 4, 5, 16), (5, 16)),
                                   ((1, 2, 3, 6), (1, 1, 3, 6))])
def test_rotary_is_the_eager_bits(xs, cs):
    g = torch.Generator().manual_seed(sum(xs))
    x = (torch.randn(*xs, generator=g) * 5).to(BF)
    x.view(-1)[:3] = torch.tensor([0.0, -0.0, 1e-40])  # zeros of both signs, a subnormal
    cos, sin = torch.randn(*cs, generator=g).to(BF), torch.randn(*cs, generator=g).to(BF)
    assert decode_ops.takes_rotary(x, cos, sin)
    want = (x * cos) + (_rotate_half(x) * sin)  # layers.apply_rotary's eager operations
    assert torch.equal(_bits(apply_rotary(x, cos, sin)), _bits(want))
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # the layout of q after its transpose
    assert torch.equal(_bits(apply_rotary(xt, cos, sin)), _bits(want))


def test_rotary_keeps_float32_eager():
    x, c = torch.randn(1, 2, 1, 8), torch.randn(1, 8)
    assert not decode_ops.takes_rotary(x, c, c)
    assert torch.equal(apply_rotary(x, c, c), (x * c) + (_rotate_half(x) * c))


def _norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """decode_ops.rms_norm's arithmetic in numpy: the GEMV's order for the sum of squares, then the roundings."""
    rows = x.reshape(-1, x.shape[-1])
    out = []
    for r in rows:
        words = r.contiguous().view(torch.int32).numpy().view(np.uint32)[None]
        ss = kernels.gemv_reference(words, r.float().numpy())[0]
        inv = np.float32(1.0) / np.sqrt(np.float32(ss / np.float32(r.numel())) + np.float32(eps))
        h = torch.from_numpy(r.float().numpy() * inv).to(BF)
        out.append(w * h)
    return torch.stack(out).view(x.shape)


def _norm(h: int, seed: int) -> RMSNorm:
    n = RMSNorm(h, 1e-5)
    n.weight = torch.nn.Parameter(torch.randn(h, generator=torch.Generator().manual_seed(seed)).to(BF),
                                  requires_grad=False)
    return n


@pytest.mark.parametrize("shape", [(1, 1, 576), (4, 1, 96), (1, 1, 2048), (1, 1, 34)])
def test_rms_norm_matches_its_reference(shape):
    n = _norm(shape[-1], 1)
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 3).to(BF)
    got = decode_ops.rms_norm(x, n.weight, n.eps)
    assert torch.equal(_bits(got), _bits(_norm_reference(x, n.weight, n.eps)))


def test_rms_norm_in_a_decode_scope_only():
    """Inside a decode step's kernel scope RMSNorm is decode_ops'; a prefill keeps the eager code, and the
    rows of a batched step equal each row alone."""
    if not kernels.enabled():
        pytest.skip("the bf16 kernels are disabled here")
    n = _norm(64, 3)
    x = (torch.randn(5, 1, 64, generator=torch.Generator().manual_seed(4)) * 2).to(BF)
    eager = n.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + n.eps)).to(BF)
    assert torch.equal(_bits(n(x)), _bits(eager))  # no scope: eager
    with kernels.decode_rows_scope():
        rows = n(x)
    assert torch.equal(_bits(rows), _bits(_norm_reference(x, n.weight, n.eps)))
    for i in range(5):
        with kernels.single_row_scope(True):
            assert torch.equal(_bits(n(x[i:i + 1])), _bits(rows[i:i + 1]))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("count", [2, 3])
def test_linear_many_gives_each_products_bits(bias, count):
    """q, k, v (or gate and up) in one kernel call: each output is what its own ``linear`` gives."""
    from zipmoe_run.kernels_addr import linear_many

    g = torch.Generator().manual_seed(count)
    x = torch.randn(1, 1, 96, generator=g).to(BF)
    prods = [(torch.randn(n, 96, generator=g).to(BF), torch.randn(n, generator=g).to(BF) if bias else None)
             for n in (64, 32, 48)[:count]]
    with kernels.single_row_scope(True):
        got = linear_many(x, prods)
        want = [kernels.linear(x, w, b) for w, b in prods]
    assert [t.shape for t in got] == [t.shape for t in want] == [(1, 1, n) for n in (64, 32, 48)[:count]]
    for a, b in zip(got, want):
        assert torch.equal(_bits(a), _bits(b))
    rows = torch.randn(3, 96, generator=g).to(BF)  # several rows: one linear each
    for a, (w, b) in zip(linear_many(rows, prods), prods):
        assert torch.equal(_bits(a), _bits(kernels.linear(rows, w, b)))


@pytest.mark.parametrize("window", [None, 1, 2, 5, 16])
def test_one_query_mask_is_the_general_mask(window):
    """causal_mask's shortcut for one query (no mask while every position is visible) gives what the
    general construction gives."""
    from zipmoe_run.layers import causal_mask

    for start in range(0, 24):
        s = start + 1
        visible = torch.arange(s)[None, :] <= start
        if window:
            visible &= torch.arange(s)[None, :] > start - window
        got = causal_mask(1, start, BF, window)
        if bool(visible.all()):
            assert got is None
        else:
            assert torch.equal(got, torch.zeros(1, s, dtype=BF).masked_fill_(~visible, torch.finfo(BF).min))
