"""``TokenizerLoad``: the tokenizer parsed on a thread of its own while the caller goes on (``zipmoe-run``
starts one as the archive opens, beside ``import torch``); ``load`` takes it, and its errors reach the
caller's thread as ``load_tokenizer``'s would."""
from __future__ import annotations

import threading

import pytest

from zipmoe_pack.pack import PackOptions, pack
from zipmoe_pack.synth import make_checkpoint
from zipmoe_run import api
from zipmoe_run.errors import TokenizerError
from zipmoe_run.tokenizer import TokenizerLoad, load_tokenizer


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokload")
    ckpt = make_checkpoint(d / "ckpt", "mixtral", seed=3)
    pack(ckpt, d / "m.zmoe", PackOptions(threads=1))
    return d / "m.zmoe"


def test_the_thread_gives_what_load_tokenizer_gives(archive):
    seen = []

    class Spy(TokenizerLoad):
        def _run(self, source):
            seen.append(threading.current_thread().name)
            super()._run(source)

    with api.open_source(archive) as src:
        pending = Spy(src)
        got, ref = pending.result(), load_tokenizer(src)
        assert seen == ["zipmoe-tokenizer"]
        assert got.encode("The capital of France is") == ref.encode("The capital of France is")
        assert got.eos_token_ids == ref.eos_token_ids
        assert pending.result() is got  # waits once; asking again gives the same object


def test_load_uses_a_pending_load_and_generates_the_same_tokens(archive):
    with api.load(archive, dtype="float32") as ref:
        want = ref.generate([[5, 6, 7]], max_new_tokens=4).token_ids
        text = ref.tokenizer.encode("hello world")
    src = api.open_source(archive)
    with api.load(src, dtype="float32", tokenizer=TokenizerLoad(src)) as lm:
        assert lm.generate([[5, 6, 7]], max_new_tokens=4).token_ids == want
        assert lm.tokenizer.encode("hello world") == text


def test_its_error_is_raised_by_load_on_the_callers_thread(archive, tmp_path):
    bad = tmp_path / "bad"
    make_checkpoint(bad, "mixtral", seed=3)
    (bad / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    src = api.open_source(bad)
    pending = TokenizerLoad(src)
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot load"):
        api.load(src, dtype="float32", tokenizer=pending)
    assert not pending._thread.is_alive()  # load waited for it before closing the source
