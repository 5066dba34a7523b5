"""Encoder-decoder data: T5's span corruption of token windows, and {"source","target"} examples.

Span corruption (Raffel et al. 2020, T5's `random_spans_noise_mask`): of a window of L tokens,
round(L x noise_density) are noise, cut into round(noise / mean_span) spans; noise and kept tokens
are each split into that many non-empty runs at random and interleaved, kept first. The encoder
reads the kept tokens with each noise span replaced by the next sentinel (<extra_id_0>, <extra_id_1>,
...); the decoder writes each sentinel followed by the tokens it stood for. Both end with the
end-of-text id. For a fixed L both lengths are fixed, so batches need no padding. The mask of an
example depends only on (seed, epoch, window index): the same data whatever the batch layout or
the moment a run was resumed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmforge.data.chat import Record
from lmforge.data.loader import EpochStream, TokenWindows
from lmforge.errors import LmforgeError
from lmforge.model.loss import IGNORE


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of `length` tokens, as T5 rounds them."""
    noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
    return noise, max(int(np.round(noise / mean_span)), 1)


def corrupted_lengths(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(encoder input length, target length) of a corrupted window, end tokens included."""
    noise, spans = span_counts(length, noise_density, mean_span)
    return length - noise + spans + 1, noise + spans + 1


def _segments(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """n items cut at random into k non-empty runs: their lengths."""
    first = np.arange(n - 1) < (k - 1)
    rng.shuffle(first)
    segment = np.cumsum(np.pad(first, (1, 0)))
    return np.bincount(segment, minlength=k)


def noise_mask(length: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean (length,) mask of the noise tokens, each span of them a run; starts with kept tokens."""
    noise, spans = span_counts(length, noise_density, mean_span)
    if length - noise < spans:
        raise LmforgeError(f"a window of {length} tokens is too short for {spans} noise spans; raise train.seq_len")
    runs = np.stack([_segments(length - noise, spans, rng), _segments(noise, spans, rng)], axis=1).reshape(-1)
    return np.repeat(np.arange(2 * spans) % 2 == 1, runs)


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: Sequence[int], eos: int) -> tuple[list[int], list[int]]:
    """(encoder input, target) of `tokens` with the noise runs of `mask` replaced by sentinels."""
    source: list[int] = []
    target: list[int] = []
    span = -1
    for i, (t, noisy) in enumerate(zip(tokens.tolist(), mask.tolist())):
        if noisy:
            if i == 0 or not mask[i - 1]:
                span += 1
                if span >= len(sentinels):
                    raise LmforgeError(f"{span + 1} noise spans but {len(sentinels)} sentinels (span.sentinels)")
                source.append(sentinels[span])
                target.append(sentinels[span])
            target.append(t)
        else:
            source.append(t)
    return source + [eos], target + [eos]


def sentinel_ids(tok, n: int) -> list[int]:
    """Ids of <extra_id_0> .. <extra_id_{n-1}>; an error naming the fix when the tokenizer lacks them."""
    from lmforge.tokenizer import sentinel_tokens

    ids = [tok.tok.token_to_id(t) for t in sentinel_tokens(n)]
    if any(i is None for i in ids):
        raise LmforgeError(f"the tokenizer has no <extra_id_0> .. <extra_id_{n - 1}> sentinels (span.sentinels={n}); "
                           "train it with model.arch=t5 (`lmforge tokenizer model.arch=t5 ...`), which adds them")
    return ids


