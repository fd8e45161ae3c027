"""The one-token step with the glue taken out (``models._step``) gives the bits of the general layer path in
every decoder family, whatever it inlines: logits ``torch.equal`` with ``_step`` on and off, over a prompt
and greedy decode steps, from a checkpoint directory and from an archive under a tight budget with lookahead.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernelforce import forced_kernel
from zipmoe_pack.pack import PackOptions, pack
from zipmoe_run import kernel_select, kernels
from zipmoe_run.api import load
from zipmoe_run.models import _step

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]
STEPS = 6
DIMS = {"experts": 8, "top_k": 2, "hidden": 64, "layers": 3}

# family, config overrides, (attention inlined, routed block inlined) with the numba GEMV on every shape
CASES = {
    "mixtral": ("mixtral", None, (True, True)),
    "qwen2_moe": ("qwen2_moe", None, (True, False)),  # q/k/v biases inlined; the shared expert's block is called
    "qwen3_moe": ("qwen3_moe", None, (False, True)),  # per-head q/k norm: the attention module is called
    "olmoe": ("olmoe", None, (False, True)),  # q/k norm and clipping
    "deepseek_v2": ("deepseek_v2", None, (False, False)),  # MLA, its own MoE block
    "qwen2_moe-dense-window": ("qwen2_moe", {"mlp_only_layers": [1], "use_sliding_window": True,
                                             "sliding_window": 3, "max_window_layers": 3}, (True, False)),
    "mixtral-window": ("mixtral", {"sliding_window": 4}, (True, True)),  # later steps masked: module path
}


def _logits(lm, on: bool) -> list[torch.Tensor]:
    _step._ENABLED = on
    m = lm.model
    cache = m.new_cache(1, len(PROMPT) + STEPS + 1)
    y = m(torch.tensor([PROMPT]), cache, 0)  # [1, T, V]
    out = [y.clone()]
    tok = y[:, -1:].argmax(-1)  # [1, 1]
    for i in range(STEPS):
        y = m(tok, cache, len(PROMPT) + i)  # [1, 1, V]
        out.append(y.clone())
        tok = y[:, -1:].argmax(-1)
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b, strict=True))


@pytest.fixture(autouse=True)
def _restore():
    was = _step._ENABLED
    yield
    _step._ENABLED = was


@pytest.fixture(scope="module", params=list(CASES))
def case(request, checkpoint_factory):
    family, overrides, inlined = CASES[request.param]
    src = checkpoint_factory(family, seed=5, dims=DIMS, peaky_router=False, config_overrides=overrides)
    return src, inlined


def _plans(lm) -> list:
    return [layer._step for layer in lm.model.model.layers]


def test_the_same_bits_as_the_layer_path(case, monkeypatch):
    src, (attn, block) = case
    with forced_kernel(monkeypatch, "numba"), load(src, dtype="bfloat16", threads=2) as lm:
        ref = _logits(lm, False)
        assert all(p is None for p in _plans(lm))  # off: never built
        got = _logits(lm, True)
        plans = _plans(lm)
        assert all(p is not None for p in plans)  # every layer stepped through it
        sparse = [p for p in plans if p.sparse]
        assert sparse and all((p.attn is not None) == attn for p in plans)
        assert all((p.moe is not None) == block for p in sparse)
    assert _same(got, ref)


def test_torch_kernels_leave_it_to_the_modules(case, monkeypatch):
    """Where torch's product is chosen nothing is inlined but the norms, and the bits are still the layer path's."""
    src, _ = case
    with forced_kernel(monkeypatch, "torch"), load(src, dtype="bfloat16", threads=2) as lm:
        ref = _logits(lm, False)
        got = _logits(lm, True)
        assert all(p.attn is None for p in _plans(lm))
    assert _same(got, ref)


def test_archive_under_a_budget_with_lookahead(checkpoint_factory, tmp_path, monkeypatch):
    """Experts fetched by the store (evicted and read again, in its own order) and the lookahead hook."""
    src = checkpoint_factory("mixtral", seed=5, dims=DIMS, peaky_router=False)
    arc = tmp_path / "m.zmoe"
    pack(src, arc, PackOptions(threads=2, chunk_elements=4096))
    with forced_kernel(monkeypatch, "numba"):
        with load(arc, dtype="bfloat16", threads=2) as lm:
            ref = _logits(lm, False)
        with load(arc, dtype="bfloat16", threads=2, memory_budget="30%", prefetch="lookahead") as lm:
            got = _logits(lm, True)
            assert all(p is not None and p.moe is not None for p in _plans(lm))
            lm.source.store.drain_prefetch()
            assert lm.source.stats()["prefetch_predicted"] > 0
    assert _same(got, ref)


def test_a_changed_kernel_choice_rebuilds_the_plans(checkpoint_factory, monkeypatch):
    src = checkpoint_factory("mixtral", seed=5, dims=DIMS, peaky_router=False)
    with forced_kernel(monkeypatch, "numba"), load(src, dtype="bfloat16", threads=2) as lm:
        _logits(lm, True)
        first = _plans(lm)
        assert all(p.attn is not None for p in first)
        monkeypatch.setenv(kernel_select.ENV, "torch")
        kernel_select.reset()  # what a changed ZIPMOE_KERNEL does at the next choice
        kernel_select.choose(kernel_select.model_shapes(lm.model), torch.get_num_threads())
        ref = _logits(lm, False)
        got = _logits(lm, True)
        again = _plans(lm)
        assert all(a is not b for a, b in zip(again, first)) and all(p.attn is None for p in again)
    assert _same(got, ref)


def test_float32_and_prefill_never_take_it(checkpoint_factory):
    src = checkpoint_factory("mixtral", seed=5, dims=DIMS, peaky_router=False)
    with load(src, dtype="float32", threads=2) as lm:
        _logits(lm, True)
        assert all(p is None for p in _plans(lm))
    with load(src, dtype="bfloat16", threads=2) as lm:
        m = lm.model
        m(torch.tensor([PROMPT]), m.new_cache(1, len(PROMPT)), 0)  # a prefill chunk
        assert all(p is None for p in _plans(lm))
        assert kernels._scope_threads == 0


def test_forward_hooks_fire_as_on_the_module_path(checkpoint_factory, monkeypatch):
    """A hook on a module the step would skip (a profiler's) sends the step through the modules."""
    src = checkpoint_factory("mixtral", seed=5, dims=DIMS, peaky_router=False)
    with forced_kernel(monkeypatch, "numba"), load(src, dtype="bfloat16", threads=2) as lm:
        layer = lm.model.model.layers[1]
        counts = {"off": [], "on": []}
        for on in (False, True):
            seen = counts["on" if on else "off"]
            mods = (layer.self_attn, layer.self_attn.o_proj, layer.input_layernorm, layer.block_sparse_moe)
            handles = [m.register_forward_hook(lambda m, a, o, i=i, seen=seen: seen.append(i)) for i, m in enumerate(mods)]
            _logits(lm, on)
            for h in handles:
                h.remove()
        assert counts["on"] == counts["off"] and len(counts["on"]) == 4 * (1 + STEPS)
        _logits(lm, True)
        assert layer._step is not None and not layer._step.hooked()  # without hooks: the step again
        g = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
        try:
            assert layer._step.hooked()
        finally:
            g.remove()


def test_the_expert_function_takes_one_row_and_leaves_the_rest(checkpoint_factory, monkeypatch):
    """Its GEMVs by address take one row; two rows (a token routed twice), fused gate_up or float32 weights
    go to the block's own expert function, with its bits."""
    from zipmoe_run.layers import swiglu_expert

    src = checkpoint_factory("mixtral", seed=5, dims=DIMS, peaky_router=False)
    with forced_kernel(monkeypatch, "numba"), load(src, dtype="bfloat16", threads=2) as lm:
        _logits(lm, True)
        layer = lm.model.model.layers[0]
        plan, moe = layer._step, layer.block_sparse_moe
        w = next(iter(lm.source.fetch(0, [3])))[1]
        g = torch.Generator().manual_seed(3)
        wide = {k: v.float() for k, v in w.items()}
        with kernels.single_row_scope(True):
            for x in (torch.randn(1, 64, generator=g).bfloat16(), torch.randn(2, 64, generator=g).bfloat16()):
                for weights in (w, wide):
                    got, ref = plan.expert(x, weights), swiglu_expert(x, weights, moe.act)
                    assert got.shape == ref.shape and torch.equal(got.view(torch.int16), ref.view(torch.int16))


def test_the_environment_turns_it_off():
    import os
    import subprocess
    import sys

    code = "from zipmoe_run.models import _step; print(_step._ENABLED)"
    env = {**os.environ, "ZIPMOE_FAST_STEP": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
