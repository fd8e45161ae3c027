"""`zipmoe-run`: streaming text, --json, and one-line errors with a non-zero exit."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from zipmoe_pack.synth import make_checkpoint
from zipmoe_run.cli import app


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    return checkpoint_factory("qwen3_moe", seed=4)


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_prompt_ids_json(ckpt):
    r = _invoke(ckpt, "--prompt-ids", "5,6,7", "--max-new-tokens", "5", "--greedy", "--json", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["prompt_ids"] == [5, 6, 7] and len(obj["token_ids"]) == 5 and isinstance(obj["text"], str)
    for key in ("prompt_tok_s", "gen_tok_s", "ttft_s", "experts_fetched", "bytes_read", "peak_rss_bytes"):
        assert key in obj["stats"]
    again = json.loads(_invoke(ckpt, "--prompt-ids", "5,6,7", "-n", "5", "--json", "--dtype", "float32").stdout)
    assert again["token_ids"] == obj["token_ids"]  # greedy is the default


def test_prompt_text_streams_and_stats_on_stderr(ckpt):
    import torch

    threads = torch.get_num_threads()  # --threads is process-wide; put it back for the other tests
    try:
        r = _invoke(ckpt, "--prompt", "hello there", "-n", "6", "--chat", "--temperature", "0.7", "--top-p", "0.9",
                    "--top-k", "20", "--seed", "3", "--threads", "1")
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.stderr and "TTFT" in r.stderr and "peak RSS" in r.stderr
    assert "tok/s" not in r.stdout


def _error(r, *needles):
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1, msg
    for n in needles:
        assert n in msg


def test_prompt_without_tokenizer(tmp_path):
    p = make_checkpoint(tmp_path / "m", "olmoe", seed=1, tokenizer=False)
    _error(_invoke(p, "--prompt", "hi"), "--prompt-ids")


def test_unsupported_family(tmp_path):
    p = make_checkpoint(tmp_path / "m", "olmoe", seed=1)
    cfg = json.loads((p / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (p / "config.json").write_text(json.dumps(cfg))
    _error(_invoke(p, "--prompt-ids", "1,2"), "gpt2", "qwen2_moe", "mixtral")


def test_prompt_longer_than_context(tmp_path):
    p = make_checkpoint(tmp_path / "m", "mixtral", seed=1, config_overrides={"max_position_embeddings": 8})
    _error(_invoke(p, "--prompt-ids", ",".join(["3"] * 9)), "context")


def test_bad_arguments(ckpt, tmp_path):
    _error(_invoke(ckpt, "--prompt-ids", "1,x"), "--prompt-ids")
    _error(_invoke(ckpt), "--prompt")
    _error(_invoke(tmp_path / "nothing", "--prompt-ids", "1"), "nothing")
    _error(_invoke(ckpt, "--prompt-ids", "1", "--dtype", "int3"), "dtype")
    _error(_invoke(ckpt, "--prompt-ids", "1", "--temperature", "0"), "temperature")


def test_store_error_while_generating_is_one_line_and_closes(monkeypatch, tmp_path):
    """An error the store raises mid-stream (a read failing on the I/O thread): the tokens so far were
    streamed, then one line and exit 1; the model is closed."""
    import zipmoe_run.api
    from zipmoe_run.generate import TokenEvent
    from zipmoe_run.store.io import StoreIOError

    closed = []

    class FakeLM:
        tokenizer = None
        source = type("S", (), {"budget": None, "stats": lambda self: {}})()

        def stream(self, ids, **kw):
            yield TokenEvent(0, 0, 42, "", 0.0, 0.0)
            raise StoreIOError(f"{tmp_path}/m.zmoe: read of expert 3 of layer 1 failed at offset 4096: Input/output error")

        def close(self):
            closed.append(True)

    monkeypatch.setattr(zipmoe_run.api, "load", lambda *a, **k: FakeLM())
    r = _invoke(tmp_path / "m.zmoe", "--prompt-ids", "1,2")
    _error(r, "expert 3 of layer 1", "offset 4096")
    assert r.exit_code == 1 and closed == [True]
