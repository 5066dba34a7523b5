"""Post-training examples: file formats -> conversations -> token ids + loss masks -> batches.

`render_conversation` is the one function that turns a conversation into (ids, loss mask): SFT,
DPO, the reward model, GRPO, eval, `chat` and `serve` all go through it, so the layout and the rule
"learn only the assistant's tokens, its <|im_end|> included" live in one place (as nanochat's
`render_conversation` does). It renders the tokenizer's chat template to text and encodes the text
whole, so the ids are the ones `transformers`' `apply_chat_template(..., tokenize=True)`, vLLM and
llama.cpp feed the model: what it is trained on is what it is served.

Readers accept JSON Lines or JSON arrays, and every problem names the file, the line and the field,
because a bad record found after an hour of training is an hour lost.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.data.loader import EpochStream
from lmforge.errors import LmforgeError
from lmforge.io import json_lines
from lmforge.model.loss import IGNORE
from lmforge.tokenizer import CHAT_TEMPLATE, IM_END, IM_START

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant"}
Messages = list[dict]


@dataclass
class Record:
    data: dict
    where: str  # "file:line", for error messages


# --- reading --------------------------------------------------------------------------------------

def _json_array_items(path: Path, text: str) -> Iterable[tuple[int, object]]:
    """(line, item) of a top-level JSON array, so errors can point at the item's line."""
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text[i:i + 1] == "[":
        raise LmforgeError(f"{path}:1: a .json file of examples must hold a JSON array of objects")
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise LmforgeError(f"{path}: the JSON array is not closed with ']'")
        if text[i] == "]":
            return
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield line, obj


def read_records(paths: list[str], what: str = "examples") -> list[Record]:
    """Every object in `paths` (files, folders, globs of .jsonl / .json), in order."""
    from lmforge.data.sources import resolve_sources

    if not paths:
        raise LmforgeError(f"no {what} files given")
    out: list[Record] = []
    for path, _ in resolve_sources(list(paths)):
        suffix = path.suffix.lower()
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise LmforgeError(f"{path}:{line}: not valid UTF-8; convert the file to UTF-8") from None
        if suffix in (".jsonl", ".ndjson"):
            items = list(json_lines(path, text.splitlines()))
        elif suffix == ".json":
            items = list(_json_array_items(path, text))
        else:
            raise LmforgeError(f"{path}: {what} must be .jsonl or .json (a JSON array), not '{suffix}'")
        for n, obj in items:
            if not isinstance(obj, dict):
                raise LmforgeError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            out.append(Record(obj, f"{path}:{n}"))
    if not out:
        raise LmforgeError(f"no {what} in {', '.join(paths)}")
    return out


def split_records(records: list[Record], val_fraction: float) -> tuple[list[Record], list[Record]]:
    """A stable (train, val) split by a hash of each record's content, like `prepare`'s val split."""
    from lmforge.data.sources import text_fraction

    if val_fraction <= 0:
        return records, []
    train, val = [], []
    for r in records:
        key = json.dumps(r.data, sort_keys=True, ensure_ascii=False)
        (val if text_fraction(key) < val_fraction else train).append(r)
    if not train or not val:
        raise LmforgeError(f"val_fraction={val_fraction} leaves {len(train)} training and {len(val)} validation "
                           f"examples out of {len(records)}; change it or give val_data")
    return train, val


# --- formats -> messages --------------------------------------------------------------------------

