"""Byte-level BPE tokenizer: train, adopt, load, save; special tokens and the ChatML template.

lmforge trains its own tokenizer, or adopts one a user already has (a Llama-3 / Qwen / Mistral style
tokenizer.json, a sentencepiece .model, a tiktoken file; see tokenizer_formats.py) with that
tokenizer's own end-of-text and BOS tokens, so a model trained here sees text the way its family does.

The tokenizer lmforge trains is Hugging Face `tokenizers` byte-level BPE with Qwen2's pre-tokenizer split regex,
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
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.config import Config, TokenizerConfig
from lmforge.console import log, progress
from lmforge.errors import LmforgeError
from lmforge.io import AtomicDir, atomic_write_json, atomic_write_text, read_json
from lmforge.tokenizer_formats import Adopted, bos_processor, check_parity, from_sentencepiece, from_tiktoken

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Tokens that end a document, in the order they are looked for when a tokenizer names none:
# GPT-2 / Qwen / lmforge, Llama-3, Llama-2 / Mistral, Gemma, DeepSeek.
DOC_ENDS = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<｜end▁of▁sentence｜>")
# An instruct tokenizer's eos_token often ends a chat turn instead; documents end with a DOC_ENDS token.
TURN_ENDS = (IM_END, "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

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


@lru_cache(maxsize=8)
def _compile_template(template: str):
    """A Jinja chat template compiled the way transformers compiles it (sandboxed, trim_blocks,
    lstrip_blocks, `raise_exception`), so it renders the same text here and there."""
    from jinja2 import TemplateError  # only a tokenizer with a custom template needs jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise LmforgeError(f"the tokenizer's chat_template is not valid Jinja: {e}") from None


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = False,
                    bos_token: str = "", eos_token: str = EOT) -> str:
    """Render any chat template (tokenizer_config.json's `chat_template`) to text."""
    if template == CHAT_TEMPLATE:
        return render_chat(messages, add_generation_prompt)
    from jinja2 import TemplateError

    try:
        return _compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:
        raise LmforgeError(f"chat_template failed to render: {e}") from None


def _canonical_hash(tok: HFTokenizer) -> str:
    """sha256 of tokenizer.json with sorted keys and no whitespace: file formatting does not matter."""
    obj = json.loads(tok.to_str())
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode("utf-8")).hexdigest()


def _token_str(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...} in older files."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def choose_eos(tok: HFTokenizer, configured: str | None = None) -> str:
    """The token that ends every document: the tokenizer's own eos, unless that only ends a chat turn."""
    if configured and tok.token_to_id(configured) is None:
        raise LmforgeError(f"its eos_token {configured!r} is not in its vocabulary")
    if configured and configured not in TURN_ENDS:
        return configured
    found = next((t for t in DOC_ENDS if tok.token_to_id(t) is not None), None)
    if found or configured:
        return found or configured
    raise LmforgeError(
        f"the tokenizer has no end-of-text token: no {EOT}, no eos_token in a tokenizer_config.json beside it, "
        f"and none of {', '.join(DOC_ENDS[1:])}. lmforge ends every document with one: put "
        '{"eos_token": "<a token of its vocabulary>"} in a tokenizer_config.json beside it, '
        "or train a tokenizer with `lmforge tokenizer`")


