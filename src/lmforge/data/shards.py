"""Token shards on disk: flat little-endian uint16/uint32 arrays plus a manifest.json per split.

A split folder `RUN/data/<split>/` holds shard_00000.bin, shard_00001.bin, ... and manifest.json.
Shards are raw arrays (no header) so `numpy.memmap` reads them with zero copies, and every training
process can index any token without loading the corpus. The manifest is what makes the raw bytes
safe to use: dtype, token counts per shard (checked against file sizes) and the tokenizer's hash.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError

MANIFEST = "manifest.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_REQUIRED = ("dtype", "tokens", "documents", "shards", "tokenizer_hash", "vocab_size", "eot_id")


def token_dtype(vocab_size: int) -> str:
    """uint16 halves disk and page cache for vocabularies up to 65535, the common case."""
    return "uint16" if vocab_size <= 65535 else "uint32"


class ShardWriter:
    """Append token arrays to shard_NNNNN.bin files of at most `shard_tokens` tokens each.

    Files are written into `directory` as tokens arrive (streaming: the corpus is never in memory);
    the caller makes the folder atomic (AtomicDir). Empty shards are never created, because
    `numpy.memmap` cannot map an empty file.
    """

    def __init__(self, directory: Path, dtype: str, shard_tokens: int):
        if shard_tokens <= 0:
            raise LmforgeError(f"data.shard_tokens must be positive, got {shard_tokens}")
        self.dir, self.dtype, self.shard_tokens = Path(directory), DTYPES[dtype], shard_tokens
        self.shards: list[dict] = []
        self.tokens = 0
        self.max_id = -1
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        self.max_id = max(self.max_id, int(ids.max()))
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._f is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            self._f.write(part.tobytes())
            self.shards[-1]["tokens"] += int(part.size)
            self.tokens += int(part.size)

    def _next(self) -> None:
        if self._f is not None:
            self._f.close()
        name = f"shard_{len(self.shards):05d}.bin"
        self._f = open(self.dir / name, "wb")  # closed by _next() or close()
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> list[dict]:
        if self._f is not None:
            self._f.close()
            self._f = None
        return self.shards


def read_manifest(split_dir: str | Path) -> dict:
    """Load and verify a split's manifest; every shard must exist with exactly the recorded size.

    The returned dict is the manifest plus "dir" (the split folder), for error messages downstream.
    """
    d = Path(split_dir)
    path = d / MANIFEST
    if not path.is_file():
        hint = "" if d.is_dir() else " (the folder does not exist)"
        raise LmforgeError(f"{path}: missing{hint}; run `lmforge prepare` to tokenize the data")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: corrupt manifest ({e}); re-run `lmforge prepare`") from None
    if not isinstance(m, dict):
        raise LmforgeError(f"{path}: corrupt manifest (not a JSON object); re-run `lmforge prepare`")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise LmforgeError(f"{path}: incomplete manifest, missing {', '.join(missing)}; "
                           "re-run `lmforge prepare`")
    if m["dtype"] not in DTYPES:
        raise LmforgeError(f"{path}: dtype '{m['dtype']}' is not one of {', '.join(DTYPES)}")
    itemsize = DTYPES[m["dtype"]].itemsize
    total = 0
    if not isinstance(m["shards"], list):
        raise LmforgeError(f"{path}: corrupt manifest ('shards' is not a list); re-run `lmforge prepare`")
    for s in m["shards"]:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tokens"), int)):
            raise LmforgeError(f"{path}: corrupt shard entry {s!r}; re-run `lmforge prepare`")
        f = d / s["file"]
        if not f.is_file():
            raise LmforgeError(f"{f}: shard listed in {path} is missing; re-run `lmforge prepare`")
        size, want = f.stat().st_size, s["tokens"] * itemsize
        if size != want:
            raise LmforgeError(f"{f}: {size} bytes but the manifest says {s['tokens']} tokens "
                               f"({want} bytes): truncated or overwritten; re-run `lmforge prepare`")
        total += s["tokens"]
    if total != m["tokens"]:
        raise LmforgeError(f"{path}: shards hold {total} tokens but the manifest says {m['tokens']}; "
                           "re-run `lmforge prepare`")
    m["dir"] = str(d)
    return m


def open_shards(split_dir: str | Path) -> tuple[list[np.memmap], dict]:
    """Read-only memmaps of a split's shards (verified by read_manifest) and its manifest."""
    m = read_manifest(split_dir)
    dtype = DTYPES[m["dtype"]]
    arrays = [np.memmap(Path(split_dir) / s["file"], dtype=dtype, mode="r") for s in m["shards"]]
    return arrays, m


def check_tokenizer(manifest: dict, tokenizer: object = None, *, vocab_size: int | None = None,
                    tokenizer_dir: str | Path | None = None) -> None:
    """Refuse shards that do not belong to this tokenizer or do not fit this model.

    `tokenizer` is a tokenizer hash (str), a model's vocab size (int), or an object with `.hash`
    (a lmforge Tokenizer); `vocab_size` may be given separately for the model check. Token ids from
    another tokenizer are silently wrong inputs, and ids >= the embedding size crash mid-run.
    """
    where = manifest.get("dir", "the prepared data")
    rerun = "re-run `lmforge prepare` with this run's tokenizer"
    want_hash = getattr(tokenizer, "hash", tokenizer)
    if isinstance(tokenizer, int) and not isinstance(tokenizer, bool):
        want_hash, vocab_size = None, tokenizer
    if isinstance(want_hash, str) and want_hash != manifest.get("tokenizer_hash"):
        named = f" ({tokenizer_dir})" if tokenizer_dir else ""
        raise LmforgeError(
            f"{where}: the shards were made with tokenizer {str(manifest.get('tokenizer_hash'))[:12]} "
            f"({manifest.get('tokenizer', 'unknown folder')}) but the tokenizer in use{named} is "
            f"{want_hash[:12]}; {rerun}")
    if vocab_size is not None:
        max_id = manifest.get("max_token_id", manifest["vocab_size"] - 1)
        if max_id >= vocab_size:
            raise LmforgeError(
                f"{where}: token id {max_id} does not fit a model with vocab_size {vocab_size} "
                f"(the data's tokenizer has {manifest['vocab_size']} tokens); set model.vocab_size=0 "
                f"to size the model from the tokenizer, or {rerun}")
