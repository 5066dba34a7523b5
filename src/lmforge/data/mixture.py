"""Weighted mixtures of sources: the `data.sources` entries, and the training stream that mixes them.

`data.sources` is a list whose entries are either a path (file, folder, glob) or a mapping
`{path: ..., name: code, weight: 0.3}` (or `epochs: 2` instead of `weight`). A plain list of paths
is one pool of documents, prepared and read exactly as before. As soon as one entry is a mapping the
run is a mixture: `prepare` keeps each source's shards apart (RUN/data/<split>/<name>/) and records
them in the split's manifest under "mixture", with the weight each source gets.

Weights are normalised to sum to 1. `epochs: e` on every source instead gives source i the weight
e_i * tokens_i / sum_j(e_j * tokens_j): each source is seen e_i times as often as the whole corpus
is. Entries without either take their share of tokens (epochs 1).

The training stream (`lmforge.data.loader.MixtureBatches`) decides the source of every window by a
weighted round robin (the source furthest behind its weight goes next), so after any number of
windows each source's count is within one window of its weight; within a source, windows come in a permutation seeded by
(seed, source, epoch). The state to resume is small and exact: windows drawn per source, and each
source's (epoch, cursor).
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import ConfigError
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
