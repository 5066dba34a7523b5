"""Tokenizers of other libraries as Hugging Face `tokenizers`: sentencepiece `.model`, tiktoken `.tiktoken`.

They are converted, not wrapped, so prepare's workers, the server and export all see one kind of
tokenizer, and `transformers.AutoTokenizer` loads the result. Each conversion comes with the
original library's encoder: adoption checks that the two give the same ids before anything is
trained on them, because a tokenizer that is almost the same makes a model that is quietly wrong.

sentencepiece: the pieces and scores become a BPE or Unigram model, and the proto's own normalizer
settings (the precompiled NFKC map, extra-whitespace removal, the dummy prefix, whitespace escaping,
byte fallback) become the same steps in `tokenizers`. transformers has converters too, but its
generic one changed behaviour between 5.x releases and its model-specific ones need a slow
tokenizer and assume one family's settings; this one reads only the proto.

tiktoken: the ranks become a byte-level BPE. Its merges are every split of each token into two
tokens, ordered by the rank of the token they make; with `ignore_merges` (a piece that is itself a
token is emitted whole) this is tiktoken's algorithm.
"""

from __future__ import annotations

import base64
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError

INSTALL = "pip install 'lmforge[tokenizers]' (or, in a source checkout, pip install -e '.[tokenizers]')"


@dataclass
class Adopted:
    """A tokenizer read from a user's file, with the special tokens its own format names."""

    tok: HFTokenizer
    eos: str | None
    bos: str | None = None
    add_bos: bool = False  # documents start with `bos`, as the original's post-processor does
    unk: str | None = None
    pad: str | None = None
    # the original library's encoder, for the parity check; None when nothing was converted
    reference: Callable[[list[str]], list[list[int]]] | None = None
    # texts matching this regex are left out of the parity check: spellings the conversion is known
    # to treat differently (the original's own special-token strings are always left out)
    unchecked: str = ""
    info: dict = field(default_factory=dict)  # what was read, for RUN/tokenizer/report.json


def _need(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0].replace("google", "protobuf")
        raise LmforgeError(f"{what} needs the `{package}` package: {INSTALL}") from None


def bos_processor(bos: str, bos_id: int) -> processors.TemplateProcessing:
    """The post-processor of Llama-style tokenizers: BOS before each sequence, nothing after."""
    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


