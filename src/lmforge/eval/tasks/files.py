"""Rows of local benchmark files (jsonl, json arrays, csv, parquet), each with the file:line it came from.

Benchmarks are read from the files their authors publish; a path `hf:<name>[:<config>][@<split>]` is
downloaded once with `datasets` and read from its cached copy after (hub_file). Every missing
or malformed field is reported as `file:line: no 'key' (...)`, so a user can fix the file.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text, json_lines

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def files_in(path: Path, suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """`path` itself, or the benchmark files inside a folder (sorted, so results are in a stable order)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if found:
            return found
        raise LmforgeError(f"{path}: no {'/'.join(suffixes)} files in this folder")
    raise LmforgeError(f"{path}: no such file or folder")


def rows(path: Path, header: bool | None = True) -> Iterator[tuple[str, Any]]:
    """(where, row) of one file: dicts from jsonl/json/parquet and from csv with a header; lists from a
    csv without one (header=False), or either when header=None (a header is told by `question` in it)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        for i, rec in enumerate(pd.read_parquet(path).to_dict("records")):
            yield f"{path}:row {i + 1}", {k: _plain(v) for k, v in rec.items()}
        return
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".csv":
        table = list(csv.reader(text.splitlines()))
        if header is None:
            header = bool(table) and any(c.strip().lower() in ("question", "题目") for c in table[0])
        if header:
            names = [c.strip() for c in table[0]] if table else []
            for i, r in enumerate(table[1:], start=2):
                yield f"{path}:{i}", dict(zip(names, r))
        else:
            for i, r in enumerate(table, start=1):
                yield f"{path}:{i}", r
        return
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, item in enumerate(items):
            yield f"{path}:item {i + 1}", _object(item, f"{path}:item {i + 1}")
        return
    for i, item in json_lines(path, text.splitlines()):
        yield f"{path}:{i}", _object(item, f"{path}:{i}")


def _object(item: object, where: str) -> dict:
    if not isinstance(item, dict):
        raise LmforgeError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return item


def _plain(v: Any) -> Any:
    """numpy arrays and nested records from parquet as plain lists and dicts."""
    if hasattr(v, "tolist"):
        return _plain(v.tolist())
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def need(row: dict, key: str, where: str, what: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """row[key], or an error naming the file, line and key and the format expected."""
    if key not in row or row[key] is None:
        raise LmforgeError(f"{where}: no '{key}' field ({what})")
    value = row[key]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise LmforgeError(f"{where}: '{key}' should be a {names}, got {type(value).__name__} ({what})")
    return value


def pick(row: dict, keys: tuple[str, ...], where: str, what: str) -> Any:
    """The first of `keys` the row has (column names differ between a benchmark's releases)."""
    lower = {str(k).strip().lower(): v for k, v in row.items()}
    for k in keys:
        if k.lower() in lower and lower[k.lower()] not in (None, ""):
            return lower[k.lower()]
    raise LmforgeError(f"{where}: no '{keys[0]}' field ({what})")


# --- Hugging Face Hub datasets, cached ------------------------------------------------------------------

HUB_PREFIX = "hf:"


def cache_dir() -> Path:
    import os

    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "eval"


def hub_file(source: str) -> Path:
    """The local JSONL copy of a Hub dataset split named `hf:<name>[:<config>][@<split>]` (split: test),
    downloaded once with `datasets` into LMFORGE_CACHE/eval (~/.cache/lmforge/eval) and read from there
    ever after, so only the first evaluation needs the network and later ones give the same questions."""
    spec = source[len(HUB_PREFIX):]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    split = split or "test"
    if not name:
        raise LmforgeError(f"task path '{source}': name a dataset, hf:<name>[:<config>][@<split>]")
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", "--".join(p for p in (name, config) if p))
    out = cache_dir() / f"{slug}@{split}.jsonl"
    if out.is_file():
        return out
    try:
        import datasets
    except ImportError:
        raise LmforgeError(f"task path '{source}' needs the datasets package to download it once: pip install "
                           f"datasets (or put the split as JSONL at {out})") from None
    try:
        rows_ = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # the hub client raises many types: name the dataset whatever it is
        raise LmforgeError(f"task path '{source}': cannot download the dataset ({type(e).__name__}: {e}); "
                           f"without a network, put the split as JSONL at {out}") from None
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows_))
    return out
