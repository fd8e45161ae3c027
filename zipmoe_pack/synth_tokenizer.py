"""Small deterministic tokenizers for :mod:`zipmoe_pack.synth`, trained with the `tokenizers` library.

Decoder-only families get a byte-level BPE (GPT-2/Qwen style); switch_transformers gets a T5-style Unigram
with ``<pad>``=0, ``</s>``=1, ``<unk>``=2 and ``<extra_id_N>`` sentinels at the end. Both are trained on
the built-in text below, so the same vocabulary size always gives byte-identical files.
"""
from __future__ import annotations

import json
import math
import pathlib
from collections import Counter

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from zipmoe_pack.synth_families import TOKEN_STYLE, TOKENS

__all__ = ["write_tokenizer", "CORPUS"]

CORPUS = """\
The morning train left the station a little after seven, carrying farmers, clerks and a few sleepy students
toward the city. Outside the windows the fields were still grey with frost, and the river ran slow and dark
beside the tracks. A woman near the door read a newspaper about the harvest, the price of bread and the
weather, which had been colder than anyone could remember. Her son counted the bridges as they passed: one,
two, three, four, and then a long tunnel where the lamps flickered and everyone fell silent.
In the kitchen of the old house, my grandmother taught me how to bake bread. First you warm the water, then
you stir in the yeast and a spoon of honey, and you wait until the surface turns to foam. You add flour, salt
and a little oil, and you knead the dough for ten minutes, pushing it away with the heel of your hand and
folding it back again. When it has doubled in size, you shape the loaves, cover them with a clean cloth, and
bake them in a hot oven until the crust is brown and sounds hollow when you knock on it.
Computers store numbers as patterns of bits. A floating point number has a sign, an exponent and a mantissa;
the exponent says how large the number is and the mantissa holds its precise digits. Neural networks keep
millions or billions of such numbers, called weights, and most of them are small values close to zero. Because
their exponents repeat so often, the weights can be compressed without losing a single bit of information.
A mixture of experts model sends each token to only a few of its many expert networks. A small router looks
at the token and chooses the experts with the highest scores, so most experts stay idle for most tokens.
This saves time, but all of the experts must still be kept somewhere, ready for the moment they are needed.
When memory is tight, the experts can live on a disk or in compressed form and be loaded on demand.
Questions and answers. What is the capital of France? The capital of France is Paris. How many days are in a
week? There are seven days in a week. Which planet is closest to the sun? Mercury is the closest planet. Why
is the sky blue? Sunlight is scattered by the air, and blue light is scattered more than red light. Can you
write a short poem about the sea? The sea is wide, the sea is deep, it sings the sailors all to sleep.
The committee met on Thursday to discuss the budget for the coming year. The chairman opened the meeting by
thanking the members for their patience, then asked the treasurer to present the accounts. Income from
membership had risen by twelve percent, while the cost of heating the hall had nearly doubled. After a long
debate, the members agreed to raise the fees slightly and to plant a garden behind the library in the spring.
Mountains rise where the crust of the earth is pushed together, folding rock into ridges and valleys over
millions of years. Glaciers carve the valleys wider, and rivers carry sand and stones down to the plains.
Forests grow on the lower slopes, while higher up only grass, moss and small flowers survive the wind.
Travelers who climb to the summit on a clear day can see lakes, villages and roads spread out like a map.
Hello! How are you today? I am fine, thank you, and you? Please tell me a story about a dragon who was afraid
of the dark. Once upon a time there lived a small dragon named Ember, who slept with a candle every night.
One evening the candle went out, and Ember discovered that the stars were bright enough to show the way home.
Good programs are easy to read. Choose clear names for functions and variables, keep each function short,
write tests for the behaviour you care about, and check every input that comes from outside the program.
When something fails, report one clear message that names the file and the problem, and exit with an error.
Numbers and dates: 1, 2, 3, 10, 42, 100, 2024, 3.14159, 0.001, 1st of January, 25 December, 12:30 in the
afternoon, 7 o'clock in the morning, 60 seconds, 24 hours, 365 days, 1000 grams, 16 bits, 64 bytes.
"""

