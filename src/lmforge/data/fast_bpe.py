"""Byte-level BPE encoding for `prepare` in tiktoken, when it gives exactly the ids of `tokenizers`.

tiktoken's Rust core encodes byte-level BPE about twice as fast as `tokenizers` on one thread. It
merges by rank, the rank being the token id; a `tokenizers` BPE merges by its merge list. The two
agree when the tokenizer is the plain byte-level BPE that lmforge trains (and that GPT-2, Qwen2 and
Llama-3 ship): no normalizer, one split regex then ByteLevel without its own regex (or ByteLevel with
its GPT-2 regex), ids of merged tokens increasing in merge order, every byte a token, added tokens
matched verbatim (no lstrip/rstrip/single_word). `convert` checks those conditions and then proves
equality on a probe: English, Chinese, code, emoji, odd whitespace, the special tokens, and every
vocabulary entry's own text. Anything else (a normalizer, a Metaspace or sentencepiece-style
tokenizer, dropout, a probe that differs) keeps `tokenizers`, and the reason is logged. `prepare`
checks the first batch of the real corpus against `tokenizers` once more before trusting it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer

from lmforge.tokenizer_formats import byte_chars

# The regex ByteLevel(use_regex=True) applies (GPT-2's), for tokenizers that split with it alone.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PROBE = (
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? I'm sure we'll see; they'd've.\n"
    "机器学习是人工智能的一个分支。我们使用大规模语料训练语言模型，包括中文、English 和代码。\n"
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif (a && b) { return -1; }\r\n"
    "Emoji: 😀👍🏽 🇨🇳 👨‍👩‍👧‍👦 ❤️ — café naïve Ünïcödé ﬁ Ελληνικά русский العربية हिन्दी 日本語のテキスト 한국어\n"
    "odd  whitespace:\u00a0nbsp\u3000ideographic\u2028line-sep\u2029para\u0085nel\x0bvt\x0cff\u200bzw \ufeffbom"
    "\x1c\x1d\x1e\x1f   \n\n\n  trailing   \t \n"
    "numbers 1234567890 ١٢٣ ①②③ ½ x² 0x1F 1e-9 $100.00 100%\n"
    "<|endoftext|>after<|im_start|>user\nhi<|im_end|>\n"
)


@dataclass
class Choice:
    """Which encoder prepare uses, and why (logged and written to the manifest)."""

    name: str  # "tiktoken" or "tokenizers"
    reason: str


def _pattern(pre: dict | None) -> str:
    """The split regex of a byte-level pre-tokenizer, or ValueError saying why it is not one."""
    if pre is None:
        raise ValueError("no pre-tokenizer")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            raise ValueError("ByteLevel pre-tokenizer with add_prefix_space or without its regex")
        return GPT2_PATTERN
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        raise ValueError(f"pre-tokenizer {pre.get('type')} is not Split + ByteLevel")
    split, byte = steps
    if (split.get("type") != "Split" or "Regex" not in split.get("pattern", {})
            or split.get("behavior") != "Isolated" or split.get("invert")):
        raise ValueError("the first pre-tokenizer step is not an isolating regex Split")
    if byte.get("type") != "ByteLevel" or byte.get("add_prefix_space") or byte.get("use_regex"):
        raise ValueError("the second pre-tokenizer step is not ByteLevel without a regex")
    return split["pattern"]["Regex"]


def _ranks(model: dict, added: set[str]) -> dict[bytes, int]:
    """tiktoken's mergeable ranks (token bytes -> id), or ValueError when ids do not follow the merges.

    Added tokens the trainer also put in the model's vocabulary are left to tiktoken's special tokens.
    """
    if model.get("type") != "BPE":
        raise ValueError(f"model {model.get('type')} is not BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"BPE {key}={model[key]!r}")
    if model.get("byte_fallback"):
        raise ValueError("BPE byte_fallback")
    dec = {c: b for b, c in enumerate(byte_chars())}  # ByteLevel's printable alphabet back to bytes
    vocab: dict[str, int] = {t: i for t, i in model["vocab"].items() if t not in added}
    try:
        ranks = {bytes(dec[c] for c in tok): i for tok, i in vocab.items()}
    except KeyError:
        raise ValueError("vocabulary holds tokens outside the byte-level alphabet") from None
    if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("vocabulary lacks single bytes or repeats a token")
    last = -1
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        i = vocab.get(a + b)
        if i is None or i <= last:
            raise ValueError("token ids do not increase in merge order")
        last = i
    if len(model["merges"]) != len(vocab) - 256:
        raise ValueError("vocabulary holds tokens that no merge makes")
    return ranks


MAX_ADDED = 1024  # tiktoken matches added tokens with one regex alternation; thousands make it crawl


def _specials(added: list[dict]) -> dict[str, int]:
    if len(added) > MAX_ADDED:
        raise ValueError(f"{len(added)} added tokens (tiktoken handles up to {MAX_ADDED})")
    for t in added:
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise ValueError(f"added token {t['content']!r} strips or matches whole words only")
    return {t["content"]: t["id"] for t in added}


def build(tok: HFTokenizer):
    """A tiktoken Encoding with `tok`'s ranks, regex and added tokens; ValueError when not convertible."""
    try:
        import tiktoken
    except ImportError:
        raise ValueError("tiktoken is not installed") from None
    d = json.loads(tok.to_str())
    if d.get("normalizer") is not None:
        raise ValueError(f"normalizer {d['normalizer'].get('type')}")
    pattern = _pattern(d.get("pre_tokenizer"))
    specials = _specials(d.get("added_tokens", []))
    ranks = _ranks(d["model"], set(specials))
    return tiktoken.Encoding("lmforge", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials,
                             explicit_n_vocab=None)


def encode(enc, texts: list[str]) -> list[list[int]]:
    """tiktoken ids of `texts` on this thread, added tokens in the text becoming their ids (as `tokenizers`)."""
    core, allowed = enc._core_bpe, enc.special_tokens_set
    return [core.encode(t, allowed) for t in texts]


def same_ids(enc, tok: HFTokenizer, texts: list[str]) -> str | None:
    """None when tiktoken and `tokenizers` give the same ids for every text, else the first that differs."""
    ours = encode(enc, texts)
    for t, a, b in zip(texts, ours, tok.encode_batch_fast(texts, add_special_tokens=False)):
        if a != b.ids:
            return t
    return None


def convert(tok: HFTokenizer) -> tuple[object | None, Choice]:
    """(tiktoken Encoding or None, the choice and its reason) for `tok`, proven on the probe texts."""
    try:
        enc = build(tok)
    except ValueError as e:
        return None, Choice("tokenizers", f"not convertible to tiktoken: {e}")
    vocab = [tok.decode([i]) for i in sorted(enc._mergeable_ranks.values())]
    probe = [PROBE, *PROBE.splitlines(keepends=True), *(v for v in vocab if "\ufffd" not in v)]
    bad = same_ids(enc, tok, probe)
    if bad is not None:
        return None, Choice("tokenizers", f"tiktoken ids differ from tokenizers' on {bad[:60]!r}")
    return enc, Choice("tiktoken", "same ranks, regex and added tokens; ids equal on the probe")
