"""Weighted mixtures of sources: the `data.sources` entries, and the training stream that mixes them.

`data.sources` is a list whose entries are either a path (file, folder, glob) or a mapping
`{path: ..., name: code, weight: 0.3}` (or `epochs: 2` instead of `weight`). A plain list of paths
is one pool of documents, prepared and read exactly as before. As soon as one entry is a mapping the
run is a mixture: `prepare` keeps each source's shards apart (RUN/data/<split>/<name>/) and records
them in the split's manifest under "mixture", with the weight each source gets.

Weights are normalised to sum to 1. `epochs: e` on every source instead gives source i the weight
e_i * tokens_i / sum_j(e_j * tokens_j): each source is seen e_i times as often as the whole corpus
is. Entries without either take their share of tokens (epochs 1).

The training stream (`MixtureBatches`) decides the source of every window by a weighted round robin
(the source furthest behind its weight goes next), so after any number of windows each source's
count is within one window of its weight; within a source, windows come in a permutation seeded by
(seed, source, epoch). The state to resume is small and exact: windows drawn per source, and each
source's (epoch, cursor).
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ConfigError
from lmforge.data.loader import TokenWindows
from lmforge.errors import LmforgeError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a folder name on every file system
_KEYS = ("path", "name", "weight", "epochs")


@dataclass
class SourceSpec:
    """One entry of a mixture: where its documents are and how much of training it gets."""

    name: str
    path: str
    weight: float | None = None
    epochs: float | None = None


def source_path(entry: str | dict) -> str:
    """The path of a `data.sources` entry, whichever form it has (readers need only that)."""
    return str(entry.get("path", "")) if isinstance(entry, dict) else str(entry)


def _default_name(path: str, i: int) -> str:
    """A source's name from its path: the file or folder, or for a glob the folder above the pattern."""
    parts = [q for q in Path(path).parts if not glob.has_magic(q)][-1:] if not glob.has_magic(Path(path).name) \
        else [q for q in Path(path).parent.parts if not glob.has_magic(q)][-1:]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", parts[0].split(".")[0]) if parts else ""
    return name if _NAME.match(name) else f"source{i}"


def is_mixture(sources: list) -> bool:
    return any(isinstance(e, dict) for e in sources)


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key}: expected a number, got {value!r}", key)
    try:
        x = float(value)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {value!r}", key) from None
    if not x > 0 or x == float("inf"):
        raise ConfigError(f"{key}: must be a positive number, got {value!r}", key)
    return x


def parse_sources(sources: list, key: str = "data.sources") -> list[SourceSpec]:
    """The entries of `data.sources` as specs, checked; errors name the key (`data.sources[1].weight`).

    Plain paths in a mixture are sources named after their file or folder.
    """
    specs: list[SourceSpec] = []
    for i, entry in enumerate(sources):
        at = f"{key}[{i}]"
        if isinstance(entry, str | Path):
            path, name, weight, epochs = str(entry), "", None, None
        elif isinstance(entry, dict):
            unknown = [k for k in entry if k not in _KEYS]
            if unknown:
                raise ConfigError(f"{at}.{unknown[0]}: unknown key (a source has {', '.join(_KEYS)})",
                                  f"{at}.{unknown[0]}")
            path = entry.get("path")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"{at}.path: every source needs a path (file, folder or glob)", f"{at}.path")
            name = entry.get("name", "")
            if not isinstance(name, str):
                raise ConfigError(f"{at}.name: expected a string, got {name!r}", f"{at}.name")
            if "weight" in entry and "epochs" in entry:
                raise ConfigError(f"{at}.weight: give weight or epochs, not both", f"{at}.weight")
            weight = _number(entry["weight"], f"{at}.weight") if "weight" in entry else None
            epochs = _number(entry["epochs"], f"{at}.epochs") if "epochs" in entry else None
        else:
            raise ConfigError(f"{at}: expected a path or a mapping {{path, name, weight}}, got {entry!r}", at)
        if not name:
            name = _default_name(path, i)
        if not _NAME.match(name):
            raise ConfigError(f"{at}.name: {name!r} must be letters, digits, '_', '-', '.' (it names a folder)",
                              f"{at}.name")
        if any(s.name == name for s in specs):
            raise ConfigError(f"{at}.name: two sources are named {name!r}; give each a distinct name", f"{at}.name")
        specs.append(SourceSpec(name, path, weight, epochs))
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and not all(weighted):
        i = weighted.index(False)
        raise ConfigError(f"{key}[{i}].weight: some sources have a weight and this one has none; give every "
                          "source a weight (or use epochs on every source)", f"{key}[{i}].weight")
    if any(weighted) and any(s.epochs is not None for s in specs):
        i = next(i for i, s in enumerate(specs) if s.epochs is not None)
        raise ConfigError(f"{key}[{i}].epochs: mix weights and epochs in one list; use one or the other",
                          f"{key}[{i}].epochs")
    return specs


def mixture_weights(specs: list[SourceSpec], tokens: list[int]) -> list[float]:
    """Normalised weights: the given ones, else epochs x tokens (see the module docstring)."""
    if all(s.weight is not None for s in specs):
        raw = [float(s.weight) for s in specs]
    else:
        raw = [(s.epochs or 1.0) * t for s, t in zip(specs, tokens, strict=True)]
    total = sum(raw)
    if total <= 0:
        raise LmforgeError("the mixture's sources hold no training tokens")
    return [w / total for w in raw]


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
