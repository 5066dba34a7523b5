"""Byte-level BPE tokenizer: train, adopt, load, save; special tokens and the ChatML template.

The tokenizer is Hugging Face `tokenizers` byte-level BPE with Qwen2's pre-tokenizer split regex,
so it handles Chinese, English and code alike, and llama.cpp recognises it as pre-tokenizer
"qwen2" when the model is exported to GGUF. It is saved so that
`transformers.AutoTokenizer.from_pretrained(RUN/tokenizer)` loads it with no custom code.

No normalizer: Qwen2 applies NFC, but that makes decode(encode(x)) != x for text that is not
already NFC, and llama.cpp never normalizes, so a GGUF export would tokenize differently from
training. Without one, every string round-trips byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.config import Config
from lmforge.console import log, progress
from lmforge.errors import LmforgeError
from lmforge.io import AtomicDir, atomic_write_json, atomic_write_text, read_json

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Qwen2's split regex, verbatim: contractions, letters with one optional leading symbol, digits one
# by one, punctuation runs, newlines, whitespace. llama.cpp matches on it for pre-tokenizer "qwen2".
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatML in the Qwen2 style, without Qwen's default system prompt or tool handling.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE in plain Python (no jinja2 at run time); tests check both agree."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def _canonical_hash(tok: HFTokenizer) -> str:
    """sha256 of tokenizer.json with sorted keys and no whitespace: file formatting does not matter."""
    obj = json.loads(tok.to_str())
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode("utf-8")).hexdigest()


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and files the rest of lmforge needs."""

    def __init__(self, tok: HFTokenizer, chat_template: str = CHAT_TEMPLATE, model_max_length: int = 1024):
        self.tok = tok
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise LmforgeError(f"the tokenizer has no {EOT} token; every document ends with it")
        self.eot_id: int = eot
        self.im_start_id: int | None = tok.token_to_id(IM_START)
        self.im_end_id: int | None = tok.token_to_id(IM_END)
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.hash: str = _canonical_hash(tok)

    def encode(self, text: str) -> list[int]:
        """Ids for `text`; adds nothing, but special-token strings in the text become their ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # numpy / torch too
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, s: str) -> int:
        i = self.tok.token_to_id(s)
        if i is None:
            raise LmforgeError(f"token {s!r} is not in the tokenizer's vocabulary")
        return i

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return render_chat(messages, add_generation_prompt)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja, each atomically.

        Per-file atomic (not a whole-folder swap) because the folder may be a checkpoint or an
        export that holds other files; `train_tokenizer` wraps this in an AtomicDir.
        """
        d = Path(directory)
        specials = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": EOT,
            "pad_token": EOT,
            "unk_token": None,
            "model_max_length": self.model_max_length,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # else HF decode would edit spaces and differ from ours
            "additional_special_tokens": [t for t in sorted(specials, key=specials.get) if t != EOT],
            "chat_template": self.chat_template,
        }
        atomic_write_text(d / "tokenizer.json", self.tok.to_str(pretty=True))
        atomic_write_json(d / "tokenizer_config.json", config)
        atomic_write_text(d / "chat_template.jinja", self.chat_template)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a folder holding tokenizer.json (and tokenizer_config.json), or a tokenizer.json."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise LmforgeError(f"no tokenizer at {file}: run `lmforge tokenizer` first "
                               "(or set tokenizer.from_file to an existing tokenizer.json)")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise LmforgeError(f"{file}: not a valid tokenizer.json ({e}); "
                               "re-run `lmforge tokenizer`") from None
        template, max_len = CHAT_TEMPLATE, 1024
        cfg_file, jinja_file = file.parent / "tokenizer_config.json", file.parent / "chat_template.jinja"
        if cfg_file.is_file():
            meta = read_json(cfg_file)
            template = meta.get("chat_template") or template
            max_len = int(meta.get("model_max_length") or max_len)
        if jinja_file.is_file():  # transformers prefers this file too
            template = jinja_file.read_text(encoding="utf-8")
        try:
            return cls(tok, template, max_len)
        except LmforgeError as e:
            raise LmforgeError(f"{file}: {e}") from None


def new_tokenizer(special_tokens: list[str]) -> tuple[HFTokenizer, list[AddedToken]]:
    """An empty byte-level BPE with the Qwen2 split regex; specials are matched verbatim, never split."""
    tok = HFTokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in special_tokens]
    return tok, specials


def _specials(cfg: Config) -> list[str]:
    """Configured special tokens, with the three lmforge relies on always present (EOT first: id 0)."""
    out = [EOT] + [t for t in cfg.tokenizer.special_tokens if t != EOT]
    return out + [t for t in (IM_START, IM_END) if t not in out]


