"""The objective interface every training stage plugs into, and the language-modelling objective.

The loop (train/loop.py) owns everything an objective does not: devices, precision, DDP,
accumulation, clipping, the optimizer, schedules, checkpoints, logging. An objective only says
where its batches come from, what one batch's loss is, and how to evaluate.

Losses are returned as sums with a count (tokens, pairs, sequences...). The loop divides by the
count of the whole global batch, so accumulation steps and ranks with uneven token counts are
weighted correctly (1 x accum 8 equals 8 x accum 1).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.data.loader import LMBatches, MixtureBatches, TokenWindows
from lmforge.train.context import SequenceSplit


class Objective:
    """Base class: subclasses implement `next_batches`, `count`, `loss`; the rest is optional."""

    name = "objective"
    # Context parallel (set by the trainer before setup): this rank's part of every sequence. Only the
    # objectives that cut their sequences by it are trained under parallel.cp (parallelize.check_supported).
    split: SequenceSplit | None = None

    def setup(self, model: nn.Module, device: torch.device, rank: int, world: int, accum: int) -> None:
        """Called once by the loop before training (e.g. to build a reference model)."""

    def next_batches(self, model: nn.Module) -> list:
        """This rank's micro-batches for one optimizer step (already on the device)."""
        raise NotImplementedError

    def count(self, batch) -> float:
        """How many units the batch's loss sums over."""
        raise NotImplementedError

    def tokens(self, batch) -> float:
        """Tokens the batch's forward pass really processes, padding left out: tokens/s and MFU count
        these. The default counts every position of the input ids."""
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        return float(ids.numel())

    def generated_tokens(self) -> float:
        """Tokens sampled since the last call (GRPO's rollouts); 0 for objectives that do not generate."""
        return 0.0

    def loss(self, model: nn.Module, batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss summed over units, metrics summed over the same units)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}

    def data_metrics(self) -> dict[str, float]:
        """Figures about the data read so far, added to every metrics row (a mixture's tokens per source)."""
        return {}

    # The data position, for bit-exact resume. An objective that reads through a resumable
    # `self.stream` (built in setup()) needs nothing more: a state loaded before setup() waits in
    # `pending`, and setup() applies it to the stream it builds.
    stream = None
    pending: dict | None = None

    def use_stream(self, stream) -> None:
        """Read through `stream` (called from setup()); a state loaded earlier is applied to it now."""
        self.stream = stream
        if self.pending is not None:
            self.load_state_dict(self.pending)

    def state_dict(self) -> dict:
        return self.stream.state_dict() if self.stream is not None else (self.pending or {})

    def load_state_dict(self, state: dict) -> None:
        self.pending = state
        if self.stream is not None:
            self.stream.load_state_dict(state)