# --- sentencepiece -------------------------------------------------------------------------------

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE, UNUSED = 1, 2, 3, 4, 5, 6  # sentencepiece piece types
UNIGRAM, BPE = 1, 2  # sentencepiece model types


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, the highest-scoring result first.

    sentencepiece's BPE merges the adjacent pair whose concatenation scores highest; a merge list
    with every split of every piece, ranked by the score of the piece it makes, does the same.
    """
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def from_sentencepiece(path: Path) -> Adopted:
    """A sentencepiece BPE or Unigram model (Llama-2, Mistral v1, T5 style) as a `tokenizers` tokenizer."""
    spm = _need("sentencepiece", "reading a sentencepiece .model")
    _need("google.protobuf", "reading a sentencepiece .model")
    from sentencepiece import sentencepiece_model_pb2 as pb2

    data = path.read_bytes()
    proto = pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:
        proto.Clear()
    if not proto.pieces:
        if looks_like_tiktoken(data):
            raise LmforgeError(
                f"tokenizer.from_file: {path} is a tiktoken rank file, not a sentencepiece model (Llama-3's "
                "original/tokenizer.model is one): adopt the model's tokenizer.json instead, or, for an OpenAI "
                "encoding, set tokenizer.tiktoken_encoding (r50k_base, cl100k_base, o200k_base)")
        raise LmforgeError(f"tokenizer.from_file: {path} is not a sentencepiece model (no pieces could be read)")
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    pieces = proto.pieces
    unk = ts.unk_piece if ts.unk_id >= 0 else None
    user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
    if ts.model_type == BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        # ignore_merges: a user-defined piece, isolated below, has no merges and must come out whole
        model = models.BPE(vocab, _bpe_merges(pieces), unk_token=unk, fuse_unk=True,
                           byte_fallback=ts.byte_fallback, ignore_merges=bool(user_defined))
    elif ts.model_type == UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], ts.unk_id if unk else None,
                               ts.byte_fallback)
    else:
        kind = {3: "word", 4: "char"}.get(ts.model_type, str(ts.model_type))
        raise LmforgeError(f"tokenizer.from_file: {path} is a sentencepiece {kind} model; "
                           "only BPE and unigram models can be adopted")
    tok = HFTokenizer(model)

    # sentencepiece's normalizer, step by step: NFKC-style map, extra spaces, escape, dummy prefix
    space = "▁" if ns.escape_whitespaces else " "
    steps = []
    if ns.precompiled_charsmap:
        steps.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:  # spaces only: newlines and tabs stay (unless the map changed them)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if ns.add_dummy_prefix:  # always, even before a leading space (Metaspace would skip it there)
        steps.append(normalizers.Prepend(space))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if ts.byte_fallback else [])
        + [decoders.Fuse()] + ([decoders.Strip(content=" ", left=1)] if ns.add_dummy_prefix else []))

    if user_defined:  # sentencepiece emits them whole wherever they occur in the normalized text
        pattern = "|".join(re.escape(u) for u in sorted(user_defined, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    # control pieces (<s>, </s>) and <unk> are special: matched in the text, never produced by merges
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in pieces if p.type in (UNKNOWN, CONTROL)])
    bos = ts.bos_piece if ts.bos_id >= 0 else None
    if bos:  # a sentencepiece model has no post-processor; its families (Llama, Mistral) add BOS
        tok.post_processor = bos_processor(bos, ts.bos_id)
    sp = spm.SentencePieceProcessor(model_proto=data)
    return Adopted(tok, eos=ts.eos_piece if ts.eos_id >= 0 else None, bos=bos, add_bos=bos is not None,
                   unk=unk, pad=ts.pad_piece if ts.pad_id >= 0 else None,
                   reference=lambda texts: sp.encode(texts),
                   # a Unigram lattice in `tokenizers` also holds the byte pieces, so a literal "<0x41>"
                   # can come out as that piece; sentencepiece only uses them for unknown characters
                   unchecked=r"<0x[0-9A-Fa-f]{2}>" if ts.model_type == UNIGRAM and ts.byte_fallback else "",
                   info={"format": "sentencepiece", "model_type": "bpe" if ts.model_type == BPE else "unigram",
                         "normalizer": ns.name, "byte_fallback": ts.byte_fallback,
                         "add_dummy_prefix": ns.add_dummy_prefix,
                         "remove_extra_whitespaces": ns.remove_extra_whitespaces})


# --- tiktoken ------------------------------------------------------------------------------------

ENDOFTEXT, ENDOFPROMPT = "<|endoftext|>", "<|endofprompt|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
# Split regexes and special tokens of OpenAI's encodings, as tiktoken publishes them
# (tiktoken_ext/openai_public.py). The rank files are not shipped: they come from the user's disk.
TIKTOKEN_ENCODINGS: dict[str, tuple[str, dict[str, int]]] = {
    "r50k_base": (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
                  {ENDOFTEXT: 50256}),
    "cl100k_base": (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
                    {ENDOFTEXT: 100257, FIM_PREFIX: 100258, FIM_MIDDLE: 100259, FIM_SUFFIX: 100260,
                     ENDOFPROMPT: 100276}),
    "o200k_base": ("|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
    ]), {ENDOFTEXT: 199999, ENDOFPROMPT: 200018}),
}


def for_oniguruma(pattern: str) -> str:
    """tiktoken's regex (Rust fancy-regex) in the dialect of `tokenizers` (Oniguruma, Ruby syntax).

    Possessive `?+`, `*+`, `++` mean the same in both, but Ruby reads `{1,3}+` as "one or more
    runs of one to three", not as a possessive interval: there it must be the plain `{1,3}`,
    which matches the same because nothing after it in its alternative could backtrack into it.
    """
    return re.sub(r"\}\+", "}", pattern)


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value, as byte-level BPE vocabularies spell tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def looks_like_tiktoken(data: bytes) -> bool:
    """True if the first line is `<base64 token> <rank>`, the tiktoken rank-file format."""
    first = data[:200].split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return False
    return True


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """Token bytes -> rank from a `.tiktoken` file (one `<base64 token> <rank>` per line)."""
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token_b64, rank_s = line.split()
            token, rank = base64.b64decode(token_b64, validate=True), int(rank_s)
        except ValueError:
            raise LmforgeError(f"{path}:{n}: expected `<base64 token> <rank>`, got {line[:60]!r}") from None
        if token in ranks or rank in seen:
            raise LmforgeError(f"{path}:{n}: token or rank {rank} appears twice")
        ranks[token] = rank
        seen.add(rank)
    if not ranks:
        raise LmforgeError(f"{path}: no ranks in the file (expected `<base64 token> <rank>` per line)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise LmforgeError(f"{path}: {len(missing)} of the 256 single bytes have no rank (first: {missing[0]}); "
                           "a byte-level BPE needs all of them")
    return ranks


def tiktoken_encoding(path: Path, configured: str) -> str:
    """The encoding whose regex and specials apply: tokenizer.tiktoken_encoding, else the file's name."""
    if configured:
        return configured
    for name in TIKTOKEN_ENCODINGS:
        if name in path.name:
            return name
    raise LmforgeError(f"tokenizer.from_file: cannot tell which encoding {path.name} is; name it with "
                       f"tokenizer.tiktoken_encoding ({', '.join(TIKTOKEN_ENCODINGS)})")


