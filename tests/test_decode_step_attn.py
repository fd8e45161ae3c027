"""The one-token bf16 attention core (zipmoe_run.attn_one): its fixed order, bit for bit against a
numpy reference, and which calls of ``layers.attention`` take it."""
from __future__ import annotations

import pytest
import torch

from zipmoe_run import attn_one
from zipmoe_run.layers import KVCache, attention

BF = torch.bfloat16


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _case(b, h, hkv, d, dv, s, seed, spare=7):
    g = torch.Generator().manual_seed(seed)
    kbuf = torch.randn(b, hkv, s + spare, d, generator=g).to(BF)  # a cache of s + spare positions
    vbuf = torch.randn(b, hkv, s + spare, dv, generator=g).to(BF)
    q = torch.randn(b, h, 1, d, generator=g).to(BF)
    return q, kbuf[:, :, :s], vbuf[:, :, :s]


@pytest.mark.parametrize("b,h,hkv,d,dv,s", [(1, 9, 3, 64, 64, 40), (1, 16, 16, 128, 128, 65), (2, 4, 2, 8, 8, 1),
                                            (1, 4, 1, 70, 6, 33), (3, 6, 3, 34, 16, 17)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference_bit_for_bit(b, h, hkv, d, dv, s, masked):
    q, k, v = _case(b, h, hkv, d, dv, s, seed=b * 1000 + s)
    mask = None
    if masked:  # a sliding window's decode mask: the oldest positions hidden
        mask = torch.zeros(1, s, dtype=BF).masked_fill_(torch.arange(s)[None] < s // 3, torch.finfo(BF).min)
    assert attn_one.takes(q, k, v, mask)
    got = attention(q, k, v, 0.125, mask)  # layers.attention dispatches here
    assert got.shape == (b, 1, h, dv) and got.dtype is BF
    assert torch.equal(_bits(got), _bits(attn_one.reference(q, k, v, 0.125, mask)))


def test_rows_of_a_batch_equal_each_row_alone():
    q, k, v = _case(3, 8, 2, 32, 32, 21, seed=3)
    whole = attention(q, k, v, 0.2, None)
    for i in range(3):
        alone = attention(q[i:i + 1], k[i:i + 1].contiguous(), v[i:i + 1].contiguous(), 0.2, None)
        assert torch.equal(_bits(whole[i:i + 1]), _bits(alone))


def test_reads_a_kv_cache_slice_in_place():
    """The cache's first S of max_len positions (a strided view) give what a contiguous copy gives."""
    cache = KVCache(1, 1, 50, 2, 16, None, BF)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 12, 16, generator=g).to(BF)
    v = torch.randn(1, 2, 12, 16, generator=g).to(BF)
    ks, vs = cache.update(0, k, v, 0)  # [1, 2, 12, 16] views of [1, 2, 50, 16]
    assert not ks.is_contiguous()
    q = torch.randn(1, 4, 1, 16, generator=g).to(BF)
    assert torch.equal(_bits(attention(q, ks, vs, 0.25, None)), _bits(attention(q, k, v, 0.25, None)))


def test_close_to_float32_eager():
    q, k, v = _case(1, 8, 4, 64, 64, 30, seed=9)
    got = attention(q, k, v, 0.125, None).float()
    want = attention(q.float(), k.float(), v.float(), 0.125, None)  # float32: the eager path
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2)


def test_other_calls_keep_the_eager_path():
    q, k, v = _case(1, 4, 2, 16, 16, 5, seed=2)
    assert not attn_one.takes(q.float(), k.float(), v.float(), None)  # float32 runs: parity with transformers
    q2 = torch.cat([q, q], dim=2)  # T = 2: a prefill
    assert attention(q2, k, v, 0.5, None).shape == (1, 2, 4, 16)
    assert not attn_one.takes(q2, k, v, None)
    assert not attn_one.takes(q, k, v, torch.zeros(4, 1, 5, dtype=BF))  # a mask of another shape
    assert not attn_one.takes(q[..., :15], k[..., :15], v, None)  # odd head dim
