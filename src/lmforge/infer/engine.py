"""Batched generation with a preallocated KV cache: the one sampler lmforge uses everywhere.

Training-time samples, `lmforge generate`, chat, the HTTP server and GRPO rollouts all call
`generate_samples` (or its thin wrappers), so a sampling fix is made once.

How a batch runs:
- Prompts of different lengths are left-padded into one (B, L) prefill. Padding keys are masked
  out (`cache.key_mask`), and every row gets its own `positions`, so each sequence's RoPE positions
  start at 0 exactly as if it ran alone. (A padding query attends to nothing; SDPA returns zeros for
  such fully masked rows, and no real token ever looks at them.)
- Each decode step feeds one token per live row. A row stops at a stop id (which is kept as its
  last token: GRPO needs its log-probability), at its token budget, or when `on_token` asks. Finished
  rows are dropped from the cache (`KVCache.select`), so they cost nothing afterwards.

Context length: a prompt that leaves no room in the model's context (len >= max_seq_len) is a
LmforgeError. Otherwise a row's new tokens are truncated to fit the context
(`min(max_new_tokens, max_seq_len - len(prompt))`) and the row finishes with reason "length".

Log-probabilities for clients (`top_logprobs`, `score_prompt`; the server's `logprobs` / `echo`)
are the model's own: log_softmax over its whole output layer at temperature 1, before any sampling
filter, i.e. exactly what a plain forward pass and the training loss compute. Prompt tokens are
scored from the prefill's logits, so scoring a prompt costs no extra forward pass.

The text layer (`generate`, `complete`) decodes incrementally: it emits only whole characters (a
multi-byte UTF-8 character split across tokens is held back until complete) and never emits text
that could still turn out to be the start of a stop string.

Each decoding step (and a short prompt's prefill) goes through infer/decode.py: a packed step for
plain dense decoders, the model's forward for everything else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from lmforge.data.spans import source_ids
from lmforge.errors import LmforgeError
from lmforge.infer.decode import PREFILL_ROWS, decode_step, packed_step
from lmforge.infer.sampling import SamplingParams, sample_next

if TYPE_CHECKING:
    from lmforge.model.mla import LatentCache
    from lmforge.model.transformer import KVCache

# on_token(row, token_id) -> True to finish that row now (None/False: go on).
OnToken = Callable[[int, int], "bool | None"]
# on_text(row, text_delta): whole characters only, never part of a stop string.
OnText = Callable[[int, str], None]


@dataclass
class TokenScore:
    """A token's log-probability under the model and the `top` most likely tokens at its position
    (most likely first), as (id, log-probability) pairs; only real tokenizer ids are candidates."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sample:
    """One row's result: the new tokens (a final stop id included) and why it ended."""

    tokens: list[int]
    finish_reason: str  # "stop" (stop id / stop string / callback) or "length" (budget or context)
    logprobs: list[float] | None = None  # log p(token) under softmax(logits / T), T=1 when greedy
    scores: list[TokenScore] | None = None  # per new token, with top_logprobs
    prompt_scores: list[TokenScore | None] | None = None  # per prompt token (None for the first), with score_prompt


def context_length(model: nn.Module) -> int:
    return int(model.cfg.max_seq_len)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(int(params.seed))


def check_prompts(model: nn.Module, prompts: Sequence[Sequence[int]], room: int = 1) -> None:
    """LmforgeError for an empty prompt or one that leaves fewer than `room` positions free
    (room=0: a prompt that is only scored may fill the context)."""
    ctx = context_length(model)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise LmforgeError(f"prompt {i} is empty: give at least one token (e.g. <|endoftext|>)")
        if len(p) > ctx - room:
            what = "which leaves no room in" if room else "more than"
            raise LmforgeError(f"prompt {i} has {len(p)} tokens, {what} the model's "
                               f"context of {ctx} tokens (model.max_seq_len); shorten it")


