"""A one-token step's rotary of q and k with the KV cache update in one call (``decode_ops.rope_cache``):
the bits of ``apply_rotary`` + ``KVCache.update`` (q, the whole cache), which steps take it, and whole
decode steps of every decoder family with and without it."""
from __future__ import annotations

import pytest
import torch

from zipmoe_run import decode_ops
from zipmoe_run.api import load
from zipmoe_run.layers import KVCache, apply_rotary

BF = torch.bfloat16


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _heads(g, n, d, scale=1.0):
    z = (torch.randn(1, 1, n, d, generator=g) * scale).to(BF)
    z.view(-1)[:6] = torch.tensor([0.0, -0.0, 3.3e38, -1e-39, 1.0 + 2**-8, 65504.0]).to(BF)  # signed zeros, overflow
    return z


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 16), (9, 3, 64), (8, 1, 6), (2, 2, 128)])
@pytest.mark.parametrize("pos", [0, 5, 12])
def test_rope_cache_gives_the_eager_bits(hq, hkv, d, pos):
    g = torch.Generator().manual_seed(hq * 100 + d + pos)
    q, k, v = _heads(g, hq, d), _heads(g, hkv, d, 4.0), _heads(g, hkv, d)
    ang = torch.randn(1, d // 2, generator=g) * 3
    cos, sin = torch.cat((ang, ang), -1).cos().to(BF), torch.cat((ang, ang), -1).sin().to(BF)  # [1, D]
    ref_cache, cache = KVCache(1, 1, 13, hkv, d, None, BF), KVCache(1, 1, 13, hkv, d, None, BF)
    for c in (ref_cache, cache):  # earlier positions hold something (they must stay as they are)
        c.k[0].copy_(torch.randn(1, hkv, 13, d, generator=torch.Generator().manual_seed(1)).to(BF))
        c.v[0].copy_(torch.randn(1, hkv, 13, d, generator=torch.Generator().manual_seed(2)).to(BF))
    rq = apply_rotary(q.transpose(1, 2), cos, sin)
    rk, rv = ref_cache.update(0, apply_rotary(k.transpose(1, 2), cos, sin), v.transpose(1, 2), pos)
    assert decode_ops.takes_rope_cache(q, k, v, cos, sin, cache, 0, pos)
    gq, gk, gv = decode_ops.rope_cache(q, k, v, cos, sin, cache.k[0], cache.v[0], pos)
    assert gq.shape == rq.shape == (1, hq, 1, d) and gk.shape == rk.shape and gv.shape == rv.shape
    assert torch.equal(_bits(gq), _bits(rq))
    assert torch.equal(_bits(cache.k[0]), _bits(ref_cache.k[0]))  # the row written, every other row kept
    assert torch.equal(_bits(cache.v[0]), _bits(ref_cache.v[0]))
    assert torch.equal(_bits(gk), _bits(rk)) and torch.equal(_bits(gv), _bits(rv))


def test_what_it_does_not_take():
    q, k = torch.zeros(1, 1, 4, 8, dtype=BF), torch.zeros(1, 1, 2, 8, dtype=BF)
    cs = torch.zeros(1, 8, dtype=BF)
    cache = KVCache(1, 1, 4, 2, 8, None, BF)
    assert decode_ops.takes_rope_cache(q, k, k, cs, cs, cache, 0, 3)
    assert not decode_ops.takes_rope_cache(q, k, k, cs, cs, cache, 0, 4)  # no room: KVCache.update says so
    assert not decode_ops.takes_rope_cache(q.float(), k, k, cs, cs, cache, 0, 0)  # float32 runs: eager
    assert not decode_ops.takes_rope_cache(torch.zeros(1, 2, 4, 8, dtype=BF), k, k, cs, cs, cache, 0, 0)  # 2 tokens
    assert not decode_ops.takes_rope_cache(q, k, k, torch.zeros(2, 8, dtype=BF), cs, cache, 0, 0)
    assert not decode_ops.takes_rope_cache(q, k, k, cs, cs, KVCache(1, 2, 4, 2, 8, None, BF), 0, 0)  # batch 2
    odd = torch.zeros(1, 1, 4, 7, dtype=BF)
    assert not decode_ops.takes_rope_cache(odd, odd[:, :, :2], odd[:, :, :2], cs[:, :7], cs[:, :7],
                                           KVCache(1, 1, 4, 2, 7, None, BF), 0, 0)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral"])
def test_decode_steps_are_unchanged(family, checkpoint_factory, monkeypatch):
    """Logits and the whole KV cache of a prompt and 4 greedy steps, with and without the fused call."""
    src = checkpoint_factory(family, seed=5, dims={"experts": 4, "top_k": 2, "hidden": 64, "layers": 2})
    calls = []
    real = decode_ops.rope_cache

    def run(fused: bool):
        with monkeypatch.context() as m:
            if fused:
                m.setattr(decode_ops, "rope_cache", lambda *a: calls.append(1) or real(*a))
            else:
                m.setattr(decode_ops, "takes_rope_cache", lambda *a: False)
            with load(src, dtype="bfloat16", threads=2) as lm:
                model, cache = lm.model, lm.model.new_cache(1, 16)
                logits = [model(torch.tensor([[3, 9, 27, 81]]), cache, 0, last_only=True)]
                for i in range(4):
                    logits.append(model(logits[-1][:, -1:].argmax(-1), cache, 4 + i, last_only=True))
                return logits, cache

    ref_logits, ref_cache = run(False)
    got_logits, got_cache = run(True)
    assert calls  # the steps took it
    for a, b in zip(got_logits, ref_logits):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    for a, b in zip(got_cache.k + got_cache.v, ref_cache.k + ref_cache.v):
        assert torch.equal(_bits(a), _bits(b))