def bos_prefix(tok: HFTokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts before a text (Llama: [BOS]; GPT-2, Qwen: none)."""
    for probe in ("Hello", "a", "0", " "):  # the first the vocabulary can spell (some have no <unk>)
        plain = tok.encode(probe, add_special_tokens=False).ids
        if plain:
            full = tok.encode(probe, add_special_tokens=True).ids
            return next((full[:i] for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), [])
    return []


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and files the rest of lmforge needs.

    `eot_id` is the token that ends every document (the tokenizer's eos: <|endoftext|> for lmforge's
    own, </s> or <|end_of_text|> for an adopted one). `bos_id` is its BOS (None when it has none);
    `add_bos` says whether documents start with it, as the tokenizer's own post-processor does.
    """

    def __init__(self, tok: HFTokenizer, chat_template: str | None = CHAT_TEMPLATE, model_max_length: int = 1024,
                 *, eos_token: str | None = None, bos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, add_bos: bool | None = None):
        self.tok = tok
        tok.no_truncation()  # some published tokenizer.json files truncate to 512 tokens; lmforge never does
        tok.no_padding()
        self.model_max_length = model_max_length
        self.eos_token: str = choose_eos(tok, eos_token)
        self.eot_id: int = tok.token_to_id(self.eos_token)
        prefix = bos_prefix(tok)
        if bos_token is None and len(prefix) == 1:
            bos_token = tok.id_to_token(prefix[0])
        if bos_token is not None and tok.token_to_id(bos_token) is None:
            raise LmforgeError(f"its bos_token {bos_token!r} is not in its vocabulary")
        self.bos_token: str | None = bos_token
        self.bos_id: int | None = tok.token_to_id(bos_token) if bos_token else None
        self.add_bos: bool = (prefix == [self.bos_id]) if add_bos is None else bool(add_bos and self.bos_id is not None)
        self.pad_token: str = pad_token if pad_token and tok.token_to_id(pad_token) is not None else self.eos_token
        self.unk_token: str | None = unk_token if unk_token and tok.token_to_id(unk_token) is not None else None
        self.im_start_id: int | None = tok.token_to_id(IM_START)
        self.im_end_id: int | None = tok.token_to_id(IM_END)
        has_chat = self.im_start_id is not None and self.im_end_id is not None
        # ChatML without its tokens would render "<|im_start|>" as plain text: no template instead
        self.chat_template = chat_template if has_chat or chat_template != CHAT_TEMPLATE else None
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.hash: str = _canonical_hash(tok)

    @property
    def doc_prefix(self) -> list[int]:
        """What every document starts with: [bos_id] for Llama-style tokenizers, else nothing."""
        return [self.bos_id] if self.add_bos else []

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
        """The conversation as text, by this tokenizer's chat template (ChatML unless it was changed)."""
        if not self.chat_template:
            raise LmforgeError("the tokenizer has no chat_template (tokenizer_config.json); cannot chat with it. "
                               "An adopted tokenizer without <|im_start|>/<|im_end|> gets them (and the template) "
                               "from `lmforge tokenizer` with tokenizer.add_chat_tokens=true")
        return render_template(self.chat_template, messages, add_generation_prompt)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` as `encode` gives them, and each token's (start, end) character span in it
        (a token holding part of a character spans that whole character)."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja, each atomically.

        Per-file atomic (not a whole-folder swap) because the folder may be a checkpoint or an
        export that holds other files; `train_tokenizer` wraps this in an AtomicDir.
        """
        d = Path(directory)
        specials = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        named = {self.eos_token, self.bos_token, self.pad_token, self.unk_token}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "model_max_length": self.model_max_length,
            "add_bos_token": self.add_bos,  # agrees with tokenizer.json's post-processor (transformers applies it)
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # else HF decode would edit spaces and differ from ours
            "additional_special_tokens": [t for t in sorted(specials, key=specials.get) if t not in named],
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_text(d / "tokenizer.json", self.tok.to_str(pretty=True))
        atomic_write_json(d / "tokenizer_config.json", config)
        if self.chat_template:
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
        meta = folder_meta(file.parent)
        jinja_file = file.parent / "chat_template.jinja"
        if meta:
            template = meta.get("chat_template") or template
            max_len = int(meta.get("model_max_length") or max_len)
        if jinja_file.is_file():  # transformers prefers this file too
            template = jinja_file.read_text(encoding="utf-8")
        try:
            return cls(tok, template, max_len, **special_kwargs(meta))
        except LmforgeError as e:
            raise LmforgeError(f"{file}: {e}") from None


def folder_meta(folder: Path) -> dict:
    """tokenizer_config.json of a folder, with special_tokens_map.json filling in what it lacks."""
    meta: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        f = folder / name
        if f.is_file():
            data = read_json(f)
            if not isinstance(data, dict):
                raise LmforgeError(f"{f}: expected a JSON object")
            meta.update({k: v for k, v in data.items() if v is not None})
    return meta


def special_kwargs(meta: dict) -> dict:
    """Tokenizer(...) keywords from a tokenizer_config.json: its eos / bos / pad / unk and add_bos_token."""
    add_bos = meta.get("add_bos_token")
    return {"eos_token": _token_str(meta.get("eos_token")), "bos_token": _token_str(meta.get("bos_token")),
            "pad_token": _token_str(meta.get("pad_token")), "unk_token": _token_str(meta.get("unk_token")),
            "add_bos": add_bos if isinstance(add_bos, bool) else None}


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


def sentinel_tokens(n: int) -> list[str]:
    """T5's span-corruption sentinels, <extra_id_0> ... <extra_id_{n-1}>: each stands for one masked span."""
    return [f"<extra_id_{i}>" for i in range(n)]


def _t5_sentinels(cfg: Config) -> list[str]:
    return sentinel_tokens(cfg.span.sentinels) if cfg.model.arch == "t5" else []


def _specials(cfg: Config) -> list[str]:
    """Configured special tokens, with the three lmforge relies on always present (EOT first: id 0), and
    T5's sentinels when model.arch=t5."""
    out = [EOT] + [t for t in cfg.tokenizer.special_tokens if t != EOT]
    out += [t for t in (IM_START, IM_END) if t not in out]
    return out + [t for t in _t5_sentinels(cfg) if t not in out]


def _file_in(folder: Path) -> Path:
    """The tokenizer to adopt from a folder: tokenizer.json, else tokenizer.model, else its .tiktoken file."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.tiktoken"))
    if len(found) == 1:
        return found[0]
    raise LmforgeError(f"tokenizer.from_file: {folder} holds no tokenizer.json, tokenizer.model or (single) "
                       ".tiktoken file; name the file itself")


def _read_tokenizer_json(file: Path) -> Adopted:
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise LmforgeError(f"tokenizer.from_file: {file} is not a valid tokenizer.json ({e})") from None
    return Adopted(tok, eos=None, add_bos=False, info={"format": "tokenizer.json"})


def adopt_tokenizer(tc: TokenizerConfig, model_max_length: int = 1024, sentinels: list[str] | None = None
                    ) -> tuple[Tokenizer, Adopted, list[str]]:
    """The tokenizer at tokenizer.from_file with its own eos / bos, plus the tokens asked for.

    A tokenizer_config.json beside the file names eos / bos / pad and add_bos_token, as transformers
    reads it; else the format's own (sentencepiece's <s> and </s>, tiktoken's <|endoftext|>). The
    ChatML tokens are added only with tokenizer.add_chat_tokens: a new token changes the vocabulary
    a pretrained model of that family was trained with. Returns (tokenizer, what was read, added tokens).
    """
    path = Path(tc.from_file).expanduser()
    if not path.exists():
        raise LmforgeError(f"tokenizer.from_file: {path} does not exist")
    file = _file_in(path) if path.is_dir() else path
    if file.suffix == ".model":
        adopted = from_sentencepiece(file)
    elif file.suffix == ".tiktoken" or (tc.tiktoken_encoding and file.suffix != ".json"):
        adopted = from_tiktoken(file, tc.tiktoken_encoding)
    else:
        adopted = _read_tokenizer_json(file)
    adopted.info["file"] = str(file.resolve())
    kw = special_kwargs(folder_meta(file.parent))
    kw = {"eos_token": kw["eos_token"] or adopted.eos, "bos_token": kw["bos_token"] or adopted.bos,
          "pad_token": kw["pad_token"] or adopted.pad, "unk_token": kw["unk_token"] or adopted.unk,
          # a tokenizer.json says whether it adds BOS in its post-processor: None reads it from there
          "add_bos": kw["add_bos"] if kw["add_bos"] is not None
          else (adopted.add_bos if adopted.reference else None)}
    wanted = [t for t in tc.special_tokens if t not in (EOT, IM_START, IM_END)]
    wanted += [IM_START, IM_END] if tc.add_chat_tokens else []
    wanted += sentinels or []
    added = [t for t in dict.fromkeys(wanted) if adopted.tok.token_to_id(t) is None]
    adopted.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    try:
        tok = Tokenizer(adopted.tok, CHAT_TEMPLATE, model_max_length, **kw)
        if tok.add_bos != (bos_prefix(adopted.tok) == [tok.bos_id]):
            # add_bos_token and the post-processor disagree (a Llama-2 folder can say so): transformers
            # follows add_bos_token, so the saved tokenizer.json is made to follow it too
            adopted.tok.post_processor = (bos_processor(tok.bos_token, tok.bos_id) if tok.add_bos else
                                          processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1"))
            tok = Tokenizer(adopted.tok, CHAT_TEMPLATE, model_max_length, **kw)
    except LmforgeError as e:
        raise LmforgeError(f"tokenizer.from_file: {file}: {e}") from None
    return tok, adopted, added


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
        for doc in iter_documents(sources, cfg.data.text_field, stats, cfg.data.max_doc_bytes, cfg.data.filter):
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

    adopted, parity = None, None
    if tc.from_file:
        wrapped, adopted, added = adopt_tokenizer(tc, cfg.model.max_seq_len, _t5_sentinels(cfg))
        if sources:
            with progress("reading held-out text", total / 1e6, "MB") as advance:
                for _ in texts(advance):
                    pass
        if adopted.reference:  # converted from another library: prove it encodes the same
            parity = check_parity(adopted, held_out)
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
        "special_tokens": {} if adopted else {t: wrapped.token_id(t) for t in specials},
        "skipped_files": stats.skipped_files,
        "hash": wrapped.hash,
        "adopted": None,
    }
    if adopted:
        report.update(_adoption_report(wrapped, adopted, added, parity))
    with AtomicDir(out_dir) as tmp:
        wrapped.save(tmp)
        atomic_write_json(tmp / "report.json", report)
    bpt = f"{report['bytes_per_token']:.2f}" if held_tokens else "n/a (no held-out documents)"
    if adopted:
        a = report["adopted"]
        log(f"tokenizer: adopted {a['format']} {a['file']}: {wrapped.vocab_size} tokens, documents "
            + (f"start with {wrapped.bos_token} and " if wrapped.add_bos else "") + f"end with {wrapped.eos_token}"
            + (f"; added {', '.join(added)}" if added else "")
            + (f"; encodes {parity['texts']} texts exactly as the original library" if parity else "")
            + f"; held-out bytes/token {bpt} -> {out_dir}")
        if not a["chat_tokens"]:
            log("[dim]it has no <|im_start|>/<|im_end|>: chat and SFT need tokenizer.add_chat_tokens=true[/dim]")
    else:
        log(f"tokenizer: {wrapped.vocab_size} tokens, trained on {seen['bytes'] / 1e6:.1f} MB "
            f"({seen['docs']} docs); held-out bytes/token {bpt} -> {out_dir}")
    return report


def _adoption_report(tok: Tokenizer, adopted: Adopted, added: list[str], parity: dict | None) -> dict:
    """report.json's special_tokens and adopted entries for an adopted tokenizer: what was read, what changed."""
    named = [tok.eos_token, tok.bos_token, tok.pad_token, tok.unk_token, IM_START, IM_END, *added]
    return {
        "special_tokens": {t: tok.tok.token_to_id(t) for t in dict.fromkeys(named)
                           if t and tok.tok.token_to_id(t) is not None},
        "adopted": {**adopted.info, "eos_token": tok.eos_token, "bos_token": tok.bos_token, "add_bos": tok.add_bos,
                    "pad_token": tok.pad_token, "added_tokens": added,
                    "chat_tokens": tok.im_start_id is not None and tok.im_end_id is not None, "parity": parity},
    }