def score_logits(logits: torch.Tensor, targets: torch.Tensor, top: int = 0, vocab_limit: int | None = None,
                 chunk: int = 256) -> list[TokenScore]:
    """The TokenScore of each targets[i] under logits[i] ((T, V) and (T,)).

    log_softmax runs over the whole vocabulary, in chunks of rows so a long prompt never needs a
    (T, V) fp32 copy at once; `top` alternatives come from ids below vocab_limit (the model's
    vocabulary is padded past the tokenizer's, and padding ids decode to nothing).
    """
    out: list[TokenScore] = []
    for s in range(0, targets.shape[0], chunk):
        lsm = logits[s:s + chunk].float().log_softmax(-1)
        tgt = targets[s:s + chunk]
        lps = lsm.gather(1, tgt.unsqueeze(1)).squeeze(1).tolist()
        if top > 0:
            values, ids = lsm[:, :vocab_limit].topk(min(top, lsm[:, :vocab_limit].shape[-1]), dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            tops = [[] for _ in lps]
        out += [TokenScore(t, lp, alt) for t, lp, alt in zip(tgt.tolist(), lps, tops)]
    return out


def prefill_prompts(model: nn.Module, prompts: Sequence[Sequence[int]], max_len: int, track_seen: bool,
                    score_prompt: bool = False
                    ) -> tuple[KVCache | LatentCache, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Left-pad the prompts into one (B, L) forward: (a cache of max_len positions holding them, the last
    position's logits (B, V), with score_prompt the other positions' (B, L - 1, V) else None, the (B, V)
    seen-token mask for the repetition penalty when track_seen).

    The output layer runs over the prompt positions only when they are scored: over every position
    it was about a third of a short prompt's prefill. The last position's logits are computed on
    their own either way, so scoring a prompt never changes what is sampled after it.
    Padding repeats each row's first token: any id works under the mask, and this one keeps the
    repetition-penalty mask exact. Every row's positions start at 0, as if it ran alone.
    """
    device = _device_of(model)
    B, L = len(prompts), max(len(p) for p in prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.tensor([[p[0]] * (L - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    pads = L - lens
    cols = torch.arange(L, device=device).unsqueeze(0)
    positions = (cols - pads.unsqueeze(1)).clamp(min=0)
    cache = model.new_cache(B, max_len)
    if bool((pads > 0).any()):
        cache.key_mask[:, :L] = cols >= pads.unsqueeze(1)
        cache.has_padding = True
    seen = None
    if track_seen:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
    packed = None if B * L > PREFILL_ROWS else packed_step(model)
    if packed is not None:  # a short prompt: the packed step's fewer calls (infer/decode.py)
        scores: list = []
        last = packed.step(ids, positions, cache, scores if score_prompt else None)
        prompt = (scores[0] if scores else last.new_empty(B, 0, last.shape[-1])) if score_prompt else None
        return cache, last, prompt, seen  # (a one-token prompt has no other positions to score)
    if any(type(p) not in (torch.Tensor, nn.Parameter) for p in model.parameters()):
        # Sharded weights (tensor parallel, FSDP): only the forward hands back whole logits.
        logits = model(ids, positions=positions, cache=cache)
        return cache, logits[:, -1], logits[:, :-1] if score_prompt else None, seen
    hidden = model(ids, positions=positions, cache=cache, return_hidden=True)
    prompt = model.logits(hidden[:, :-1]) if score_prompt else None
    return cache, model.logits(hidden[:, -1]), prompt, seen


def prompt_scores(prompt_logits: torch.Tensor, prompts: Sequence[Sequence[int]], top_logprobs: int | None,
                  vocab_limit: int | None) -> list[list[TokenScore | None]]:
    """Each prompt token's TokenScore but the first's (None) from the left-padded prefill's logits at
    every position but the last ((B, L - 1, V)): the logits at column c predict the token at column c + 1."""
    L = prompt_logits.shape[1] + 1
    out = []
    for b, p in enumerate(prompts):
        pad = L - len(p)
        targets = torch.tensor(list(p[1:]), dtype=torch.long, device=prompt_logits.device)
        out.append([None, *score_logits(prompt_logits[b, pad:], targets, top_logprobs or 0, vocab_limit)])
    return out


def sample_step(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                generator: torch.Generator | None, *, logprobs: bool = False, vocab_limit: int | None = None,
                top_logprobs: int | None = None) -> tuple[torch.Tensor, list[float] | None, list[TokenScore] | None]:
    """One decoding step's choice for the (B, V) logits of one request's live rows: (next ids, their
    log-probabilities when asked, their TokenScores when top_logprobs is set).

    Shared by `generate_samples` and the server's continuous batch (infer/batching.py): a request's rows
    go through exactly these operations, with its own generator, whichever path runs it, so both give
    the same tokens for the same logits. `logits` is modified in place (the vocabulary mask).
    """
    raw = logits.clone() if top_logprobs is not None else None  # before the vocabulary mask
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    nxt = sample_next(logits, params, seen, generator)
    scores = score_logits(raw, nxt, top_logprobs, vocab_limit) if raw is not None else None
    lp = None
    if logprobs:
        scaled = logits.float() / (params.temperature if not params.greedy else 1.0)
        lp = scaled.log_softmax(-1).gather(1, nxt.unsqueeze(1)).squeeze(1).tolist()
    return nxt, lp, scores


@torch.inference_mode()
def generate_samples(model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                     stop_ids: set[int] | frozenset[int] = frozenset(),
                     generator: torch.Generator | None = None, on_token: OnToken | None = None,
                     logprobs: bool = False, vocab_limit: int | None = None, top_logprobs: int | None = None,
                     score_prompt: bool = False, repeats: int = 1) -> list[Sample]:
    """Sample continuations for a batch of token-id prompts.

    model: a Transformer in eval mode (DDP / torch.compile wrappers are unwrapped here).
    vocab_limit: only ids below it are ever sampled (the model's vocabulary is padded past the
    tokenizer's; a trained model never picks those ids, a random one might).
    top_logprobs: k >= 0 records each new token's TokenScore (with k alternatives) in Sample.scores.
    score_prompt: also score every prompt token but the first (Sample.prompt_scores, with
    top_logprobs alternatives). With max_new_tokens=0 the prompts are only scored, and may then
    fill the whole context.
    repeats: sample each prompt this many times (GRPO's group) from one prefill: the prompt's cache
    rows and last logits are copied for its repeats. The rows come out prompt-major, as for the
    prompts each listed `repeats` times, and they draw from the generator in the same order, so
    the result is the same as that longer list's (up to the float rounding of a narrower prefill).
    """
    from lmforge.checkpoint import unwrap

    model = unwrap(model)
    params.check()
    ctx = context_length(model)
    if not prompts:
        return []
    if getattr(model, "is_encoder_decoder", False):
        if score_prompt or params.max_new_tokens == 0:
            raise LmforgeError("scoring prompt tokens is for decoder-only models: an encoder-decoder's prompt is "
                               "its encoder input, which it does not predict")
        return _generate_encoder_decoder(model, prompts, params, stop_ids, generator, on_token, logprobs,
                                         vocab_limit, top_logprobs)
    score_only = params.max_new_tokens == 0
    check_prompts(model, prompts, room=0 if score_only else 1)
    if repeats < 1:
        raise LmforgeError(f"repeats must be >= 1, got {repeats}")
    unique, prompts = prompts, [p for p in prompts for _ in range(repeats)]
    device = _device_of(model)
    if generator is None:
        generator = make_generator(params, device)
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    budgets = torch.clamp(ctx - lens, max=params.max_new_tokens)
    results = [Sample([], "length", [] if logprobs else None, [] if top_logprobs is not None else None)
               for _ in range(B)]
    if score_only and not score_prompt:
        return results
    L = int(lens.max())
    steps = int(budgets.max())

    cache, logits, prompt_logits, seen = prefill_prompts(model, unique, L + steps, params.repetition_penalty != 1.0,
                                                         score_prompt)
    if score_prompt:
        for b, scores in enumerate(prompt_scores(prompt_logits, unique, top_logprobs, vocab_limit)):
            for r in range(repeats):
                results[b * repeats + r].prompt_scores = list(scores)
    if steps == 0:
        return results
    del prompt_logits
    if repeats > 1:  # each prompt's rows, copied for its repeats
        index = torch.arange(len(unique), device=device).repeat_interleave(repeats)
        cache.select(index)
        logits = logits[index]
        seen = seen[index] if seen is not None else None
    decode = decode_step(model)
    rows = list(range(B))  # original row of each live batch entry
    budget, live_lens = budgets.tolist(), lens  # per original row; per live row
    for step in range(steps):
        nxt, lp, step_scores = sample_step(logits, params, seen, generator, logprobs=logprobs,
                                           vocab_limit=vocab_limit, top_logprobs=top_logprobs)
        tokens = nxt.tolist()  # the step's one device sync; the stop checks below are plain Python
        done = [t in stop_ids or step + 1 >= budget[r] for t, r in zip(tokens, rows)]
        _record_step(results, rows, tokens, lp, step_scores, stop_ids, on_token, done)
        keep = [j for j, d in enumerate(done) if not d]
        if not keep:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.select(index)
            rows, nxt, live_lens = [rows[j] for j in keep], nxt[index], live_lens[index]
            seen = seen[index] if seen is not None else None
        if seen is not None:
            seen[torch.arange(len(rows), device=device), nxt] = True
        logits = decode(nxt.unsqueeze(1), (live_lens + step).unsqueeze(1), cache)
    return results


def _record_step(results: list[Sample], rows: list[int], tokens: list[int], lp: list[float] | None,
                 step_scores: list[TokenScore] | None, stop_ids, on_token: OnToken | None,
                 done: list[bool]) -> None:
    """Append one decoding step's token (and log-prob, scores) to each live row's Sample; a stop id, or
    `on_token` asking to stop, ends the row (`done` is updated in place)."""
    for j, r in enumerate(rows):
        res = results[r]
        res.tokens.append(tokens[j])
        if lp is not None:
            res.logprobs.append(lp[j])
        if step_scores is not None:
            res.scores.append(step_scores[j])
        if tokens[j] in stop_ids:
            res.finish_reason = "stop"
        if on_token is not None and on_token(r, tokens[j]) and not done[j]:
            res.finish_reason = "stop"
            done[j] = True


def _generate_encoder_decoder(model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams,
                              stop_ids, generator, on_token, logprobs: bool, vocab_limit: int | None,
                              top_logprobs: int | None) -> list[Sample]:
    """An encoder-decoder's samples: the prompts are encoded once (right-padded, masked), then the decoder
    runs one token at a time from its start id against a T5Cache (its own keys/values so far, and the
    encoder output's cross-attention keys/values computed at the first step)."""
    check_prompts(model, prompts, room=0)
    device = _device_of(model)
    if generator is None:
        generator = make_generator(params, device)
    B, S = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, S), model.cfg.decoder_start_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, S), dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(list(p), device=device)
        mask[b, :len(p)] = True
    enc = model.encode(ids, mask)
    cache = model.new_cache()
    vocab = model.cfg.vocab_size
    steps = min(params.max_new_tokens, context_length(model))
    results = [Sample([], "length", [] if logprobs else None, [] if top_logprobs is not None else None)
               for _ in range(B)]
    seen = torch.zeros(B, vocab, dtype=torch.bool, device=device) if params.repetition_penalty != 1.0 else None
    nxt = torch.full((B,), model.cfg.decoder_start_id, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    for step in range(steps):
        logits = model.logits(model.decode(nxt.unsqueeze(1), enc, mask, cache))[:, -1].float()
        nxt, lp, step_scores = sample_step(logits, params, seen, generator, logprobs=logprobs,
                                           vocab_limit=vocab_limit, top_logprobs=top_logprobs)
        tokens = nxt.tolist()
        done_list = [t in stop_ids or step + 1 >= steps for t in tokens]
        _record_step(results, rows.tolist(), tokens, lp, step_scores, stop_ids, on_token, done_list)
        keep = [j for j, d in enumerate(done_list) if not d]
        if not keep:
            break
        if len(keep) < len(done_list):
            index = torch.tensor(keep, device=device)
            cache.select(index)
            rows, nxt, enc, mask = rows[index], nxt[index], enc[index], mask[index]
            seen = seen[index] if seen is not None else None
        if seen is not None:
            seen[torch.arange(len(rows), device=device), nxt] = True
    return results


def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 stop_ids: set[int] | frozenset[int] = frozenset(), generator: torch.Generator | None = None,
                 on_token: OnToken | None = None, vocab_limit: int | None = None) -> list[list[int]]:
    """New token ids per prompt (a final stop id included); see `generate_samples`."""
    out = generate_samples(model, prompts, params, stop_ids=stop_ids, generator=generator,
                           on_token=on_token, vocab_limit=vocab_limit)
    return [s.tokens for s in out]


def generate_ids_with_logprobs(model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                               stop_ids: set[int] | frozenset[int] = frozenset(),
                               generator: torch.Generator | None = None, vocab_limit: int | None = None
                               ) -> tuple[list[list[int]], list[list[float]]]:
    """(tokens, log-probabilities of each sampled token under softmax(logits / temperature))."""
    out = generate_samples(model, prompts, params, stop_ids=stop_ids, generator=generator,
                           logprobs=True, vocab_limit=vocab_limit)
    return [s.tokens for s in out], [s.logprobs or [] for s in out]


# --- text level -------------------------------------------------------------------------------

def default_stop_ids(tokenizer) -> set[int]:
    """End of text and end of a chat turn both end a generation."""
    ids = {tokenizer.eot_id}
    if getattr(tokenizer, "im_end_id", None) is not None:
        ids.add(tokenizer.im_end_id)
    return ids


class TextStream:
    """Turns one row's tokens into text deltas: whole characters, cut at the first stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stop_ids = stop_ids
        self.tokens: list[int] = []
        self.emitted = ""  # text already handed out
        self.final: str | None = None  # set once a stop string was found

    def _text(self) -> str:
        return self.tokenizer.decode([t for t in self.tokens if t not in self.stop_ids])

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text to emit, whether a stop string ended the row)."""
        if self.final is not None:
            return "", True
        self.tokens.append(token)
        text = self._text()
        start = max(0, len(self.emitted) - max((len(s) for s in self.stop), default=0))
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.final = text[:cut]
            return self._advance(self.final), True
        safe = len(text)
        while safe > 0 and text[safe - 1] == "\ufffd" and len(text) - safe < 4:
            safe -= 1  # an unfinished multi-byte character decodes as U+FFFD: wait for its bytes
        safe -= self._held_for_stop(text[:safe])
        return self._advance(text[:max(safe, len(self.emitted))]), False

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _advance(self, upto: str) -> str:
        delta = upto[len(self.emitted):] if upto.startswith(self.emitted) else ""
        if delta:
            self.emitted = upto
        return delta

    def finish(self) -> str:
        """Emit whatever was held back (the row has ended); returns the last delta."""
        return self._advance(self.final if self.final is not None else self._text())

    @property
    def text(self) -> str:
        return self.final if self.final is not None else self._text()


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    tokens: list[int] = field(default_factory=list)  # the new ids, a final stop id included
    scores: list[TokenScore] | None = None  # per new token, with top_logprobs
    prompt_scores: list[TokenScore | None] | None = None  # per prompt token, with score_prompt


def complete_ids(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 on_text: OnText | None = None, stop_ids: set[int] | None = None,
                 on_token: OnToken | None = None, top_logprobs: int | None = None,
                 score_prompt: bool = False) -> list[Completion]:
    """Text completions of token-id prompts, with stop strings and streaming deltas (and, when
    asked, log-probabilities of the new and the prompt tokens: see `generate_samples`)."""
    stop_ids = default_stop_ids(tokenizer) if stop_ids is None else stop_ids
    streams = [TextStream(tokenizer, params.stop, stop_ids) for _ in prompts]

    def token_cb(row: int, token: int) -> bool:
        delta, stopped = streams[row].push(token)
        if delta and on_text is not None:
            on_text(row, delta)
        if on_token is not None and on_token(row, token):
            stopped = True
        return stopped

    samples = generate_samples(model, prompts, params, stop_ids=stop_ids, on_token=token_cb,
                               vocab_limit=tokenizer.vocab_size, top_logprobs=top_logprobs,
                               score_prompt=score_prompt)
    out = []
    for row, (s, stream) in enumerate(zip(samples, streams)):
        delta = stream.finish()
        if delta and on_text is not None:
            on_text(row, delta)
        out.append(Completion(stream.text, s.finish_reason, len(prompts[row]), len(s.tokens), s.tokens,
                              s.scores, s.prompt_scores))
    return out


def encode_prompt(tokenizer, text: str, encoder: bool = False) -> list[int]:
    """A prompt starts as training documents do: with the BOS of tokenizers that add one (Llama-style).

    Not twice: a prompt decoded from training data already starts with it. Without a BOS, an empty
    prompt starts from the end-of-text token every training document follows. encoder=True: the source
    of an encoder-decoder, which ends with the end-of-text token, as T5 ends its inputs (and
    lmforge.data.spans.source_ids encodes training sources).
    """
    if encoder:
        return source_ids(tokenizer, text)
    prefix = list(getattr(tokenizer, "doc_prefix", []))
    ids = tokenizer.encode(text) if text else []
    if ids[:len(prefix)] == prefix:
        prefix = []
    return prefix + ids or [tokenizer.eot_id]


def is_encoder_decoder(model: nn.Module) -> bool:
    from lmforge.checkpoint import unwrap

    return bool(getattr(unwrap(model), "is_encoder_decoder", False))


def complete(model: nn.Module, tokenizer, prompts: Sequence[str], params: SamplingParams,
             on_text: OnText | None = None) -> list[Completion]:
    encoder = is_encoder_decoder(model)
    return complete_ids(model, tokenizer, [encode_prompt(tokenizer, p, encoder) for p in prompts], params, on_text)


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], params: SamplingParams,
             on_text: OnText | None = None) -> list[str]:
    """Completion text per prompt (prompt not repeated), cut before the first stop string."""
    return [c.text for c in complete(model, tokenizer, prompts, params, on_text)]
