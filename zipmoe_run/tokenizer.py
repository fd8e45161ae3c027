"""Tokenizer for the runtime: the ``tokenizers`` library on the checkpoint's own files.

Reads ``tokenizer.json`` through ``WeightSource.file_bytes`` (or, for Qwen2-style byte-level BPE,
``vocab.json`` + ``merges.txt``). End-of-sequence ids are the union of config.json,
generation_config.json and tokenizer_config.json. Chat templates are rendered with jinja2 the way
transformers does (sandboxed, trim_blocks, lstrip_blocks).
"""
from __future__ import annotations

import json
import logging
import threading
from datetime import datetime
from typing import TYPE_CHECKING

from formats.jsonstrict import JSONRejected, loads

from .errors import TokenizerError

if TYPE_CHECKING:
    from .source import WeightSource

__all__ = ["Tokenizer", "load_tokenizer", "TokenizerLoad", "eos_ids_from", "IncrementalDecoder", "read_json"]

log = logging.getLogger(__name__)

_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def read_json(source: "WeightSource", name: str) -> dict:
    """A side file of the checkpoint (generation_config.json, tokenizer_config.json, ...) as a dict:
    {} when absent or not an object; strict JSON (``formats.jsonstrict``), TokenizerError naming it."""
    raw = source.file_bytes(name)
    if raw is None:
        return {}
    try:
        out = loads(raw)
    except JSONRejected as exc:
        raise TokenizerError(f"{name}: cannot parse ({exc})") from None
    return out if isinstance(out, dict) else {}


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _as_ids(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, int):
        return [v]
    return [int(x) for x in v if isinstance(x, int)]


def eos_ids_from(config: dict, gen_config: dict) -> list[int]:
    """EOS ids from config.json and generation_config.json (no tokenizer needed)."""
    ids: list[int] = []
    for v in (gen_config.get("eos_token_id"), config.get("eos_token_id")):
        for i in _as_ids(v):
            if i not in ids:
                ids.append(i)
    return ids


def _build_qwen2_bpe(vocab: bytes, merges: bytes, tok_cfg: dict):
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    merge_lines = [ln for ln in merges.decode("utf-8").splitlines() if ln and not ln.startswith("#version")]
    merge_pairs = [tuple(ln.split(" ", 1)) for ln in merge_lines]
    try:
        vocab_map = loads(vocab)
    except JSONRejected as exc:
        raise TokenizerError(f"vocab.json: cannot parse ({exc})") from None
    tk = HFTokenizer(BPE(vocab=vocab_map, merges=merge_pairs, unk_token=None, continuing_subword_prefix="",
                         end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tk.decoder = decoders.ByteLevel()
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(tok_cfg.get("add_prefix_space", False)), use_regex=False),
    ])
    added = sorted(((int(i), d) for i, d in (tok_cfg.get("added_tokens_decoder") or {}).items()), key=lambda x: x[0])
    for _, d in added:
        t = AddedToken(d["content"], special=d.get("special", True), lstrip=d.get("lstrip", False),
                       rstrip=d.get("rstrip", False), normalized=d.get("normalized", False),
                       single_word=d.get("single_word", False))
        (tk.add_special_tokens if t.special else tk.add_tokens)([t])
    return tk


class Tokenizer:
    """Encode/decode plus the special tokens and chat template of one checkpoint."""

    def __init__(self, tk, tok_cfg: dict, config: dict, gen_config: dict, chat_template: str | None):
        self._tk = tk
        self.tok_cfg = tok_cfg
        self.chat_template = chat_template
        self.bos_token = _token_str(tok_cfg.get("bos_token"))
        self.eos_token = _token_str(tok_cfg.get("eos_token"))
        ids = eos_ids_from(config, gen_config)
        if self.eos_token is not None:
            i = tk.token_to_id(self.eos_token)
            if i is not None and i not in ids:
                ids.append(i)
        self.eos_token_ids: list[int] = ids

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this checkpoint has no chat template (tokenizer_config.json / chat_template.jinja)")
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise TokenizerError("chat templates need jinja2: pip install jinja2") from None

        def raise_exception(msg):
            raise TemplateError(msg)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from None

    def encode_chat(self, user_text: str, system: str | None = None) -> list[int]:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
        return self.encode(self.apply_chat_template(msgs), add_special_tokens=False)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences.

    Each step decodes only a short window (the tokens since the last emitted piece, plus the ones
    before it as context, so word-joining rules such as leading spaces resolve the same way).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start (context tokens)
        self.read = 0  # tokens before this are emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd") and text.startswith(before):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):] if text.startswith(before) else ""


def load_tokenizer(source: "WeightSource") -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it ships none (ids-only use still works)."""
    from tokenizers import Tokenizer as HFTokenizer

    tok_cfg = read_json(source, "tokenizer_config.json")
    gen_cfg = read_json(source, "generation_config.json")
    raw = source.file_bytes("tokenizer.json")
    if raw is not None:
        try:
            tk = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"tokenizer.json: cannot load ({exc})") from None
    else:
        vocab, merges = source.file_bytes("vocab.json"), source.file_bytes("merges.txt")
        if vocab is None or merges is None:
            return None
        if "Qwen2Tokenizer" not in str(tok_cfg.get("tokenizer_class", "")):
            log.warning("no tokenizer.json; building a Qwen2-style byte-level BPE from vocab.json + merges.txt")
        tk = _build_qwen2_bpe(vocab, merges, tok_cfg)
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template:
        jinja = source.file_bytes("chat_template.jinja")
        template = jinja.decode("utf-8") if jinja else None
        if not template:
            tmpl_json = read_json(source, "chat_template.json")
            template = tmpl_json.get("chat_template")
    return Tokenizer(tk, tok_cfg, source.config, gen_cfg, template)


class TokenizerLoad:
    """``load_tokenizer(source)`` on a daemon thread, started at construction. ``tokenizers`` parses
    tokenizer.json without the interpreter lock, so this runs beside ``import torch`` (``zipmoe-run``
    starts one as the archive opens: 0.1-0.15 s of the demo's start-up). ``result()`` waits, then
    returns what ``load_tokenizer`` returned or raises what it raised; ``wait()`` only waits (the
    thread reads from the source, so whoever closes the source waits first)."""

    def __init__(self, source: "WeightSource"):
        self._value: Tokenizer | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(source,), name="zipmoe-tokenizer", daemon=True)
        self._thread.start()

    def _run(self, source: "WeightSource") -> None:
        try:
            self._value = load_tokenizer(source)
        except BaseException as exc:  # noqa: BLE001 - raised again by result(), on the caller's thread
            self._error = exc

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Tokenizer | None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
