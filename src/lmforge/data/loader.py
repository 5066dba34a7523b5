"""Batches of token windows from shards, in a seeded order whose position is part of a checkpoint.

A split is cut into windows of seq_len + 1 tokens with stride seq_len (every token is predicted
once per epoch). Each epoch visits the windows in a permutation seeded by (seed, epoch), so the
whole data order is a pure function of the seed: the state to resume is just (epoch, cursor).

Optimizer step s consumes the next G = micro_batch * world * accum windows of the permutation;
rank r takes micro-batch a from offset (a * world + r) * micro_batch. One process with accum=2
therefore sees exactly the sequences two processes with accum=1 see, which is what makes the
DDP-parity test an equality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.data.shards import open_shards
from lmforge.errors import LmforgeError


class TokenWindows:
    """The windows of a split, or with `source` of one source of a mixture (its shards only)."""

    def __init__(self, split_dir: str | Path, seq_len: int, source: str | None = None):
        self.split_dir = Path(split_dir)
        self.shards, self.manifest = open_shards(self.split_dir)
        if source is not None:
            self.shards = [a for a, s in zip(self.shards, self.manifest["shards"], strict=True)
                           if s.get("source") == source]
            self.split_dir = self.split_dir / source
        self.seq_len = seq_len
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.offsets = np.cumsum([0] + counts)
        if self.offsets[-1] == 0:
            total = sum(len(a) for a in self.shards)
            raise LmforgeError(f"{self.split_dir}: {total} tokens is less than one sequence of "
                               f"{seq_len + 1}; use more data or a smaller train.seq_len")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        start = (i - int(self.offsets[s])) * self.seq_len
        return np.asarray(self.shards[s][start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.stack([self.get(int(i)) for i in indices]))
        return w[:, :-1], w[:, 1:]


class EpochStream:
    """Which items each micro-batch of each step takes, seeded per epoch and resumable by (epoch, cursor).

    Step s takes the next micro_batch * world * accum items of the epoch's order; rank r's
    micro-batch a starts at (a * world + r) * micro_batch, so 1 process x accum 2 sees what
    2 processes x accum 1 see. Subclasses say what an epoch's items are (`epoch_items`): token
    windows (`LMBatches`), packed SFT rows, preference pairs, RL prompts.
    """

    what = "items"

    def __init__(self, micro_batch: int, accum: int, rank: int, world: int, seed: int):
        self.micro, self.accum, self.rank, self.world, self.seed = micro_batch, accum, rank, world, seed
        self.per_step = micro_batch * world * accum
        self.epoch, self.cursor = 0, 0
        self._items: list | None = None

    def epoch_items(self, epoch: int) -> list:
        raise NotImplementedError

    def order(self, n: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _current(self) -> list:
        if self._items is None:
            self._items = self.epoch_items(self.epoch)
            if len(self._items) < self.per_step:
                raise LmforgeError(f"{len(self._items)} {self.what} per epoch, but one optimizer step needs "
                                   f"{self.per_step} (micro_batch x processes x accumulation); lower "
                                   "train.micro_batch / train.batch_tokens or add data")
        return self._items

    def next_step(self) -> list[list]:
        if self.cursor + self.per_step > len(self._current()):  # drop the ragged tail of the epoch
            self.epoch, self.cursor, self._items = self.epoch + 1, 0, None
        items = self._current()
        out = []
        for a in range(self.accum):
            lo = self.cursor + (a * self.world + self.rank) * self.micro
            out.append(items[lo:lo + self.micro])
        self.cursor += self.per_step
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "per_step": self.per_step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("per_step", self.per_step) != self.per_step:
            raise LmforgeError(f"cannot resume: the checkpoint took {state['per_step']} {self.what} per step, this "
                               f"run {self.per_step}; keep train.micro_batch / batch_tokens / seq_len as they were")
        self.epoch, self.cursor, self._items = int(state["epoch"]), int(state["cursor"]), None


class LMBatches(EpochStream):
    """The training stream: each call to `next_step` returns this rank's micro-batches for one step."""

    what = "sequences"

    def __init__(self, windows: TokenWindows, micro_batch: int, accum: int, rank: int, world: int, seed: int):
        super().__init__(micro_batch, accum, rank, world, seed)
        self.windows = windows
        if len(windows) < self.per_step:
            raise LmforgeError(f"{windows.split_dir}: {len(windows)} sequences of {windows.seq_len} tokens, "
                               f"but one optimizer step needs {self.per_step}; lower train.batch_tokens / "
                               "train.micro_batch / train.seq_len or add data")

    def epoch_items(self, epoch: int) -> np.ndarray:
        return self.order(len(self.windows), epoch)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.windows.batch(idx) for idx in super().next_step()]