_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
           "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
           "{% endif %}")
_PLAIN = ("{{ bos_token or '' }}{% for message in messages %}{% if message['role'] == 'user' %}"
          "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
          "{{ 'Assistant: ' + message['content'] + eos_token }}{% else %}{{ message['content'] + '\\n\\n' }}"
          "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
T5_EXTRA_IDS = 8


def _bpe(vocab_size: int, specials: list[str], bos: str | None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    post = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:  # Mixtral and DeepSeek tokenizers prepend BOS when encoding
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                  special_tokens=[(bos, tok.token_to_id(bos))]))
    tok.post_processor = processors.Sequence(post) if len(post) > 1 else post[0]
    return tok


def _unigram(vocab_size: int, specials: list[str]) -> Tokenizer:
    # The tokenizers UnigramTrainer is not deterministic (its scores and pruning vary between runs), so
    # the pieces come from a (deterministic) BPE training over Metaspace words and each piece is scored
    # with its smoothed log frequency in that BPE segmentation of the corpus.
    normalizer = normalizers.Sequence([normalizers.Replace("  ", " "), normalizers.Strip(right=True)])
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer, bpe.pre_tokenizer = normalizer, meta
    lines = CORPUS.splitlines()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size - T5_EXTRA_IDS, min_frequency=1,
                                                       special_tokens=specials, show_progress=False))
    counts = Counter(t for line in lines for t in bpe.encode(line).tokens)
    vocab = bpe.get_vocab()
    pieces = [t for t in sorted(vocab, key=vocab.get) if t not in specials]
    total = sum(counts.values()) + len(pieces)
    scored = sorted(((p, math.log((counts[p] + 1) / total)) for p in pieces), key=lambda x: (-x[1], x[0]))
    tok = Tokenizer(models.Unigram([(t, 0.0) for t in specials] + scored, unk_id=specials.index("<unk>")))
    tok.normalizer, tok.pre_tokenizer = normalizer, meta
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(specials + [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)])
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    return tok


def write_tokenizer(out_dir: pathlib.Path, family: str, vocab_size: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for ``family``."""
    style = TOKEN_STYLE[family]
    specials, roles = TOKENS[style]
    if style == "t5":
        if vocab_size < len(specials) + T5_EXTRA_IDS + 64:
            raise ValueError(f"vocab_size {vocab_size} is too small for a Unigram tokenizer (need >= "
                             f"{len(specials) + T5_EXTRA_IDS + 64}); pass tokenizer=False")
        tok = _unigram(vocab_size, specials)
    else:
        if vocab_size < 256 + len(specials) + 1:
            raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (need > "
                             f"{256 + len(specials)}); pass tokenizer=False")
        tok = _bpe(vocab_size, specials, roles["bos"] if style in ("llama", "deepseek") else None)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)

    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    role_tokens = {f"{r}_token": t for r, t in roles.items()}
    extra = [t for t in specials if t not in role_tokens.values()]
    if style == "t5":
        extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    cfg = {"added_tokens_decoder": added, "additional_special_tokens": extra, **role_tokens,
           "clean_up_tokenization_spaces": False, "model_max_length": 4096,
           "tokenizer_class": "T5Tokenizer" if style == "t5" else "PreTrainedTokenizerFast"}
    if style == "t5":
        cfg["extra_ids"] = T5_EXTRA_IDS
    else:
        cfg["chat_template"] = _CHATML if style == "qwen" else _PLAIN
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    smap = {k: v for k, v in role_tokens.items() if v is not None}
    if extra:
        smap["additional_special_tokens"] = extra
    (out_dir / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, ensure_ascii=False) + "\n")
