"""Continuous batching for `lmforge serve`: one running batch, decoded by one scheduler thread.

Requests (jobs) wait in a bounded queue. Between two decoding steps the scheduler admits waiting jobs
while the batch has rows and cache room for them: each job's prompts are prefilled on their own, exactly
as `generate_samples` prefills them, and its first token is sampled from that prefill; then its rows join
the batch. Every step feeds one token per live row of every job, and each job's rows are sampled with its
own parameters and generator through the engine's `sample_step`, so a request gets the tokens it would
get alone (greedy and seeded sampling alike, up to the float rounding of a wider matrix product). Rows
that finish, and the rows of a client that went away, leave the batch at once.

The batch cache is the model's own cache with one shared write position (`length`), as the engine's
left-padded batches use it: a joining row's keys are copied in right-aligned at the write position,
the columns to their left masked out (`key_mask`), and each row keeps its own RoPE positions. A join
rebuilds the cache at the width the live rows still need (longest history + largest remaining budget),
which also drops columns no row uses any more; a departure is one `select`. The cache's size in
positions, rows x width with its padding, is what `max_cached_tokens` caps: a job joins only when the
rebuilt cache would stay within it, else it waits.

Decoders whose cache cannot be re-aligned this way run one job at a time (`batch_refusal` says why):
sliding-window layers keep a ring of slots addressed by the shared write position. `max_batch=1`
chooses that one-at-a-time path for every model.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.infer.decode import decode_step
from lmforge.infer.engine import (
    Completion,
    Sample,
    TextStream,
    check_prompts,
    complete_ids,
    context_length,
    default_stop_ids,
    make_generator,
    prefill_prompts,
    prompt_scores,
    sample_step,
)
from lmforge.infer.sampling import SamplingParams
from lmforge.model.mla import LatentCache


class Busy(Exception):
    """The waiting queue is full; retry after `retry_after` seconds (the server answers 429)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Job:
    """One request: its prompts (one per choice), sampling parameters and what to score.

    The scheduler reports on `events`: ("text", choice, delta) while generating when `stream` is
    set, then ("done", [Completion]) or ("error", exception). `cancel()` (the client went away) drops
    its rows.
    """

    prompts: list[list[int]]
    params: SamplingParams
    top_logprobs: int | None = None
    score_prompt: bool = False
    stream: bool = False
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    def budgets(self, context: int) -> list[int]:
        """New tokens each choice may get: max_new_tokens, cut to what its context leaves."""
        return [max(0, min(self.params.max_new_tokens, context - len(p))) for p in self.prompts]

    def positions(self, context: int) -> int:
        """Cache positions the job needs on its own: rows x (longest prompt + largest budget)."""
        return len(self.prompts) * (max(len(p) for p in self.prompts) + max(self.budgets(context)))


def batch_refusal(model: nn.Module) -> str | None:
    """Why `model` cannot join the continuous batch (None: it can)."""
    if getattr(model, "is_encoder_decoder", False):
        return ("an encoder-decoder (model.arch=t5) decodes against each request's own encoder output, which "
                "the shared decoder cache does not hold")
    if model.cfg.sliding_window:
        return ("sliding-window layers (model.sliding_window) keep a ring cache whose slots follow the shared "
                "write position, so rows cannot be re-aligned in it")
    if model.cfg.sparse_block:
        return ("block-sparse layers (model.sparse_block) cut their blocks at each row's token positions, which "
                "the shared write position of the batch does not keep")
    return None


@dataclass
class _Row:
    """One choice of a running job: its sample so far and its place in the cache."""

    choice: int
    prompt_len: int
    budget: int
    sample: Sample
    stream: TextStream
    last: int = -1  # the latest sampled token, fed at the next step

    @property
    def used(self) -> int:
        """Cache columns its history fills: the prompt and every token fed so far."""
        return self.prompt_len + len(self.sample.tokens) - 1

    @property
    def remaining(self) -> int:
        """Cache writes it may still need (one per token fed)."""
        return self.budget - len(self.sample.tokens)


@dataclass
class _Active:
    """A job in the batch: its rows (live ones in choice order), generator and seen-token mask."""

    job: Job
    rows: list[_Row]
    live: list[_Row]
    generator: torch.Generator | None
    seen: torch.Tensor | None
    prompt_scores: list | None