def adopt_tokenizer(path: str | Path, special_tokens: list[str]) -> HFTokenizer:
    """Load an existing tokenizer.json and add any of `special_tokens` it lacks."""
    file = Path(path)
    file = file / "tokenizer.json" if file.is_dir() else file
    if not file.is_file():
        raise LmforgeError(f"tokenizer.from_file: {file} does not exist")
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:
        raise LmforgeError(f"tokenizer.from_file: {file} is not a valid tokenizer.json ({e})") from None
    if tok.token_to_id(EOT) is None:
        raise LmforgeError(f"tokenizer.from_file: {file} has no {EOT} token; lmforge ends every "
                           "document with it. Add it to the tokenizer or train one with `lmforge tokenizer`")
    missing = [t for t in special_tokens if tok.token_to_id(t) is None]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tok


def train_tokenizer(cfg: Config) -> dict:
    """Train (or adopt) the run's tokenizer, write RUN/tokenizer, and report bytes per token.

    A fixed fraction of documents, chosen by a hash of their text (not an RNG, so reruns and other
    machines agree), is held out of training to measure compression on unseen text. `prepare` picks
    its validation documents with the same hash, so with held_out_fraction >= data.val_fraction the
    tokenizer never saw the validation set.
    """
    from lmforge.data.sources import SourceStats, count_source_bytes, iter_documents, text_fraction

    tc = cfg.tokenizer
    out_dir = Path(cfg.run_dir) / "tokenizer"
    sources = tc.sources or cfg.data.sources
    specials = _specials(cfg)
    if not tc.from_file and not sources:
        raise LmforgeError("no training text: set tokenizer.sources or data.sources (files, folders, globs)")
    if not tc.from_file and tc.vocab_size <= 256 + len(specials):
        raise LmforgeError(f"tokenizer.vocab_size={tc.vocab_size} is too small: the 256 byte tokens and "
                           f"{len(specials)} special tokens alone need {256 + len(specials)}")
    if not 0.0 <= tc.held_out_fraction < 1.0:
        raise LmforgeError(f"tokenizer.held_out_fraction must be in [0, 1), got {tc.held_out_fraction}")

    held_out: list[str] = []
    held_bytes = 0
    seen = {"bytes": 0, "docs": 0}
    total = count_source_bytes(sources) if sources else 0
    # Hash-based sample of about max_train_bytes; the size estimate is rough (compressed files), so
    # the byte cap below is the real limit.
    keep = 1.0 if not tc.max_train_bytes or not total else min(1.0, tc.max_train_bytes / total)
    stats = SourceStats()

    def texts(advance) -> Iterator[str]:
        nonlocal held_bytes
        for doc in iter_documents(sources, cfg.data.text_field, stats, cfg.data.max_doc_bytes):
            n = len(doc.text.encode("utf-8"))
            advance(n / 1e6)
            u = text_fraction(doc.text)
            if u < tc.held_out_fraction:
                if held_bytes < 20_000_000:  # enough to measure bytes/token; bounded memory
                    held_out.append(doc.text)
                    held_bytes += n
                continue
            if tc.from_file:
                continue
            if (u - tc.held_out_fraction) / (1.0 - tc.held_out_fraction) >= keep:
                continue
            if tc.max_train_bytes and seen["bytes"] >= tc.max_train_bytes:
                continue
            seen["bytes"] += n
            seen["docs"] += 1
            yield doc.text

    if tc.from_file:
        tok = adopt_tokenizer(tc.from_file, specials)
        if sources:
            with progress("reading held-out text", total / 1e6, "MB") as advance:
                for _ in texts(advance):
                    pass
    else:
        tok, added = new_tokenizer(specials)
        trainer = trainers.BpeTrainer(vocab_size=tc.vocab_size, min_frequency=tc.min_frequency,
                                      special_tokens=added, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        with progress("training tokenizer", total / 1e6, "MB read") as advance:
            tok.train_from_iterator(texts(advance), trainer)
        if seen["docs"] == 0:
            raise LmforgeError(f"no training documents in {', '.join(sources)} (all empty or held out); "
                               "add text or lower tokenizer.held_out_fraction")

    wrapped = Tokenizer(tok, CHAT_TEMPLATE, cfg.model.max_seq_len)
    held_tokens = sum(len(ids) for ids in wrapped.encode_batch(held_out)) if held_out else 0
    report = {
        "vocab_size": wrapped.vocab_size,
        "requested_vocab_size": None if tc.from_file else tc.vocab_size,
        "adopted_from": tc.from_file or None,
        "training_bytes": seen["bytes"],
        "training_documents": seen["docs"],
        "held_out_documents": len(held_out),
        "held_out_bytes": held_bytes,
        "held_out_tokens": held_tokens,
        "bytes_per_token": round(held_bytes / held_tokens, 4) if held_tokens else None,
        "special_tokens": {t: wrapped.token_id(t) for t in specials},
        "skipped_files": stats.skipped_files,
        "hash": wrapped.hash,
    }
    with AtomicDir(out_dir) as tmp:
        wrapped.save(tmp)
        atomic_write_json(tmp / "report.json", report)
    bpt = f"{report['bytes_per_token']:.2f}" if held_tokens else "n/a (no held-out documents)"
    log(f"tokenizer: {wrapped.vocab_size} tokens, trained on {seen['bytes'] / 1e6:.1f} MB "
        f"({seen['docs']} docs); held-out bytes/token {bpt} -> {out_dir}")
    return report
