"""Token files made elsewhere, adopted as prepared data: nanoGPT `.bin` files and HDF5 token datasets.

`data.sources` naming only such files (or folders of them, or globs) makes `prepare` skip
tokenization and write a manifest for them instead:

- a `.bin` file is a flat little-endian uint16 array, as nanoGPT's prepare scripts write: it already
  is a shard, so RUN/data/<split>/ gets a symbolic link to it (nothing is copied);
- an HDF5 file (`.h5`, `.hdf5`; needs h5py, `pip install 'lmforge[hdf5]'`) holds a 1-D integer dataset,
  the one named by `data.text_field` or else its only one; it is copied into shards a chunk at a time.

A file whose name says val / valid / validation (`val.bin`, `tokens_val.h5`) is the val split, every
other file train. The tokens must come from the run's tokenizer (adopt that tokenizer with
`tokenizer.from_file`); what can be checked is checked: every id below the tokenizer's vocabulary size.
Documents are counted as end-of-text ids. The bytes behind the tokens are unknown, so no bits per byte.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from lmforge.config import Config
from lmforge.console import log
from lmforge.data.shards import DTYPES, MANIFEST, ShardWriter, token_dtype
from lmforge.data.sources import resolve_sources
from lmforge.errors import LmforgeError
from lmforge.io import AtomicDir, atomic_write_json
from lmforge.tokenizer import Tokenizer

TOKEN_EXTS = {".bin", ".h5", ".hdf5"}
CHUNK = 1 << 24  # tokens scanned or copied at a time
_VAL = re.compile(r"(^|[_.-])(val|valid|validation)([_.-]|$)", re.IGNORECASE)


def token_files(sources: list) -> list[Path] | None:
    """The token files `sources` name, or None if they name text (a mix of both is an error)."""
    if not sources or any(isinstance(s, dict) for s in sources):
        return None
    files: list[Path] = []
    text = []
    for s in sources:
        p = Path(str(s)).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in TOKEN_EXTS)
            (files.extend(found) if found else text.append(s))
        elif p.suffix.lower() in TOKEN_EXTS:
            files.extend(f for f, _ in resolve_sources([str(s)]))
        else:
            text.append(s)
    if files and text:
        raise LmforgeError(f"data.sources mixes token files ({files[0]}) with text ({text[0]}); prepare them "
                           "in separate runs, or list only one kind")
    return files or None


def _h5py():
    try:
        import h5py
    except ImportError:
        raise LmforgeError("reading HDF5 token files needs h5py: pip install 'lmforge[hdf5]' "
                           "(or pip install h5py)") from None
    return h5py


def _hdf5_dataset(path: Path, key: str):
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise LmforgeError(f"{path}: not a readable HDF5 file ({e})") from None
    names: list[str] = []
    f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
    name = key if key in f else (names[0] if len(names) == 1 else None)
    if name is None:
        f.close()
        raise LmforgeError(f"{path}: no dataset '{key}' (datasets: {', '.join(names) or 'none'}); set "
                           "data.text_field to the dataset that holds the token ids")
    ds = f[name]
    if ds.ndim != 1 or ds.dtype.kind not in "iu":
        f.close()
        raise LmforgeError(f"{path}: dataset '{name}' is {ds.dtype} of shape {ds.shape}, not a 1-D array "
                           "of integer token ids")
    return f, ds


def _scan(path: Path, chunks, vocab: int, eot: int) -> tuple[int, int, int]:
    """(tokens, documents, max id) of the chunks of one file, refusing ids outside the vocabulary."""
    n = docs = 0
    top = -1
    for c in chunks:
        if c.size == 0:
            continue
        if c.min() < 0:
            raise LmforgeError(f"{path}: negative token id {int(c.min())}; not a token file")
        top = max(top, int(c.max()))
        n += int(c.size)
        docs += int(np.count_nonzero(c == eot))
    if top >= vocab:
        raise LmforgeError(f"{path}: token id {top} is outside the run's tokenizer ({vocab} tokens); these tokens "
                           "come from another tokenizer: adopt it with tokenizer.from_file")
    return n, docs, top


def adopt(cfg: Config, files: list[Path]) -> dict:
    """Write RUN/data/{train,val} manifests over `files` (see the module docstring)."""
    run = cfg.run_path
    tok = Tokenizer.load(run / "tokenizer")
    dtype = token_dtype(tok.vocab_size)
    splits: dict[str, list[Path]] = {"train": [], "val": []}
    for f in files:
        splits["val" if _VAL.search(f.stem) else "train"].append(f)
    if not splits["train"]:
        raise LmforgeError(f"no train token file among {', '.join(map(str, files))} (every name says val)")
    summary: dict = {"adopted": True}
    for split, group in splits.items():
        final = run / "data" / split
        if not group:
            if final.exists():
                raise LmforgeError(f"{final} exists from an earlier prepare and no val token file was given; "
                                   "remove it or name a val file")
            continue
        with AtomicDir(final) as tmp:
            shards, tokens, docs, top = [], 0, 0, -1
            writer = ShardWriter(tmp, dtype, cfg.data.shard_tokens)
            try:
                for f in group:
                    if f.suffix.lower() == ".bin":
                        if dtype != "uint16":
                            raise LmforgeError(f"{f}: .bin token files are uint16, but the run's tokenizer has "
                                               f"{tok.vocab_size} tokens (needs uint32)")
                        size = f.stat().st_size
                        if size % 2:
                            raise LmforgeError(f"{f}: {size} bytes is not a whole number of uint16 tokens; "
                                               "truncated or not a token file")
                        arr = np.memmap(f, dtype=DTYPES["uint16"], mode="r") if size else np.zeros(0, np.uint16)
                        n, d, t = _scan(f, (arr[i:i + CHUNK] for i in range(0, len(arr), CHUNK)),
                                        tok.vocab_size, tok.eot_id)
                        if n:
                            name = f"adopted_{len(shards):05d}.bin"
                            os.symlink(f.resolve(), tmp / name)
                            shards.append({"file": name, "tokens": n})
                    else:
                        h5, ds = _hdf5_dataset(f, cfg.data.text_field)
                        with h5:
                            def chunks(ds=ds):
                                for i in range(0, len(ds), CHUNK):
                                    c = np.asarray(ds[i:i + CHUNK]).astype(np.int64)
                                    yield c
                            n, d, t = _scan(f, _writing(chunks(), writer), tok.vocab_size, tok.eot_id)
                    tokens, docs, top = tokens + n, docs + d, max(top, t)
            finally:
                writer.close()
            shards += writer.shards
            if tokens == 0:
                raise LmforgeError(f"{', '.join(map(str, group))}: no tokens")
            atomic_write_json(tmp / MANIFEST, {
                "dtype": dtype, "tokens": tokens, "documents": docs, "bytes": 0, "shards": shards,
                "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                "max_token_id": top, "sources": [str(f) for f in group], "split": split, "adopted": True,
                "tokenizer": str(run / "tokenizer")})
        summary[split] = {"tokens": tokens, "documents": docs, "shards": len(shards)}
    log(f"prepare: adopted token files: train {summary['train']['tokens']:,} tokens"
        + (f", val {summary['val']['tokens']:,}" if "val" in summary else ", no val file") + f" -> {run / 'data'}")
    return summary


def _writing(chunks, writer: ShardWriter):
    """Pass chunks through, writing each into `writer` as it goes by (one read of the file)."""
    for c in chunks:
        writer.write(c)
        yield c