def _buffers(cache) -> list[tuple[str, int]]:
    """(attribute, sequence dimension) of a cache's per-layer tensors."""
    return [("c", 1)] if isinstance(cache, LatentCache) else [("k", 2), ("v", 2)]


def _copy_rows(dst, src, dst_rows: list[int], src_rows: list[int]) -> None:
    """Copy rows of `src` into `dst`, shifted so that src's write position lands on dst's.

    Every row's history is contiguous and ends at the write position, so one shift serves all rows of
    a source; columns shifted out on the left are ones no row uses (their rows have left the batch).
    """
    d = dst.length - src.length
    lo = max(0, -d)
    n = src.length - lo
    di = torch.tensor(dst_rows, device=dst.key_mask.device)
    si = torch.tensor(src_rows, device=dst.key_mask.device)
    dst.key_mask[di, lo + d:lo + d + n] = src.key_mask[si, lo:lo + n]
    for name, dim in _buffers(dst):
        for out, inp in zip(getattr(dst, name), getattr(src, name)):
            out.narrow(dim, lo + d, n).index_copy_(0, di, inp.narrow(dim, lo, n).index_select(0, si))


class Scheduler:
    """Owns the model: runs jobs from a bounded queue, batched continuously or one at a time."""

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 16, max_waiting: int = 64,
                 max_cached_tokens: int = 65536):
        from lmforge.checkpoint import unwrap

        if max_batch < 1:
            raise LmforgeError(f"serve.max_batch must be at least 1, got {max_batch}")
        if max_waiting < 1:
            raise LmforgeError(f"serve.max_waiting must be at least 1, got {max_waiting}")
        self.model = unwrap(model)
        self.tokenizer = tokenizer
        self.context = context_length(self.model)
        if max_cached_tokens < self.context:
            raise LmforgeError(f"serve.max_cached_tokens={max_cached_tokens} is below the model's context of "
                               f"{self.context} tokens: one full-length request could never run")
        self.max_batch, self.max_waiting, self.max_cached_tokens = max_batch, max_waiting, max_cached_tokens
        self.refusal = batch_refusal(self.model)
        self.batched = max_batch > 1 and self.refusal is None
        self.stop_ids = default_stop_ids(tokenizer)
        self.vocab_limit = tokenizer.vocab_size
        self.device = next(self.model.parameters()).device
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.cache = None
        self.rows: list[_Row] = []  # in cache order
        self.owner: dict[int, _Active] = {}  # id(row) -> its job
        self.active: list[_Active] = []
        self.alone: Job | None = None  # the job running on the one-at-a-time path
        self.finished: deque[float] = deque(maxlen=256)  # completion times, for Retry-After
        self.peak_cached = 0  # the largest cache the batch has held, in positions
        self.thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)

    def start(self) -> Scheduler:
        self.thread.start()
        return self

    # --- the request side (handler threads) --------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue a job; Busy when the queue is full, LmforgeError when it could never fit the cache."""
        need = job.positions(self.context)
        if need > self.max_cached_tokens:
            raise LmforgeError(f"this request needs {need} cache positions (choices x (prompt + max_tokens)); "
                               f"the server holds at most {self.max_cached_tokens} (serve.max_cached_tokens): "
                               "ask for fewer tokens or choices")
        with self.cond:
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"{len(self.waiting)} requests are waiting (serve.max_waiting); retry later",
                           self.retry_after())
            self.waiting.append(job)
            self.cond.notify()
        return job

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on: waiting jobs over the recent completion rate."""
        now = time.monotonic()
        recent = [t for t in self.finished if now - t < 60]
        if len(recent) < 2:
            return 1
        rate = len(recent) / max(now - recent[0], 1e-3)
        return int(min(60, max(1, math.ceil(len(self.waiting) / rate))))

    def stats(self) -> dict:
        with self.cond:
            alone = self.alone
            return {"waiting": len(self.waiting), "running_rows": len(self.rows) + (len(alone.prompts) if alone else 0),
                    "cached_tokens": self._cached(), "peak_cached_tokens": self.peak_cached}

    def _cached(self) -> int:
        return 0 if self.cache is None or not self.rows else len(self.rows) * self.cache.key_mask.shape[1]

    # --- the scheduler thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                self._step() if self.batched else self._run_alone(self._next_job())
            except Exception as e:  # a bug: fail what was running, keep serving
                traceback.print_exc(file=sys.stderr)
                for act in self.active:
                    act.job.events.put(("error", e))
                with self.cond:
                    self.active, self.rows, self.owner, self.cache = [], [], {}, None

    def _next_job(self) -> Job:
        with self.cond:
            while not self.waiting:
                self.cond.wait()
            return self.waiting.popleft()

    @torch.inference_mode()
    def _run_alone(self, job: Job) -> None:
        """The one-request-at-a-time path: the engine's own batch for this job's choices."""
        if job.cancelled:
            return
        self.alone = job
        try:
            out = complete_ids(self.model, self.tokenizer, job.prompts, job.params,
                               on_text=(lambda row, text: job.events.put(("text", row, text))) if job.stream else None,
                               on_token=lambda row, token: job.cancelled, top_logprobs=job.top_logprobs,
                               score_prompt=job.score_prompt)
        except Exception as e:
            job.events.put(("error", e))
            return
        finally:
            self.alone = None
        self.finished.append(time.monotonic())
        job.events.put(("done", out))

    @torch.inference_mode()
    def _step(self) -> None:
        """Drop cancelled rows, admit what fits, then one decoding step for the whole batch."""
        self._drop([r for r in self.rows if self.owner[id(r)].job.cancelled])
        joining = self._admit()
        if joining:
            self._rebuild(joining)
        if not self.rows:
            with self.cond:
                while not self.waiting:
                    self.cond.wait()
            return
        ids = torch.tensor([[r.last] for r in self.rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.used] for r in self.rows], dtype=torch.long, device=self.device)
        logits = decode_step(self.model)(ids, pos, self.cache)
        at = {id(r): i for i, r in enumerate(self.rows)}
        done: list[_Row] = []
        for act in list(self.active):
            if len(self.active) == 1 and len(act.live) == len(self.rows):  # its rows are the batch, in order
                done += self._advance(act, logits)
                continue
            index = torch.tensor([at[id(r)] for r in act.live], device=self.device)
            done += self._advance(act, logits[index])
        self._drop(done)

    def _admit(self) -> list[tuple[object, list[_Row]]]:
        """Start the waiting jobs that fit, in order: [(prefill cache, its live rows)]."""
        joining: list[tuple[object, list[_Row]]] = []
        while True:
            with self.cond:
                while self.waiting and self.waiting[0].cancelled:
                    self.waiting.popleft()
                if not self.waiting:
                    return joining
                job = self.waiting[0]
                if not self._fits(job, [r for _, rows in joining for r in rows]):
                    return joining
                self.waiting.popleft()
            try:
                started = self._start(job)
            except Exception as e:  # e.g. a prompt the engine refuses: this job's error only
                job.events.put(("error", e))
                continue
            if started is not None:
                joining.append(started)

    def _fits(self, job: Job, pending: list[_Row]) -> bool:
        rows = self.rows + pending
        if not rows:
            return True  # submit() checked that the job fits on its own
        if len(rows) + len(job.prompts) > self.max_batch:
            return False
        width = (max([r.used for r in rows] + [len(p) for p in job.prompts])
                 + max([r.remaining for r in rows] + job.budgets(self.context)))
        return (len(rows) + len(job.prompts)) * width <= self.max_cached_tokens

    def _start(self, job: Job) -> tuple[object, list[_Row]] | None:
        """Prefill a job, sample its first tokens; its rows that go on, with the cache holding them."""
        params = job.params
        params.check()
        if params.max_new_tokens == 0:  # only scored: one forward, nothing joins the batch
            self._run_alone(job)
            return None
        check_prompts(self.model, job.prompts)
        budgets = job.budgets(self.context)
        L = max(len(p) for p in job.prompts)
        cache, first, prompt_logits, seen = prefill_prompts(self.model, job.prompts, L + 1,
                                                            params.repetition_penalty != 1.0, job.score_prompt)
        scores = (prompt_scores(prompt_logits, job.prompts, job.top_logprobs, self.vocab_limit)
                  if job.score_prompt else None)
        del prompt_logits
        rows = [_Row(i, len(p), b, Sample([], "length", None, [] if job.top_logprobs is not None else None),
                     TextStream(self.tokenizer, params.stop, self.stop_ids))
                for i, (p, b) in enumerate(zip(job.prompts, budgets))]
        act = _Active(job, rows, list(rows), make_generator(params, self.device), seen, scores)
        self.active.append(act)
        ended = {id(r) for r in self._advance(act, first)}
        live = [r for r in rows if id(r) not in ended]
        for r in live:
            self.owner[id(r)] = act
        return (cache, live) if live else None

    def _advance(self, act: _Active, logits: torch.Tensor) -> list[_Row]:
        """Sample the job's live rows from their logits, as `generate_samples` does; the rows that ended."""
        job = act.job
        nxt, _, scores = sample_step(logits, job.params, act.seen, act.generator,
                                     vocab_limit=self.vocab_limit, top_logprobs=job.top_logprobs)
        tokens = nxt.tolist()
        ended, keep = [], []
        for j, row in enumerate(act.live):
            t, s = tokens[j], row.sample
            s.tokens.append(t)
            if scores is not None:
                s.scores.append(scores[j])
            finished = t in self.stop_ids or len(s.tokens) >= row.budget
            if t in self.stop_ids:
                s.finish_reason = "stop"
            delta, stopped = row.stream.push(t)
            if delta and job.stream:
                job.events.put(("text", row.choice, delta))
            if (stopped or job.cancelled) and not finished:
                s.finish_reason, finished = "stop", True
            row.last = t
            if finished:
                ended.append(row)
            else:
                keep.append(j)
        if ended:
            act.live = [act.live[j] for j in keep]
            if act.seen is not None:
                act.seen = act.seen[torch.tensor(keep, dtype=torch.long, device=self.device)]
                nxt = nxt[torch.tensor(keep, dtype=torch.long, device=self.device)]
        if act.seen is not None and act.live:
            act.seen[torch.arange(len(act.live), device=self.device), nxt] = True
        if not act.live:
            self._finish(act)
        return ended

    def _finish(self, act: _Active) -> None:
        """Hand the job its completions, as `complete_ids` builds them."""
        self.active.remove(act)
        out = []
        for row, prompt in zip(act.rows, act.job.prompts):
            delta = row.stream.finish()
            if delta and act.job.stream:
                act.job.events.put(("text", row.choice, delta))
            s = row.sample
            out.append(Completion(row.stream.text, s.finish_reason, len(prompt), len(s.tokens), s.tokens, s.scores,
                                  act.prompt_scores[row.choice] if act.prompt_scores is not None else None))
        self.finished.append(time.monotonic())
        act.job.events.put(("done", out))

    def _drop(self, rows: Sequence[_Row]) -> None:
        """Take rows out of the batch (finished, or their client went away)."""
        if not rows:
            return
        gone = {id(r) for r in rows}
        for act in {id(self.owner[g]): self.owner[g] for g in gone if g in self.owner}.values():
            if act.job.cancelled and act in self.active:
                self.active.remove(act)  # nobody is listening: no completion to build
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        with self.cond:
            for g in gone:
                self.owner.pop(g, None)
            self.rows = [self.rows[i] for i in keep]
            if not self.rows:
                self.cache = None
            elif len(keep) < self.cache.key_mask.shape[0]:
                self.cache.select(torch.tensor(keep, dtype=torch.long, device=self.device))

    def _rebuild(self, joining: list[tuple[object, list[_Row]]]) -> None:
        """A new batch cache holding the live rows and the joining ones, as narrow as they allow."""
        rows = self.rows + [r for _, live in joining for r in live]
        S = max(r.used for r in rows)
        width = S + max(r.remaining for r in rows)
        new = self.model.new_cache(len(rows), width)
        new.length, new.has_padding = S, True
        new.key_mask[:, :S] = False
        sources = ([(self.cache, list(range(len(self.rows))))] if self.rows else []) + \
            [(cache, [r.choice for r in live]) for cache, live in joining]
        for name, dim in _buffers(new):  # allocate each layer's buffer like the first source's
            first = getattr(sources[0][0], name)
            shapes = [list(t.shape) for t in first]
            for shape in shapes:
                shape[0], shape[dim] = len(rows), width
            setattr(new, name, [t.new_zeros(shape) for t, shape in zip(first, shapes)])
        at = 0
        for cache, src_rows in sources:
            _copy_rows(new, cache, list(range(at, at + len(src_rows))), src_rows)
            at += len(src_rows)
        with self.cond:
            self.rows, self.cache = rows, new
            self.peak_cached = max(self.peak_cached, len(rows) * width)
