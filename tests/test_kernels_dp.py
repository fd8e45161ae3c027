"""The AVX-512 BF16 dot-product prefill kernel (``kernels_dp``): bit for bit its numpy reference order
(an emulation of ``vdpbf16ps`` as the Intel SDM documents it: two fused multiply-adds per lane, odd pair
element first, DAZ inputs, FTZ results tiny after rounding, nearest-even), the same bits for any M,
thread count or loop nesting; availability decided from injected facts, never assumed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zipmoe_run import kernel_select as ks
from zipmoe_run import kernel_select_rows as R
from zipmoe_run import kernels
from zipmoe_run import kernels_dp as D
from zipmoe_run import kernels_dp_ref as REF

here = pytest.mark.skipif(not (kernels.enabled() and D.available()),
                          reason="no AVX-512 BF16 here (or numba's target lacks it): the kernel is never used")


def _bf16(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(torch.bfloat16)


def _words(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int32).numpy().view(np.uint32)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical, except that any NaN equals any NaN (the bf16 output is torch's canonical NaN)."""
    return bool(np.all((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))))


def _f32(v: float) -> np.ndarray:
    return np.array([v], np.float32)


# ---- the reference's emulation of the instruction (numpy only: runs everywhere) -----------------------------

def test_reference_rounds_once_and_flushes_after_rounding():
    tiny = REF._fma_ftz(_f32(2.0 ** -126), np.array([-(2.0 ** -151)]))  # exact sum half an ulp below 2^-126
    assert tiny[0] == np.float32(2.0 ** -126)  # rounds up to the smallest normal: not tiny after rounding
    assert REF._fma_ftz(_f32(2.0 ** -126), np.array([-(2.0 ** -127)]))[0] == 0  # a denormal result: flushed
    assert REF._fma_ftz(_f32(2.0 ** -140), np.array([0.0]))[0] == 0  # a denormal accumulator reads as zero
    # one rounding: 1 + 2^-24 + 2^-60 is above the halfway point; float64 then float32 would round to 1
    got = REF._fma_ftz(_f32(1.0), np.array([2.0 ** -24 + 2.0 ** -60]))[0]
    assert got == np.nextafter(np.float32(1), np.float32(2))
    assert REF._fma_ftz(_f32(1.0), np.array([2.0 ** -24]))[0] == np.float32(1)  # a tie: to even
    assert np.signbit(REF._fma_ftz(_f32(-0.0), np.array([-0.0]))[0])  # -0 + -0 = -0
    assert not np.signbit(REF._fma_ftz(_f32(-0.0), np.array([0.0]))[0])  # -0 + +0 = +0 (nearest-even)


#: one row of 2 blocks where the order inside a pair shows: lane 0 holds 1 after block 0; block 1's pair is
#: (even -2^24 x 1, odd 2^24 x 1): odd first gives R(1 + 2^24) = 2^24 (a tie, to even), then 0; even first 1
ORDER_W = np.zeros((1, 32), np.uint32)
ORDER_X = np.zeros((1, 32), np.uint32)
ORDER_W[0, 0], ORDER_X[0, 0] = 0x3F80, 0x3F80
ORDER_W[0, 16], ORDER_X[0, 16] = 0xCB80 | (0x4B80 << 16), 0x3F80 | (0x3F80 << 16)


def test_reference_takes_the_odd_element_first_and_denormal_inputs_as_zero():
    assert REF.dp_reference(ORDER_W, ORDER_X)[0, 0] == 0
    den = np.array([[0x0001 | (0x3F80 << 16)]], np.uint32)  # even: the smallest bf16 denormal, odd 1.0
    xs = np.array([[0x7F00 | (0x3F80 << 16)]], np.uint32)  # even: 2^127 (the denormal read as is: 1 + 2^-6)
    assert REF.dp_reference(den, xs)[0, 0] == np.float32(1.0)


# ---- the kernel against the reference (this host, where it has the instruction) ---------------------------

SHAPES = [(9, 64, 5), (4, 32, 4), (13, 70, 9), (1, 2, 1), (5, 30, 2), (8, 1056, 7), (6, 40, 13)]


@here
@pytest.mark.parametrize("n,k,m", SHAPES)
def test_kernel_matches_the_reference_bit_for_bit(n, k, m):
    rng = np.random.default_rng(n * 1000 + k + m)
    for draw in range(3):
        if draw == 0:  # any bits: denormals, infinities, NaNs, huge and tiny exponents
            w = _bf16(rng.integers(0, 1 << 16, (n, k)))
            x = _bf16(rng.integers(0, 1 << 16, (m, k)))
        else:  # model-like values, some cancelling
            w = (torch.randn(n, k, generator=torch.Generator().manual_seed(draw)) * 0.05).bfloat16()
            x = (torch.randn(m, k, generator=torch.Generator().manual_seed(draw + 9)) * 3).bfloat16()
        got = D.gemm_dp(x, w)
        assert got.shape == (m, n) and _same(got, D.dp_reference(_words(w), _words(x)))


@here
def test_kernel_takes_the_odd_element_first_as_the_reference():
    w = torch.from_numpy(ORDER_W.view(np.int32)).view(torch.bfloat16)  # [1, 64]
    x = torch.from_numpy(ORDER_X.view(np.int32)).view(torch.bfloat16)
    assert D.gemm_dp(x, w)[0, 0] == 0