def _string(rec: Record, key: str, value: object) -> str:
    if not isinstance(value, str):
        raise LmforgeError(f"{rec.where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(rec: Record, key: str, value: object, role_key: str = "role", content_key: str = "content",
              roles: dict | None = None) -> Messages:
    if not isinstance(value, list) or not value:
        raise LmforgeError(f"{rec.where}: field '{key}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        f = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise LmforgeError(f"{rec.where}: {f} must be an object with '{role_key}' and '{content_key}'")
        for k in (role_key, content_key):
            if k not in m:
                raise LmforgeError(f"{rec.where}: {f} has no field '{k}' (fields: {', '.join(m) or 'none'})")
        role = m[role_key]
        mapped = (roles or {r: r for r in ROLES}).get(role) if isinstance(role, str) else None
        if mapped is None:
            allowed = ", ".join(roles or ROLES)
            raise LmforgeError(f"{rec.where}: {f}.{role_key} is {role!r}, not one of {allowed}")
        out.append({"role": mapped, "content": _string(rec, f"{f}.{content_key}", m[content_key])})
    return out


def _prompt(rec: Record) -> Messages:
    """The user side of prompt-style records: "prompt" (text or messages) or "instruction" (+ "input")."""
    d = rec.data
    system = [{"role": "system", "content": _string(rec, "system", d["system"])}] if d.get("system") else []
    if "prompt" in d:
        if isinstance(d["prompt"], list):
            return system + _messages(rec, "prompt", d["prompt"])
        return system + [{"role": "user", "content": _string(rec, "prompt", d["prompt"])}]
    if "instruction" in d:
        text = _string(rec, "instruction", d["instruction"])
        if d.get("input"):
            text = f"{text}\n\n{_string(rec, 'input', d['input'])}"
        return system + [{"role": "user", "content": text}]
    raise LmforgeError(f"{rec.where}: no 'prompt' or 'instruction' field (fields: {', '.join(d) or 'none'})")


def _reply(rec: Record, key: str) -> Messages:
    value = rec.data[key]
    if isinstance(value, list):
        return _messages(rec, key, value)
    return [{"role": "assistant", "content": _string(rec, key, value)}]


SFT_FORMATS = ('{"messages": [{"role", "content"}]}, {"prompt", "completion"}, {"instruction", "input"?, '
               '"output"}, {"instruction", "response"}, {"conversations": [{"from", "value"}]}')


def sft_messages(rec: Record) -> Messages:
    """The conversation of one SFT record, whichever of the supported formats it uses."""
    d = rec.data
    if "messages" in d:
        return _messages(rec, "messages", d["messages"])
    if "conversations" in d:
        return _messages(rec, "conversations", d["conversations"], "from", "value", SHAREGPT_ROLES)
    if "completion" in d:
        return _prompt(rec) + _reply(rec, "completion")
    for key in ("output", "response"):
        if key in d and "instruction" in d:
            return _prompt(rec) + _reply(rec, key)
    raise LmforgeError(f"{rec.where}: not an SFT example (fields: {', '.join(d) or 'none'}); "
                       f"expected one of {SFT_FORMATS}")


def preference_messages(rec: Record) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) messages of a preference pair.

    chosen/rejected are replies (strings or assistant messages) after "prompt"/"instruction", or, with
    no prompt field, whole conversations whose shared beginning is the prompt.
    """
    d = rec.data
    for key in ("chosen", "rejected"):
        if key not in d:
            raise LmforgeError(f"{rec.where}: no '{key}' field (fields: {', '.join(d) or 'none'}); expected "
                               '{"prompt" or "instruction", "chosen", "rejected"}')
    chosen, rejected = _reply(rec, "chosen"), _reply(rec, "rejected")
    if "prompt" in d or "instruction" in d:
        return _prompt(rec), chosen, rejected
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise LmforgeError(f"{rec.where}: no 'prompt' field, and 'chosen' and 'rejected' share no opening turns")
    return chosen[:n], chosen[n:], rejected[n:]


def prompt_messages(rec: Record) -> Messages:
    """The prompt of an RL / evaluation record: "prompt" or "messages" (a final assistant turn dropped)."""
    d = rec.data
    if "messages" in d and "prompt" not in d:
        msgs = _messages(rec, "messages", d["messages"])
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise LmforgeError(f"{rec.where}: 'messages' holds no prompt before the assistant's turn")
        return msgs
    return _prompt(rec)


# --- rendering ------------------------------------------------------------------------------------

def render_conversation(tok, messages: Messages, max_len: int = 0, where: str = "",
                        add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a mask (1 = learn this token) of the same length.

    The text is the tokenizer's chat template (ChatML: `<|im_start|>role\ncontent<|im_end|>\n`
    per turn), encoded whole. The mask marks the tokens that hold any character of an assistant's
    content or of the end-of-turn token after it, so the model learns what to say and when to stop,
    never the user's words. Byte-level BPE can merge across the edge of a reply (a reply that starts
    with "\n" shares one "\n\n" token with the template's "\n" after the role): such a token holds
    reply text, so it is learned; without it the reply's first character would never be a target.
    The reply's end never straddles: <|im_end|> is a special token, and text is split around it.

    With add_generation_prompt the ids end with `<|im_start|>assistant\n`, ready for sampling, and
    no assistant token is required. max_len > 0 cuts the ids to that length.
    """
    text, spans = chat_text(tok, messages, add_generation_prompt, where)
    ids, offsets = tok.encode_with_offsets(text)
    mask = learned(offsets, spans)
    if max_len and len(ids) > max_len:
        ids, mask = ids[:max_len], mask[:max_len]
        if add_generation_prompt:
            raise LmforgeError(f"{where}: the prompt has more than {max_len} tokens; shorten it")
    if not add_generation_prompt and not any(mask):
        if any(m["role"] == "assistant" for m in messages):
            raise LmforgeError(f"{where}: cut to {max_len} tokens, no assistant token is left to learn from; "
                               "raise train.seq_len or shorten the example")
        raise LmforgeError(f"{where}: the conversation has no assistant message to learn from")
    return ids, mask


