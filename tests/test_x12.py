"""The 12-bit form of bf16 (x12): exact round trip for every bit pattern, exact byte accounting, a GEMV
that reads it and equals the bf16 GEMV's fixed order bit for bit, and an x12-resident model whose
logits equal the bf16 model's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zipmoe_run import kernels, x12
from zipmoe_run import x12_kernel as xk

ALL = np.arange(1 << 16, dtype=np.uint16)  # every bf16 bit pattern: NaN payloads, +-inf, subnormals, +-0


def _gauss(n: int, k: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """bf16 bit patterns [N, K] of N(0, scale) weights (round to nearest even, as torch casts)."""
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16() \
        .view(torch.int16).numpy().view(np.uint16)


def _roundtrip(w: np.ndarray) -> x12.X12:
    enc = x12.from_bf16(w)
    back = x12.to_bf16(enc)
    assert back.dtype == np.uint16 and back.shape == w.shape
    assert back.tobytes() == np.ascontiguousarray(w).tobytes()
    return enc


@pytest.mark.parametrize("shape", [(256, 256), (1, 1 << 16), (1 << 16, 1), (512, 128)])
def test_every_bf16_pattern_round_trips(shape):
    w = np.random.default_rng(1).permutation(ALL).reshape(shape)
    enc = _roundtrip(w)
    assert enc.escapes == (1 << 16) - 15 * (1 << 8)  # 256 patterns per exponent, 15 exponents in the table


def test_sorted_patterns_and_rows_of_nothing_but_escapes():
    w = ALL.reshape(512, 128)  # each row holds a single exponent; 15 of 256 exponents are in the table
    enc = _roundtrip(w)
    per_row = np.diff(enc.row_ptr.astype(np.int64))
    assert set(per_row.tolist()) == {0, 128}
    assert (per_row == 128).sum() == 512 - 15 * 2


@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (7, 63), (2, 2), (0, 4), (4, 0)])
def test_odd_and_tiny_shapes(n, k):
    rng = np.random.default_rng(n * 100 + k)
    _roundtrip(rng.integers(0, 1 << 16, size=(n, k), dtype=np.uint16))
    if n * k:
        _roundtrip(_gauss(n, k, seed=k))


def test_gaussian_weights_are_three_quarters_with_rare_escapes_and_a_contiguous_table():
    w = _gauss(256, 2048)
    enc = _roundtrip(w)
    assert enc.contiguous and enc.table[:15].tolist() == list(range(enc.base, enc.base + 15))
    assert enc.escapes / w.size < 0.001
    assert 0.75 <= enc.ratio < 0.755


def test_table_holds_the_fifteen_most_frequent_exponents():
    exps = np.repeat(np.arange(0, 255, 10, dtype=np.uint16), np.arange(1, 27))  # exponent 10*i appears i+1 times
    w = np.random.default_rng(3).permutation(exps << 7 | 0x35).reshape(1, -1)
    enc = _roundtrip(w)
    assert not enc.contiguous
    assert enc.table[:15].tolist() == list(range(110, 255, 10))
    assert enc.escapes == sum(range(1, 12))


def test_nbytes_is_exactly_what_the_arrays_hold():
    w = np.random.default_rng(9).integers(0, 1 << 16, size=(37, 66), dtype=np.uint16)  # ~94 % escapes
    enc = x12.from_bf16(w)
    e = enc.escapes
    assert e > 37 * 66 // 2
    assert enc.row_ptr.dtype == np.uint32 and enc.esc_col.dtype == np.uint16
    assert enc.nbytes == 37 * 33 + 37 * 66 + 16 + 4 * 38 + 2 * e + e
    assert enc.bf16_nbytes == 37 * 66 * 2


def test_decode_into_refuses_a_wrong_output():
    enc = x12.from_bf16(_gauss(4, 8))
    with pytest.raises(ValueError, match=r"uint32 \[4, 4\]"):
        x12.decode_into(enc, np.empty((4, 5), np.uint32))


# -- the GEMV ---------------------------------------------------------------------------------------

needs_numba = pytest.mark.skipif(not xk.available(), reason="numba kernels unavailable")


def _words(w: np.ndarray) -> np.ndarray:
    n, k = w.shape
    return np.ascontiguousarray(w).view(np.uint32).reshape(n, k // 2)


def _bf16_gemv(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The bf16 numba GEMV's raw float32 sums: w uint16 [N, K], x float32 [K] -> [N]."""
    out = np.empty(w.shape[0], np.float32)
    kernels._gemv(_words(w), xk.input_words(x.reshape(1, -1))[0], out)  # x as bf16 pairs [K/2]
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit, except that a NaN equals any NaN: IEEE leaves a NaN result's payload to the hardware
    and the compiler (LLVM may commute an add), so two builds of the same order can differ there."""
    nan = np.isnan(a)
    return np.array_equal(nan, np.isnan(b)) and a[~nan].view(np.uint32).tobytes() == b[~nan].view(np.uint32).tobytes()


def _escapes_everywhere(n: int, k: int, seed: int) -> np.ndarray:
    """Weights whose exponents are uniform over 112..126 (random sign and mantissa), then row r gets
    escapes (a NaN, an infinity, a subnormal, zero, a huge value: exponents 255, 0, 252) at columns r and
    r+1 (mod K), and the last row is all escapes, so every column position (even and odd halves, inside a
    block and in the tail) is an escape in some row."""
    rng = np.random.default_rng(seed)
    w = (rng.integers(112, 127, size=(n, k), dtype=np.uint16) << 7) | rng.integers(0, 1 << 7, size=(n, k),
                                                                                  dtype=np.uint16)
    w |= rng.integers(0, 2, size=(n, k), dtype=np.uint16) << 15
    odd = np.array([0x7FC3, 0xFF80, 0x0005, 0x8003, 0x7E00, 0x0000], np.uint16)
    for r in range(n - 1):
        w[r, r % k] = odd[r % len(odd)]
        w[r, (r + 1) % k] = odd[(r + 3) % len(odd)]
    w[n - 1] = odd[np.arange(k) % len(odd)]
    return w


@needs_numba
@pytest.mark.parametrize("n,k", [(1, 2), (5, 30), (9, 66), (70, 64), (33, 1408), (17, 2048), (3, 2050)])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_equals_the_fixed_order_reference_bit_for_bit(n, k, threads):
    kernels.set_threads(threads)
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * torch.logspace(-3, 3, k)).bfloat16()
    wu = w.view(torch.int16).numpy().view(np.uint16)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(7)).bfloat16().float().numpy()  # [3, K]
    enc = x12.from_bf16(wu)
    y = xk.gemv(enc, x)  # [3, N]
    for r in range(3):
        ref = kernels.gemv_reference(_words(wu), x[r])
        assert y[r].view(np.uint32).tobytes() == ref.view(np.uint32).tobytes()
    assert xk.gemv(enc, x[1]).view(np.uint32).tobytes() == y[1].view(np.uint32).tobytes()  # [K] input


@needs_numba
@pytest.mark.parametrize("n,k", [(40, 34), (41, 98), (64, 2048)])
def test_gemv_with_escapes_in_every_position_equals_the_bf16_gemv(n, k):
    w = _escapes_everywhere(n, k, seed=k)
    enc = x12.from_bf16(w)
    assert enc.contiguous and enc.table[:15].tolist() == list(range(112, 127))
    per_row = np.diff(enc.row_ptr.astype(np.int64))
    assert (per_row[:-1] == 2).all() and per_row[-1] == k
    assert sorted(set(enc.esc_col.tolist())) == list(range(k))
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(1)).bfloat16().float().numpy()
    y = xk.gemv(enc, x)  # two input rows
    for r in range(2):
        ref = _bf16_gemv(w, x[r])
        assert _same(y[r], ref)
        assert _same(xk.gemv(enc, x[r]), ref)  # one input row


@needs_numba
def test_gemv_with_a_lookup_table_and_all_patterns():
    rng = np.random.default_rng(5)
    w = rng.permutation(ALL)  # [65536]
    exps = np.repeat(np.arange(0, 255, 17, dtype=np.uint16), 300)  # [4500]
    top = exps << 7 | rng.integers(0, 1 << 16, exps.size, np.uint16) & 0x807F
    w[rng.choice(w.size, top.size, replace=False)] = top  # exponents 0, 17, .., 238 the most frequent
    w = w.reshape(128, 512)
    enc = x12.from_bf16(w)
    assert not enc.contiguous and enc.table[:15].tolist() == list(range(0, 255, 17))
    assert enc.escapes > w.size // 2
    x = torch.randn(512, generator=torch.Generator().manual_seed(2)).bfloat16().float().numpy()
    y, ref = xk.gemv(enc, x), _bf16_gemv(w, x)
    assert _same(y, ref) and 0 < np.isnan(ref).sum() < ref.size


@needs_numba
def test_a_stale_compiled_kernel_is_caught_and_recompiled(monkeypatch, caplog):
    real = xk._x12_gemv

    class Stale:  # what a stale on-disk cache entry would be: the right source, a wrong compiled result
        py_func = staticmethod(real.py_func)

        def __call__(self, *args):
            args[-2][:] = 0.0

    monkeypatch.setattr(xk, "_x12_gemv", Stale())
    monkeypatch.setattr(xk, "_checked", [])
    assert xk.available()
    assert "recompiling without numba's cache" in caplog.text
    assert xk._x12_gemv is not real and not isinstance(xk._x12_gemv, Stale)
    w = _gauss(9, 66)
    x = torch.linspace(-1, 1, 66).bfloat16().float().numpy()  # bf16 values, as the kernels take
    assert _same(xk.gemv(x12.from_bf16(w), x), _bf16_gemv(w, x))


@needs_numba
def test_a_kernel_that_stays_wrong_is_not_used(monkeypatch, caplog):
    from zipmoe_run.resident import X12Linear

    def wrong(*args):  # writes zeros where the sums go
        args[-2][:] = 0.0

    wrong.py_func = wrong
    monkeypatch.setattr(xk, "_x12_gemv", wrong)
    monkeypatch.setattr(xk, "njit", lambda **kw: (lambda f: wrong))  # recompiling gives the same wrong kernel
    monkeypatch.setattr(xk, "_checked", [])
    assert not xk.available()
    assert "x12 products decode to bf16 instead" in caplog.text
    w = torch.randn(9, 66, generator=torch.Generator().manual_seed(3)).bfloat16()
    x = torch.randn(1, 66, generator=torch.Generator().manual_seed(4)).bfloat16()
    lin = X12Linear(x12.from_bf16(w.view(torch.int16).numpy().view(np.uint16)))
    assert torch.equal(lin(x).view(torch.int16), kernels.linear(x, w).view(torch.int16))


@needs_numba
def test_gemv_refuses_an_odd_k():
    with pytest.raises(ValueError, match="even K"):
        xk.gemv(x12.from_bf16(_gauss(2, 5)), np.zeros(5, np.float32))


@needs_numba
def test_gemv_refuses_an_input_that_is_not_bf16():
    """The kernel reads its input as bf16 pairs: a float32 value with low bits would be truncated."""
    x = torch.randn(6, generator=torch.Generator().manual_seed(5)).bfloat16().float().numpy()
    enc = x12.from_bf16(_gauss(2, 6))
    assert xk.gemv(enc, x).shape == (2,)
    x[3] = np.nextafter(x[3], np.float32(2))
    with pytest.raises(ValueError, match="bf16 inputs"):
        xk.gemv(enc, x)


# -- resident x12 -----------------------------------------------------------------------------------


@needs_numba
@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_x12_linear_equals_the_bf16_linear_one_row_and_batched(kernel, monkeypatch):
    from zipmoe_run import kernel_select
    from zipmoe_run.resident import X12Linear

    monkeypatch.setenv(kernel_select.ENV, kernel)  # the shape's one-row kernel: numba (x12 GEMV) or torch
    kernel_select.reset()
    g = torch.Generator().manual_seed(8)
    w = (torch.randn(48, 98, generator=g) * 0.05).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    lin = X12Linear(x12.from_bf16(w.view(torch.int16).numpy().view(np.uint16)), b)
    assert torch.equal(lin.weight.view(torch.int16), w.view(torch.int16))
    for shape in [(1, 98), (1, 1, 98), (3, 1, 98), (5, 98)]:
        x = torch.randn(*shape, generator=g).bfloat16()
        assert torch.equal(lin(x).view(torch.int16), kernels.linear(x, w, b).view(torch.int16)), shape
        with kernels.decode_rows_scope():  # batched decode: every row as if alone
            assert torch.equal(lin(x).view(torch.int16), kernels.linear(x, w, b).view(torch.int16)), shape
    kernel_select.reset()


def test_to_x12_converts_only_the_selected_modules(checkpoint_factory):
    from zipmoe_run.layers import Linear
    from zipmoe_run.models import build_model
    from zipmoe_run.resident import X12Linear, to_x12
    from zipmoe_run.source import DirectorySource

    model = build_model(DirectorySource(checkpoint_factory("qwen2_moe", seed=3, dims={"experts": 4, "top_k": 2})),
                        torch.bfloat16)
    before = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, Linear)}
    stats = to_x12(model, select=lambda name, n, k: name.endswith("o_proj"))
    after = {n for n, m in model.named_modules() if isinstance(m, X12Linear)}
    assert after == {n for n in before if n.endswith("o_proj")} and stats["modules"] == len(after) > 0
    assert all(isinstance(model.get_submodule(n), Linear) for n in before if n not in after)


@needs_numba
def test_to_x12_by_default_skips_shapes_where_torch_is_chosen(checkpoint_factory, monkeypatch):
    from zipmoe_run import kernel_select
    from zipmoe_run.models import build_model
    from zipmoe_run.resident import to_x12
    from zipmoe_run.source import DirectorySource

    ckpt = checkpoint_factory("qwen2_moe", seed=3, dims={"experts": 4, "top_k": 2})
    for kernel, converted in (("torch", False), ("numba", True)):
        monkeypatch.setenv(kernel_select.ENV, kernel)
        kernel_select.reset()
        stats = to_x12(build_model(DirectorySource(ckpt), torch.bfloat16))
        assert (stats["modules"] > 0) is converted
    kernel_select.reset()


def test_resident_mode_names_a_bad_value(monkeypatch):
    from zipmoe_run.resident import resident_mode

    monkeypatch.setenv("ZIPMOE_RESIDENT", "x12")
    assert resident_mode() == "x12" and resident_mode("bf16") == "bf16"
    with pytest.raises(ValueError, match="'x13' is not one of bf16, x12"):
        resident_mode("x13")


@needs_numba
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_x12_resident_model_logits_equal_the_bf16_model(family, checkpoint_factory, monkeypatch):
    from zipmoe_run import kernel_select
    from zipmoe_run.generate import Sampling, generate
    from zipmoe_run.models import build_model
    from zipmoe_run.resident import X12Linear, to_x12
    from zipmoe_run.source import DirectorySource

    monkeypatch.setenv(kernel_select.ENV, "numba")  # the bf16 run's one-row products: the numba GEMV's order
    kernel_select.reset()
    ckpt = checkpoint_factory(family, seed=3, dims={"experts": 4, "top_k": 2})
    runs = []
    for form in ("bf16", "x12"):
        model = build_model(DirectorySource(ckpt), torch.bfloat16).eval()
        if form == "x12":
            stats = to_x12(model)
            # tiny matrices: the row offsets weigh more than in real ones (0.7512)
            assert stats["modules"] > 0 and stats["x12_bytes"] < 0.8 * stats["bf16_bytes"]
            assert any(isinstance(m, X12Linear) for m in model.modules())
        prompt = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(4))
        cache = model.new_cache(1, 12)
        logits = [model(prompt, cache, 0)]  # prefill [1, 7, V]
        tok = logits[0][:, -1:].argmax(-1)
        for pos in range(7, 11):  # greedy decode steps: one-row products
            logits.append(model(tok, cache, pos))
            tok = logits[-1][:, -1:].argmax(-1)
        runs.append(logits)
        res = generate(model, [[1, 2, 3]], max_new_tokens=5, sampling=Sampling(greedy=True), eos_token_ids=[])
        runs[-1].append(torch.tensor(res.token_ids[0]))
    kernel_select.reset()
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int16) if a.dtype is torch.bfloat16 else a,
                           b.view(torch.int16) if b.dtype is torch.bfloat16 else b)


def test_zipmoe_resident_env_converts_through_api_load(tmp_path, monkeypatch, checkpoint_factory):
    """``ZIPMOE_RESIDENT=x12`` reaches every ``load`` (so ``zipmoe-run`` and ``zipmoe serve``): the model's
    numba-chosen dense projections become X12Linear and the greedy tokens stay those of the bf16 run."""
    import torch

    from zipmoe_run import api
    from zipmoe_run.resident import X12Linear

    ckpt = checkpoint_factory("qwen2_moe", seed=3)
    monkeypatch.setenv("ZIPMOE_KERNEL", "numba")
    monkeypatch.delenv("ZIPMOE_RESIDENT", raising=False)
    with api.load(ckpt) as lm:
        want = lm.generate([5, 6, 7], max_new_tokens=4).token_ids
    monkeypatch.setenv("ZIPMOE_RESIDENT", "x12")
    with api.load(ckpt) as lm:
        assert any(isinstance(m, X12Linear) for m in lm.model.modules())
        assert lm.model.x12_stats["modules"] > 0
        assert lm.generate([5, 6, 7], max_new_tokens=4).token_ids == want
    monkeypatch.setenv("ZIPMOE_RESIDENT", "x13")
    with pytest.raises(Exception, match="ZIPMOE_RESIDENT"):
        api.load(ckpt)


@needs_numba
def test_x12_decode_steps_never_decode_a_whole_matrix(checkpoint_factory, monkeypatch):
    """A one-row step of an x12 model reads the 12-bit form in the GEMV: the fused q/k/v and gate/up
    calls run each X12Linear's own forward instead of reading ``.weight`` (which decodes the whole
    matrix to bf16 per product: an x12 model ran 2.4x slower than the bf16 one)."""
    from zipmoe_run import kernel_select, resident
    from zipmoe_run.models import build_model
    from zipmoe_run.source import DirectorySource

    monkeypatch.setenv(kernel_select.ENV, "numba")
    kernel_select.reset()
    ckpt = checkpoint_factory("qwen2_moe", seed=3, dims={"experts": 4, "top_k": 2})
    model = build_model(DirectorySource(ckpt), torch.bfloat16).eval()
    assert resident.to_x12(model)["modules"] > 0
    cache = model.new_cache(1, 12)
    model(torch.tensor([[1, 2, 3]]), cache, 0)
    decoded = []
    real = resident._bf16
    monkeypatch.setattr(resident, "_bf16", lambda w: decoded.append(w.shape) or real(w))
    for pos in range(3, 6):
        model(torch.tensor([[4]]), cache, pos)
    kernel_select.reset()
    assert decoded == []
