"""The tokenizer part of :mod:`zipmoe.bench.gguf_export`: a byte-level BPE tokenizer as llama.cpp's ``gpt2``
vocabulary (``tokenizer.ggml.*`` keys, as convert_hf_to_gguf.py's ``_set_vocab_gpt2`` writes them).

Sources, in order: ``tokenizer.json`` (a BPE model; SentencePiece-style byte fallback is refused), or the
slow tokenizer's ``vocab.json`` + ``merges.txt`` with ``tokenizer_config.json``'s ``added_tokens_decoder``
(how Qwen1.5's hub folders ship it). Ids up to ``vocab_size`` missing from the tokenizer become
``[PADn]`` (type UNUSED); added special tokens are CONTROL, other added tokens USER_DEFINED. The
pre-tokenizer name is a guess from the tokenizer (Qwen's digit-per-piece split -> ``qwen2``, OLMoE ->
``olmo``, byte-level -> ``gpt-2``) instead of the script's hash of a reference encoding: it matters for
text prompts only; the benchmarks feed token ids.
"""
from __future__ import annotations

from pathlib import Path

from .gguf_export import GGUFExportError, _json

__all__ = ["write_vocab", "pre_name"]


def pre_name(tok: dict, model_type: str, tokenizer_class: str = "") -> str:
    """llama.cpp's pre-tokenizer name for this tokenizer (``tok``: tokenizer.json, or {} for slow files)."""
    if tokenizer_class.startswith("Qwen2"):
        return "qwen2"
    pre = tok.get("pre_tokenizer") or {}
    items = [p for p in (pre.get("pretokenizers") or [pre]) if isinstance(p, dict)]
    splits = [str((p.get("pattern") or {}).get("Regex", "")) for p in items if p.get("type") == "Split"]
    if any(r"\p{N}|" in r for r in splits):  # Qwen2's regex: one digit per piece
        return "qwen2"
    if any(p.get("type") == "ByteLevel" for p in items) or not tok:
        return "olmo" if model_type == "olmoe" else "gpt-2"
    return "default"


def _from_tokenizer_json(d: Path):
    import gguf

    f = d / "tokenizer.json"
    tok = _json(f)
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise GGUFExportError(f"{f}: only byte-level BPE tokenizers are supported by the GGUF exporter")
    if model.get("byte_fallback"):
        raise GGUFExportError(f"{f}: SentencePiece-style BPE (byte_fallback) is not supported by the GGUF exporter")
    kinds: dict[int, int] = {}
    vocab = _ids(model["vocab"], f)
    for a in tok.get("added_tokens") or []:
        i = a.get("id") if isinstance(a, dict) else None
        if not isinstance(i, int) or i < 0 or not isinstance(a.get("content"), str):
            raise GGUFExportError(f"{f}: bad added token {a!r}")
        vocab[i] = a["content"]
        kinds[i] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(map(str, m)) for m in model.get("merges") or []]
    return vocab, kinds, merges, tok


def _from_slow_files(d: Path, tc: dict):
    import gguf

    vocab = _ids(_json(d / "vocab.json"), d / "vocab.json")
    try:
        lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GGUFExportError(f"{d / 'merges.txt'}: cannot read ({e})") from None
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    kinds: dict[int, int] = {}
    for k, a in (tc.get("added_tokens_decoder") or {}).items():
        if not (isinstance(k, str) and k.isdigit() and isinstance(a, dict) and isinstance(a.get("content"), str)):
            raise GGUFExportError(f"{d / 'tokenizer_config.json'}: bad added token {k!r}")
        vocab[int(k)] = a["content"]
        kinds[int(k)] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    return vocab, kinds, merges, {}


def _ids(table, f: Path) -> dict[int, str]:
    if not isinstance(table, dict):
        raise GGUFExportError(f"{f}: the vocabulary is not an object")
    out: dict[int, str] = {}
    for t, i in table.items():
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < 1 << 24:
            raise GGUFExportError(f"{f}: token {t!r} has id {i!r}")
        out[i] = t
    return out


def write_vocab(w, d: Path, cfg: dict) -> None:
    """Add the ``tokenizer.ggml.*`` keys (and the chat template) for the checkpoint folder ``d`` to writer ``w``."""
    import gguf

    tc = _json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    tc = tc if isinstance(tc, dict) else {}
    if (d / "tokenizer.json").is_file():
        vocab, kinds, merges, tok = _from_tokenizer_json(d)
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        vocab, kinds, merges, tok = _from_slow_files(d, tc)
    else:
        raise GGUFExportError(f"{d}: no tokenizer.json (or vocab.json + merges.txt) for the GGUF vocabulary")
    n = int(cfg.get("vocab_size") or (max(vocab) + 1))
    if max(vocab) >= n:
        raise GGUFExportError(f"{d}: token id {max(vocab)} >= vocab_size {n}")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_name(tok, cfg.get("model_type", ""), str(tc.get("tokenizer_class") or "")))
    w.add_token_list([vocab.get(i, f"[PAD{i}]") for i in range(n)])
    w.add_token_types([kinds.get(i, gguf.TokenType.NORMAL if i in vocab else gguf.TokenType.UNUSED)
                       for i in range(n)])
    w.add_token_merges(merges)
    ids = {t: i for i, t in vocab.items()}
    for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                      ("pad", w.add_pad_token_id)):
        v = tc.get(f"{role}_token")
        if isinstance(v, dict):
            v = v.get("content")
        i = ids.get(v) if isinstance(v, str) else cfg.get(f"{role}_token_id")
        if isinstance(i, int) and 0 <= i < n:
            add(i)
    bos, add_bos = tc.get("bos_token"), tc.get("add_bos_token")
    if add_bos is None:  # a tokenizer.json post-processor that prepends BOS
        post = repr(tok.get("post_processor") or {})
        add_bos = bool(isinstance(bos, str) and "TemplateProcessing" in post and bos in post)
    w.add_add_bos_token(bool(add_bos))
    if isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])