class SpanBatches(EpochStream):
    """Span-corrupted token windows: each step's micro-batches as (input_ids, labels) of fixed widths."""

    what = "windows"

    def __init__(self, windows: TokenWindows, noise_density: float, mean_span: float, sentinels: Sequence[int],
                 eos: int, micro_batch: int, accum: int, rank: int, world: int, seed: int):
        super().__init__(micro_batch, accum, rank, world, seed)
        self.windows, self.noise_density, self.mean_span = windows, noise_density, mean_span
        self.sentinels, self.eos = list(sentinels), eos

    def epoch_items(self, epoch: int) -> np.ndarray:
        return self.order(len(self.windows), epoch)

    def example(self, index: int, epoch: int) -> tuple[list[int], list[int]]:
        tokens = self.windows.get(index)[:self.windows.seq_len]
        rng = np.random.default_rng([self.seed, epoch, index])
        return corrupt(tokens, noise_mask(len(tokens), self.noise_density, self.mean_span, rng), self.sentinels,
                       self.eos)

    def collate(self, indices, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.example(int(i), epoch) for i in indices]
        return (torch.tensor([s for s, _ in pairs], dtype=torch.long),
                torch.tensor([t for _, t in pairs], dtype=torch.long))

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parts = super().next_step()
        return [self.collate(idx, self.epoch) for idx in parts]


# --- {"source","target"} examples ----------------------------------------------------------------

KEYS = (("source", "target"), ("input", "output"))


def seq2seq_fields(record: Record) -> tuple[str, str]:
    """(source, target) text of a record; errors name its file:line and the key at fault."""
    data = record.data
    for src, tgt in KEYS:
        if src in data or tgt in data:
            for key in (src, tgt):
                if key not in data:
                    raise LmforgeError(f"{record.where}: has \"{src if key == tgt else tgt}\" but no \"{key}\" key "
                                       f"(an example is {{\"{src}\": ..., \"{tgt}\": ...}})")
                if not isinstance(data[key], str):
                    raise LmforgeError(f"{record.where}: \"{key}\" must be a string, got "
                                       f"{type(data[key]).__name__}")
            if not data[tgt].strip():
                raise LmforgeError(f"{record.where}: \"{tgt}\" is empty; there is nothing to learn from it")
            return data[src], data[tgt]
    raise LmforgeError(f"{record.where}: no \"source\"/\"target\" (or \"input\"/\"output\") keys; found "
                       f"{', '.join(map(repr, data)) or 'none'}")


def source_ids(tok, text: str, source_len: int = 0) -> list[int]:
    """The encoder input of a source text: the BOS of tokenizers that add one, its tokens cut to leave room,
    and the end-of-text id, as T5 ends its inputs (`generate` encodes a prompt for an encoder-decoder so)."""
    ids = list(getattr(tok, "doc_prefix", [])) + (tok.encode(text) if text else [])
    return (ids[:source_len - 1] if source_len else ids) + [tok.eot_id]


def encode_seq2seq(tok, records: Sequence[Record], source_len: int, target_len: int
                   ) -> list[tuple[list[int], list[int]]]:
    """(source ids, target ids) per record; the target is cut to target_len with the end-of-text id last,
    the token that stops generation."""
    out = []
    for r in records:
        src, tgt = seq2seq_fields(r)
        out.append((source_ids(tok, src, source_len), tok.encode(tgt)[:target_len - 1] + [tok.eot_id]))
    return out


def collate_seq2seq(examples: Sequence[tuple[list[int], list[int]]], rows: Sequence[int], pad_id: int
                    ) -> dict[str, torch.Tensor]:
    """Right-padded source ids with their mask, and labels padded with -100 (the loss skips them)."""
    chosen = [examples[int(i)] for i in rows]
    S, T = max(len(s) for s, _ in chosen), max(len(t) for _, t in chosen)
    ids = torch.full((len(chosen), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chosen), S), dtype=torch.bool)
    labels = torch.full((len(chosen), T), IGNORE, dtype=torch.long)
    for b, (s, t) in enumerate(chosen):
        ids[b, :len(s)], mask[b, :len(s)], labels[b, :len(t)] = torch.tensor(s), True, torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Seq2SeqBatches(EpochStream):
    """Seq2seq examples in a seeded order per epoch, padded per micro-batch."""

    what = "examples"

    def __init__(self, examples, pad_id: int, micro_batch: int, accum: int, rank: int, world: int, seed: int):
        super().__init__(micro_batch, accum, rank, world, seed)
        self.examples, self.pad_id = examples, pad_id

    def epoch_items(self, epoch: int) -> np.ndarray:
        return self.order(len(self.examples), epoch)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        return [collate_seq2seq(self.examples, rows, self.pad_id) for rows in super().next_step()]