class MixtureBatches:
    """The training stream of a mixture: like `LMBatches`, each step's windows split over ranks and
    accumulation steps the same way, but each window comes from the source its weight calls for."""

    what = "sequences"

    def __init__(self, pools: list[TokenWindows], names: list[str], weights: list[float], micro_batch: int,
                 accum: int, rank: int, world: int, seed: int):
        self.pools, self.names, self.weights = pools, names, np.asarray(weights, dtype=np.float64)
        self.micro, self.accum, self.rank, self.world, self.seed = micro_batch, accum, rank, world, seed
        self.per_step = micro_batch * world * accum
        self.seq_len = pools[0].seq_len
        n = len(pools)
        self.drawn = np.zeros(n, dtype=np.int64)  # windows taken from each source, over all ranks
        self.epochs = [0] * n
        self.cursors = [0] * n
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, i: int) -> np.ndarray:
        if i not in self._orders:
            self._orders[i] = np.random.default_rng([self.seed, i, self.epochs[i]]).permutation(len(self.pools[i]))
        return self._orders[i]

    def _take(self, i: int) -> int:
        if self.cursors[i] >= len(self.pools[i]):  # this source is used up: its next epoch
            self.epochs[i], self.cursors[i] = self.epochs[i] + 1, 0
            self._orders.pop(i, None)
        w = int(self._order(i)[self.cursors[i]])
        self.cursors[i] += 1
        return w

    def _next_items(self) -> list[tuple[int, int]]:
        items = []
        for _ in range(self.per_step):
            due = self.weights * (self.drawn.sum() + 1) - self.drawn
            i = int(np.argmax(due))  # ties go to the source listed first
            self.drawn[i] += 1
            items.append((i, self._take(i)))
        return items

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        items = self._next_items()
        out = []
        for a in range(self.accum):
            lo = (a * self.world + self.rank) * self.micro
            w = torch.from_numpy(np.stack([self.pools[i].get(j) for i, j in items[lo:lo + self.micro]]))
            out.append((w[:, :-1], w[:, 1:]))
        return out

    def tokens_per_source(self) -> dict[str, int]:
        """Predicted tokens each source has given so far, over all ranks (the realised mixture)."""
        return {n: int(d) * self.seq_len for n, d in zip(self.names, self.drawn, strict=True)}

    def state_dict(self) -> dict:
        return {"per_step": self.per_step, "sources": list(self.names), "drawn": self.drawn.tolist(),
                "epochs": list(self.epochs), "cursors": list(self.cursors)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("per_step", self.per_step) != self.per_step:
            raise LmforgeError(f"cannot resume: the checkpoint took {state['per_step']} sequences per step, this "
                               f"run {self.per_step}; keep train.micro_batch / batch_tokens / seq_len as they were")
        if state.get("sources") != self.names:
            raise LmforgeError(f"cannot resume: the checkpoint's data position is for sources {state.get('sources')}, "
                               f"the prepared data has {self.names}; re-prepare with the sources it had")
        self.drawn = np.asarray(state["drawn"], dtype=np.int64)
        self.epochs, self.cursors = [int(e) for e in state["epochs"]], [int(c) for c in state["cursors"]]
        self._orders = {}