def chat_text(tok, messages: Messages, add_generation_prompt: bool = False,
              where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans to learn (assistant content + end of turn)."""
    template = getattr(tok, "chat_template", None) or CHAT_TEMPLATE
    if template == CHAT_TEMPLATE:
        if tok.im_start_id is None or tok.im_end_id is None:
            raise LmforgeError("the tokenizer has no <|im_start|>/<|im_end|> tokens: re-run `lmforge tokenizer` "
                               "with tokenizer.add_chat_tokens=true (an adopted tokenizer) or train one (it has them)")
        parts, spans, at = [], [], 0
        for m in messages:  # render_chat, keeping track of where each reply lies
            head, body = f"{IM_START}{m['role']}\n", m["content"] + IM_END
            if m["role"] == "assistant":
                spans.append((at + len(head), at + len(head) + len(body)))
            parts.append(head + body + "\n")
            at += len(parts[-1])
        text = "".join(parts) + (f"{IM_START}assistant\n" if add_generation_prompt else "")
        return text, spans
    return _template_text(tok, messages, add_generation_prompt, where)


def _template_text(tok, messages: Messages, add_generation_prompt: bool, where: str):
    """chat_text for any other template: each reply starts where the template's generation prompt
    for the turns before it ends, and is learned up to the special token that closes it."""
    text = tok.render_chat(messages, add_generation_prompt)
    hf = getattr(tok, "tok", None)
    ends = sorted((t.content for t in hf.get_added_tokens_decoder().values() if t.special) if hf else [IM_END],
                  key=len, reverse=True)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(before := tok.render_chat(messages[:i], add_generation_prompt=True))
        if not text.startswith(before) or not text.startswith(m["content"], start):
            raise LmforgeError(f"{where}: the tokenizer's chat_template does not render messages[{i}] (assistant) "
                               "verbatim after the generation prompt of the turns before it, so the tokens to "
                               "learn cannot be told apart; use lmforge's ChatML template")
        end = start + len(m["content"])
        close = next((t for t in ends if text.startswith(t, end)), None)
        if close is None:
            raise LmforgeError(f"{where}: the tokenizer's chat_template puts no special token right after "
                               f"messages[{i}] (assistant), so the model could not learn to end its turn")
        spans.append((start, end + len(close)))
    return text, spans


def learned(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap a span (both sorted by position), else 0."""
    mask, j = [], 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        mask.append(int(j < len(spans) and start < spans[j][1] and end > spans[j][0]))
    return mask


def shift(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """(inputs, targets) for next-token prediction; targets the mask does not train are IGNORE."""
    return ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]


def pad_rows(rows: list[list[int]], value: int, length: int = 0) -> torch.Tensor:
    """Right-pad rows to `length` (default: the longest) into a (B, T) long tensor."""
    T = max(length, max(len(r) for r in rows))
    return torch.tensor([r + [value] * (T - len(r)) for r in rows], dtype=torch.long)


def pack(examples: list[tuple[list[int], list[int]]], order: Iterable[int], seq_len: int) -> list[list[int]]:
    """Group examples (inputs, targets) into rows of at most seq_len tokens, in `order` (next fit)."""
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for i in order:
        n = len(examples[i][0])
        if row and used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += n
    if row:
        rows.append(row)
    return rows


def collate_sft(examples: list[tuple[list[int], list[int]]], rows: list[list[int]], seq_len: int,
                packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of rows. Packed rows carry per-example positions (restarting at 0) and doc_ids,
    so attention never crosses examples; unpacked rows are one example each, right-padded, where
    causal attention alone keeps real tokens from seeing the padding."""
    if not packing:
        inputs = [examples[r[0]][0] for r in rows]
        targets = [examples[r[0]][1] for r in rows]
        return {"input_ids": pad_rows(inputs, pad_id), "targets": pad_rows(targets, IGNORE)}
    B = len(rows)
    x = torch.full((B, seq_len), pad_id, dtype=torch.long)
    y = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    doc = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for d, i in enumerate(row):
            inp, tgt = examples[i]
            n = len(inp)
            x[b, t:t + n] = torch.tensor(inp)
            y[b, t:t + n] = torch.tensor(tgt)
            pos[b, t:t + n] = torch.arange(n)
            doc[b, t:t + n] = d
            t += n
        pos[b, t:] = torch.arange(seq_len - t)  # padding: its own "document", never attended to by others
    return {"input_ids": x, "targets": y, "positions": pos, "doc_ids": doc}


class SFTBatches(EpochStream):
    """SFT steps: each epoch shuffles the examples (seeded), then packs them into rows (or not)."""

    what = "rows"

    def __init__(self, examples: list[tuple[list[int], list[int]]], seq_len: int, packing: bool, pad_id: int,
                 micro_batch: int, accum: int, rank: int, world: int, seed: int):
        super().__init__(micro_batch, accum, rank, world, seed)
        self.examples, self.seq_len, self.packing, self.pad_id = examples, seq_len, packing, pad_id

    def epoch_items(self, epoch: int) -> list:
        order = self.order(len(self.examples), epoch)
        return pack(self.examples, order, self.seq_len) if self.packing else [[int(i)] for i in order]

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        return collate_sft(self.examples, rows, self.seq_len, self.packing, self.pad_id)


class IndexBatches(EpochStream):
    """Steps over n items by index (preference pairs, RL prompts), shuffled per epoch."""

    def __init__(self, n: int, micro_batch: int, accum: int, rank: int, world: int, seed: int, what: str = "items"):
        super().__init__(micro_batch, accum, rank, world, seed)
        self.n, self.what = n, what

    def epoch_items(self, epoch: int) -> list:
        return [int(i) for i in self.order(self.n, epoch)]