@here
def test_rows_do_not_depend_on_m_threads_or_loop_nesting():
    import numba

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(37, 2 * 300 + 6, generator=g) * 0.1).bfloat16()  # 37 rows: a partial row block; a tail
    x = torch.randn(11, w.shape[1], generator=g).bfloat16()
    full = D.gemm_dp(x, w)
    saved = numba.get_num_threads()
    try:
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(t)
            for kc, panel in ((1, 1), (3, 2), (1 << 20, 64)):
                assert _same(D.gemm_dp(x, w, kc=kc, panel=panel), full)
            for m in (1, 2, 3, 5):
                assert _same(D.gemm_dp(x[3:3 + m], w), full[3:3 + m])  # each row as in the 11-row product
    finally:
        numba.set_num_threads(saved)


@here
def test_prefill_linear_takes_dp_beyond_the_crossover(monkeypatch):
    """Forced: the multi-row kernel up to 2 rows, dp beyond: each row of a 6-row product is the reference's
    float32 sum plus the bias, rounded to bf16 by torch; a 2-row product is the one-row GEMV's rows."""
    monkeypatch.setenv(R.ROWS_ENV, "2")
    monkeypatch.setenv(R.PREFILL_ENV, "dp")
    ks.reset()
    try:
        g = torch.Generator().manual_seed(8)
        w = (torch.randn(24, 96, generator=g) * 0.1).bfloat16()
        b = torch.randn(24, generator=g).bfloat16()
        x = torch.randn(1, 6, 96, generator=g).bfloat16()  # [B, T, K]
        got = kernels.linear(x, w, b)
        ref = torch.from_numpy(D.dp_reference(_words(w), _words(x.view(6, 96))))
        want = (ref + b.float()).bfloat16().view(1, 6, 24)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        two = kernels.linear(x[:, :2], w, b)
        alone = torch.cat([kernels._gemv_linear(x[0, i:i + 1], w, b) for i in range(2)]).view(1, 2, 24)
        assert torch.equal(two.view(torch.int16), alone.view(torch.int16))
    finally:
        ks.reset()


# ---- availability: decided from facts, never assumed ----------------------------------------------------------

FULL = {"cpu_flags": ["avx2", "avx512f", "avx512_bf16"], "features": "+avx512f,+avx512bf16,+avx2",
        "env_cpu_name": None, "env_features": None, "disabled": False}


@pytest.mark.parametrize("change,ok", [
    ({}, True),
    ({"cpu_flags": ["avx2", "avx512f"]}, False),  # the CPU does not report it
    ({"features": "+avx512f,-avx512bf16,+avx2"}, False),  # numba's target does not have it
    ({"features": ""}, False),  # the target's features unknown
    ({"env_cpu_name": "haswell"}, False),  # NUMBA_CPU_NAME emulating another CPU
    ({"env_cpu_name": "haswell", "env_features": "+avx512f,+avx512bf16"}, True),
    ({"disabled": True}, False),  # ZIPMOE_DP=0
])
def test_availability_from_injected_facts(change, ok):
    facts = {**FULL, **change}
    assert D.supported(facts)[0] is ok
    assert D.available(lambda: facts) is ok


def test_without_the_instruction_dp_is_never_measured_chosen_or_called(monkeypatch, tmp_path):
    """Where the dp kernel is unavailable, the prefill measurement does not time it, no choice names it
    (even a cache or a fake that rates it fastest), ZIPMOE_PREFILL_KERNEL=dp falls back to torch, and a
    prefill product never calls it."""
    from zipmoe_run.calibrate import Calibrator

    monkeypatch.setattr(R, "dp_available", lambda: False)
    monkeypatch.setattr(ks, "_dp_available", lambda: False)  # nor as the one-row kernel
    monkeypatch.setattr(D, "gemm_dp", lambda *a, **k: pytest.fail("dp kernel called where unavailable"))
    for var in (ks.ENV, R.ROWS_ENV, R.PREFILL_ENV):
        monkeypatch.delenv(var, raising=False)
    timed = []
    monkeypatch.setattr(R, "_rows_kernel", lambda kern, x, w: timed.append(kern))
    clock = iter(range(10 ** 6))
    got = R.measure_rows([(8, 32)], 1, timer=lambda: next(clock) * 1e-3)
    assert "dp" not in set(timed) and all("dp" not in per for per in got[(8, 32)].values())
    ks.reset()
    fake = {m: {"numba": 1e9, "dp": 1e12, "torch": 2e9} for m in R.ROW_COUNTS}
    cal = Calibrator(tmp_path, info={"cpu": "X", "isa": ["avx2"], "cores": 2, "machine": "x86_64"},
                     version="test", force=False)
    ks.choose([(16, 64)], 2, measure_fn=lambda s, t, kk: {x: {k: 1e9 for k in kk} for x in s},
              measure_rows_fn=lambda s, t: {x: fake for x in s}, calibrator=cal)
    assert all(kn == "torch" for _, kn in R.BEYOND[(16, 64, 2)])
    ks.reset()
    monkeypatch.setenv(R.PREFILL_ENV, "dp")
    monkeypatch.setenv(R.ROWS_ENV, "1")
    w, x = torch.randn(16, 64).bfloat16(), torch.randn(5, 64).bfloat16()
    try:
        assert torch.equal(kernels.linear(x, w).view(torch.int16), torch.nn.functional.linear(x, w).view(torch.int16))
    finally:
        ks.reset()