class LMObjective(Objective):
    """Next-token prediction on prepared shards (pretraining and continued pretraining)."""

    name = "lm"

    def __init__(self, data_dir: str | Path, seq_len: int, micro_batch: int, seed: int, loss_chunk: int = 0,
                 eval_batches: int = 20, benchmarks=None):
        self.benchmarks = benchmarks  # model -> {bench_<task>: score}, run beside the validation loss
        self.data_dir = Path(data_dir)
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.loss_chunk, self.eval_batches = loss_chunk, eval_batches
        self.train = TokenWindows(self.data_dir / "train", seq_len)
        val_dir = self.data_dir / "val"
        self.val = TokenWindows(val_dir, seq_len) if (val_dir / "manifest.json").is_file() else None
        # A mixture (data/mixture.py): each source's windows apart, for training and for its own val loss.
        self.mixture = self.train.manifest.get("mixture")
        self.source_val: dict[str, TokenWindows] = {}
        if self.mixture and self.val is not None:
            have = {m["name"]: m["tokens"] for m in self.val.manifest.get("mixture", [])}
            self.source_val = {m["name"]: TokenWindows(val_dir, seq_len, source=m["name"])
                               for m in self.mixture if have.get(m["name"], 0) > seq_len}

    def setup(self, model, device, rank, world, accum):
        self.device, self.rank, self.world = device, rank, world
        if self.mixture:
            pools = [TokenWindows(self.train.split_dir, self.seq_len, source=m["name"]) for m in self.mixture]
            self.use_stream(MixtureBatches(pools, [m["name"] for m in self.mixture],
                                           [m["weight"] for m in self.mixture], self.micro_batch, accum,
                                           rank, world, self.seed))
        else:
            self.use_stream(LMBatches(self.train, self.micro_batch, accum, rank, world, self.seed))

    def data_metrics(self) -> dict[str, float]:
        """A mixture's realised mix so far: tokens (and their share) per source, over all ranks."""
        if not isinstance(self.stream, MixtureBatches):
            return {}
        tokens = self.stream.tokens_per_source()
        total = max(sum(tokens.values()), 1)
        return {**{f"mix_tokens_{n}": t for n, t in tokens.items()},
                **{f"mix_share_{n}": t / total for n, t in tokens.items()}}

    def next_batches(self, model):
        """(inputs, labels) micro-batches; under context parallel (inputs, labels, positions) of this rank's
        part of each sequence, so that counts and tokens are this rank's own."""
        batches = [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                   for x, y in self.stream.next_step()]
        return [self.split.cut(x, y) for x, y in batches] if self.split else batches

    def count(self, batch) -> float:
        return float(batch[1].numel())

    def tokens(self, batch) -> float:
        return float(batch[0].numel())  # windows of the token stream: no padding

    def loss(self, model, batch):
        x, y = batch[:2]
        positions = batch[2] if len(batch) > 2 else None
        loss = model(x, labels=y, positions=positions, loss_chunk=self.loss_chunk)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model):
        bench = self.benchmarks(_inner(model)) if self.benchmarks else {}
        if self.val is None:
            return bench
        m = _inner(model)
        per_source = {name: self._val_loss(m, windows) for name, windows in self.source_val.items()}
        if per_source:  # a mixture: the loss of the training mix, each source at its weight
            weights = {x["name"]: x["weight"] for x in self.mixture if x["name"] in per_source}
            loss = sum(weights[n] * v for n, v in per_source.items()) / sum(weights.values())
        else:
            loss = self._val_loss(m, self.val)
        out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        bpt = bytes_per_token(self.val.manifest)
        if per_source:  # bits per byte of each source at its own bytes per token, weighted as the loss is
            sources = {x["name"]: bytes_per_token(x) for x in self.val.manifest.get("mixture", [])}
            if all(sources.get(n) for n in per_source):
                out["val_bpb"] = sum(weights[n] * v / math.log(2) / sources[n]
                                     for n, v in per_source.items()) / sum(weights.values())
        elif bpt:
            out["val_bpb"] = loss / math.log(2) / bpt
        out.update({f"val_loss_{n}": v for n, v in per_source.items()})
        return {**out, **bench}

    def _val_loss(self, m: nn.Module, val: TokenWindows) -> float:
        """Mean loss over the first eval_batches micro-batches of `val`, shared out over the ranks."""
        n = min(len(val), self.eval_batches * self.micro_batch) if self.eval_batches > 0 else len(val)
        idx = list(range(self.rank * self.micro_batch, n, self.world * self.micro_batch))
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in idx:
            x, y = val.batch(range(i, min(i + self.micro_batch, n)))
            x, y = x.to(self.device), y.to(self.device)
            positions = None
            if self.split:
                x, y, positions = self.split.cut(x, y)
            total[0] += m(x, labels=y, positions=positions, loss_chunk=self.loss_chunk).double()
            total[1] += y.numel()
        from lmforge.train.dist import all_reduce_slices

        # Tensor-parallel ranks count once; context-parallel ranks each add their part of the sequences.
        all_reduce_slices(total, self.world * (self.split.size if self.split else 1))
        return (total[0] / total[1].clamp_min(1)).item()


def right_padded_tokens(ids: Tensor, pad_id: int) -> float:
    """Real tokens of right-padded rows: each row up to its last non-pad token.

    The pad id is <|endoftext|>, which a row may contain, but a rendered row's inputs end with
    <|im_end|> or a reply token, never with it; the one miss is a row cut at its full width exactly
    after a literal "<|endoftext|>" in the text, counted a token short.
    """
    if ids.numel() == 0:
        return 0.0
    real = (ids != pad_id).int()
    trailing = real.flip(-1).argmax(-1)  # pads after the last real token (0 if the last one is real)
    trailing = torch.where(real.any(-1), trailing, torch.full_like(trailing, ids.shape[-1]))
    return float((ids.shape[-1] - trailing).sum())


def bytes_per_token(manifest: dict) -> float:
    tokens, nbytes = manifest.get("tokens", 0), manifest.get("bytes", 0)
    return nbytes / tokens if tokens and nbytes else 0.0


def _inner(model: nn.Module) -> nn.Module:
    from lmforge.checkpoint import unwrap

    return unwrap(model)