def special_ids(encoding: str, ranks: dict[bytes, int]) -> dict[str, int]:
    """The encoding's special tokens with their ids for this rank file.

    A file of the encoding itself (its ranks end at most one id below the first special) keeps
    the published ids, gaps included. A smaller or larger vocabulary with the same regex gets the
    specials right after its last rank, spaced as published.
    """
    published = TIKTOKEN_ENCODINGS[encoding][1]
    gap = min(published.values()) - (max(ranks.values()) + 1)
    shift = 0 if gap in (0, 1) else -gap
    return {t: i + shift for t, i in published.items()}


def from_tiktoken(path: Path, configured_encoding: str = "") -> Adopted:
    """A `.tiktoken` rank file of r50k_base, cl100k_base or o200k_base as a byte-level BPE."""
    tiktoken = _need("tiktoken", "adopting a .tiktoken file")
    encoding = tiktoken_encoding(path, configured_encoding)
    pattern, _ = TIKTOKEN_ENCODINGS[encoding]
    ranks = read_tiktoken(path)
    specials = special_ids(encoding, ranks)
    chars = byte_chars()

    def spell(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        splits = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                  if token[:cut] in ranks and token[cut:] in ranks]
        merges += [(rank, ranks[left], ranks[right], left, right) for left, right in splits]
    merges.sort()
    vocab = {spell(t): r for t, r in ranks.items()}
    # ids that are neither a rank nor a special (cl100k and o200k have such gaps) get a reserved
    # token, so ids stay those of the original and the vocabulary has no holes
    taken = set(vocab.values()) | set(specials.values())
    reserved = {f"<|reserved_{i}|>": i for i in range(max(taken) + 1) if i not in taken}
    added = {**specials, **reserved}
    tok = HFTokenizer(models.BPE({**vocab, **added}, [(spell(a), spell(b)) for *_, a, b in merges],
                                 ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(for_oniguruma(pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in sorted(added, key=added.get)])
    enc = tiktoken.Encoding(f"lmforge-{encoding}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return Adopted(tok, eos=ENDOFTEXT, reference=enc.encode_ordinary_batch,
                   info={"format": "tiktoken", "encoding": encoding, "ranks": len(ranks),
                         "special_ids": specials, "reserved_ids": len(reserved)})


# --- the check that the conversion is exact ------------------------------------------------------

# Always checked, whatever the corpus: Chinese, English, code, and whitespace of every kind.
PROBES = [
    "机器学习是人工智能的一个分支。今天天气很好，我们去公园散步吧！「深度学习」需要大量数据：１２３。",
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'LL see: 12,345.67 apples!",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # 递归\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\r\n\r\n  trailing   \n\n\n",
    "  leading spaces, café, naïve, Ǆ, ＡＢＣ, emoji 🚀👍🏽, 日本語のテキスト, 한국어, Привет  ",
]


def check_parity(adopted: Adopted, texts: list[str], max_bytes: int = 4_000_000) -> dict:
    """Encode `texts` (and PROBES) with the conversion and with the original library; refuse on a difference.

    Texts holding a special-token string are skipped: lmforge turns those into their ids, the
    original libraries (sentencepiece, tiktoken's encode_ordinary) spell them out.
    """
    specials = [t.content for t in adopted.tok.get_added_tokens_decoder().values()]
    unchecked = re.compile(adopted.unchecked) if adopted.unchecked else None
    chosen, skipped, size = [], 0, 0
    for text in PROBES + texts:
        if any(s in text for s in specials) or (unchecked and unchecked.search(text)):
            skipped += 1
            continue
        if size >= max_bytes:
            break
        chosen.append(text)
        size += len(text.encode("utf-8"))
    ours = [e.ids for e in adopted.tok.encode_batch_fast(chosen, add_special_tokens=False)]
    theirs = adopted.reference(chosen)
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if list(a) != list(b)]
    if bad:
        text = chosen[bad[0]]
        a, b = ours[bad[0]], list(theirs[bad[0]])
        at = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        raise LmforgeError(
            f"the converted {adopted.info.get('format')} tokenizer encodes {len(bad)} of {len(chosen)} texts "
            f"differently from the original library (first: {text[:80]!r}, from token {at}: {a[at:at + 5]} "
            f"vs {b[at:at + 5]}); training on it would not match the original. Please report this; "
            "meanwhile adopt the model's tokenizer.json if it has one")
    return {"texts": len(chosen), "bytes": size, "skipped": skipped, "mismatches": 0}
