"""Exact and near-duplicate documents across all sources, found in a scan before tokenizing.

The scan reads every document once (after `data.filters`), in corpus order, numbering them. It
writes, into a scratch folder on disk, never into one in-memory set:

- exact dedup (ExactKeys): (16-byte text hash, number) records into 64 partition files by the hash's top
  bits; each partition is sorted on its own, and every document whose hash an earlier one has is dropped
  (the merge of a many-task prepare finds duplicates between tasks the same way);
- near dedup (`data.near_dedup`): a MinHash signature per document (`data.minhash.num_perm` values
  over word `ngram`-shingles by one-permutation hashing, computed in worker processes with numpy),
  appended to a signature file, and one LSH key per band (`bands` bands of num_perm / bands rows)
  into per-band partition files. Documents that share a band key are candidates; a candidate pair
  whose signatures agree on at least `threshold` of their values (the estimated Jaccard
  similarity) is a duplicate pair. Pairs are joined into clusters (union-find); each cluster keeps
  its first document in corpus order and drops the rest.

Memory holds one partition at a time, the candidate pairs, and the sorted numbers of the dropped
documents, which the tokenizing pass walks with a cursor. Everything depends only on the text and
the corpus order (fixed seeds, stable sorts), so the result is the same on every run and for any
number of workers.

Words for shingles: lower-cased runs of ASCII letters, digits and underscores, with non-ASCII letters
of two-byte UTF-8 (accented Latin, Cyrillic, Greek) inside words, and each character of three or more
bytes (CJK) starting a word of its own, so Chinese is shingled by characters. A document with fewer
words than `ngram` is one shingle of all its words.

Why numpy and not `datasketch`: datasketch hashes every shingle with SHA-1 in a Python loop and
applies num_perm hash functions to each; one-permutation hashing over numpy arrays hashes each
shingle once. bench/prepare.py times both on the same documents (`minhash_numpy_vs_datasketch`).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmforge.config import DataConfig
from lmforge.data.clean import Cleaner
from lmforge.data.sources import Document, text_key
from lmforge.errors import LmforgeError

EXACT_PARTS = 64
BAND_PARTS = 16
BATCH_BYTES = 1 << 20
EXAMPLES = 5
POOL_MIN_WORKERS = 4  # below this many workers the scan computes signatures in the reading process
FLUSH_BYTES = 8 << 20  # records buffered per partition set before they are appended to the files
_P = np.uint64(0x100000001B3)  # odd, so invertible modulo 2**64
_M64 = (1 << 64) - 1

_CLS = np.zeros(256, np.uint8)  # 0: separator, 1: word byte, 2: starts a word of its own (3+-byte char)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _CLS[_c] = 1
_CLS[0x80:0xE0] = 1
_CLS[0xE0:] = 2


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads structured 64-bit values over all bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def odd_multipliers(n: int) -> np.ndarray:
    """n odd, well-spread 64-bit constants: hash(x_1..x_n) = mix64(sum(x_k * m_k)) weighs each position apart."""
    return mix64(np.arange(1, n + 1, dtype=np.uint64)) | np.uint64(1)


_POW: dict[int, np.ndarray] = {}  # base -> base**i mod 2**64, grown as batches need


def _powers(base: int, n: int) -> np.ndarray:
    """base**i mod 2**64 for i in [0, n) (a view of a cached table)."""
    have = _POW.get(base)
    if have is None or len(have) < n:
        size = max(n, 2 * BATCH_BYTES)
        out = np.full(size, base, dtype=np.uint64)
        out[0] = 1
        with np.errstate(over="ignore"):
            have = _POW[base] = np.cumprod(out, dtype=np.uint64)
    return have[:n]


def shingles(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit shingle hashes, index of their document) for `texts`, grouped by document in order."""
    raw = [t.lower().encode("utf-8") for t in texts]
    buf = np.frombuffer(b"\n".join(raw), dtype=np.uint8)
    doc_start = np.zeros(len(raw), dtype=np.int64)
    doc_start[1:] = np.cumsum([len(r) + 1 for r in raw[:-1]])
    if not len(buf):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    cls = _CLS[buf]
    word = cls > 0
    prev_word = np.r_[False, word[:-1]]
    start = word & (~prev_word | (cls == 2))
    end = word & np.r_[start[1:] | ~word[1:], True]
    s, e = np.flatnonzero(start), np.flatnonzero(end) + 1
    n = len(buf)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(buf.astype(np.uint64) * _powers(int(_P), n), out=prefix[1:])
        inv = pow(int(_P), -1, 1 << 64)
        wh = (prefix[e] - prefix[s]) * _powers(inv, n)[s]  # word hash, independent of its position
        wh = mix64(wh + e.astype(np.uint64) - s.astype(np.uint64))
        doc = np.searchsorted(doc_start, s, side="right") - 1
        mult = odd_multipliers(ngram)
        counts = np.bincount(doc, minlength=len(raw))
        hashes, owners = [], []
        if len(wh) >= ngram:
            g = np.zeros(len(wh) - ngram + 1, dtype=np.uint64)
            for k in range(ngram):
                g += wh[k:len(wh) - ngram + 1 + k] * mult[k]
            ok = doc[:len(g)] == doc[ngram - 1:]
            hashes.append(g[ok])
            owners.append(doc[:len(g)][ok])
        short = np.flatnonzero((counts > 0) & (counts < ngram))
        if len(short):
            first = np.searchsorted(doc, short)
            hs = np.zeros(len(short), dtype=np.uint64)
            for k in range(ngram - 1):
                take = counts[short] > k
                hs[take] += wh[first[take] + k] * mult[k]
            hashes.append(hs)
            owners.append(short)
        if not hashes:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        h, o = np.concatenate(hashes), np.concatenate(owners)
        order = np.argsort(o, kind="stable")
        return mix64(h[order]), o[order]


def signatures(texts: list[str], ngram: int, num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 MinHash signatures of shape (len(texts), num_perm), mask of texts that have shingles).

    One-permutation hashing: each shingle is hashed once; its low bits pick one of `num_perm` bins
    and its high 32 bits compete for that bin's minimum. Bins no shingle fell into take the value of
    the next filled bin to the right (circularly) plus a multiple of the distance ("rotation"
    densification, Shrivastava and Li 2014), so two documents agree on a bin with probability close
    to their Jaccard similarity, as with num_perm independent hash functions, at 1/num_perm the cost.
    """
    h, owner = shingles(texts, ngram)
    n, k = len(texts), num_perm
    full = np.uint64(np.iinfo(np.uint64).max)
    with np.errstate(over="ignore"):
        x = mix64(h ^ mix64(np.asarray([seed], dtype=np.uint64)))
        cell = owner * k + ((x & np.uint64(0xFFFFFFFF)) % np.uint64(k)).astype(np.int64)
        sig = np.full(n * k, full, dtype=np.uint64)
        np.minimum.at(sig, cell, x >> np.uint64(32))
        sig = sig.reshape(n, k)
        empty = sig == full
        has = ~empty.all(axis=1)
        rows = np.flatnonzero(empty.any(axis=1) & has)
        if len(rows):
            e = empty[rows]
            pos = np.arange(k)
            idx = np.concatenate([np.where(e, 4 * k, pos), np.where(e, 4 * k, pos + k)], axis=1)
            nxt = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1][:, :k]
            src = sig[rows[:, None], nxt % k]
            dense = src + (nxt - pos).astype(np.uint64) * np.uint64(0x9E3779B1)
            sig[rows] = np.where(e, dense & np.uint64(0xFFFFFFFF), sig[rows])
    return sig.astype(np.uint32), has


def band_keys(sig: np.ndarray, bands: int) -> np.ndarray:
    """One 64-bit key per (document, band) from the band's rows of the signature."""
    n, k = sig.shape
    rows = k // bands
    mult = odd_multipliers(rows)
    with np.errstate(over="ignore"):
        x = sig.reshape(n, bands, rows).astype(np.uint64) * mult
        return mix64(x.sum(axis=2, dtype=np.uint64) + np.arange(bands, dtype=np.uint64))


def _signature_job(job: tuple[list[str], int, int, int, int]) -> tuple:
    texts, ngram, num_perm, seed, bands = job
    sig, has = signatures(texts, ngram, num_perm, seed)
    return sig, has, band_keys(sig, bands)


class _Parts:
    """Fixed-width records appended to partition files, read back one partition at a time."""

    def __init__(self, folder: Path, name: str, parts: int, dtype: np.dtype):
        self.folder, self.name, self.parts, self.dtype = folder, name, parts, dtype
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_bytes = 0

    def path(self, p: int) -> Path:
        return self.folder / f"{self.name}-{p:03d}.bin"

    def add(self, part: np.ndarray, records: np.ndarray) -> None:
        self.pending.append((part, records))
        self.pending_bytes += records.nbytes
        if self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        part = np.concatenate([p for p, _ in self.pending])
        records = np.concatenate([r for _, r in self.pending])
        self.pending, self.pending_bytes = [], 0
        order = np.argsort(part, kind="stable")
        part, records = part[order], records[order]
        bounds = np.searchsorted(part, np.arange(self.parts + 1))
        for p in range(self.parts):
            if bounds[p + 1] > bounds[p]:
                with open(self.path(p), "ab") as f:
                    f.write(records[bounds[p]:bounds[p + 1]].tobytes())

    def read(self, p: int) -> np.ndarray:
        self.flush()
        f = self.path(p)
        return np.fromfile(f, dtype=self.dtype) if f.exists() else np.zeros(0, dtype=self.dtype)


class ExactKeys:
    """16-byte text hashes with the numbers of their documents, in partition files on disk (never one
    in-memory set); `duplicates()` gives the numbers whose hash a lower number already has."""

    DTYPE = np.dtype([("k1", "<u8"), ("k2", "<u8"), ("o", "<u8")])

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.parts = _Parts(folder, "exact", EXACT_PARTS, self.DTYPE)

    def add(self, keys: np.ndarray, numbers: np.ndarray | list[int]) -> None:
        """keys: (n, 2) little-endian uint64 halves of each 16-byte hash (or (n, 16) bytes)."""
        k = np.ascontiguousarray(keys).view("<u8").reshape(-1, 2)
        if not len(k):
            return
        rec = np.empty(len(k), dtype=self.DTYPE)
        rec["k1"], rec["k2"], rec["o"] = k[:, 0], k[:, 1], numbers
        self.parts.add((k[:, 0] >> np.uint64(58)).astype(np.int64), rec)

    def duplicates(self) -> np.ndarray:
        out = [np.zeros(0, np.uint64)]
        for p in range(EXACT_PARTS):
            r = self.parts.read(p)
            r = r[np.lexsort((r["o"], r["k2"], r["k1"]))]
            same = (r["k1"][1:] == r["k1"][:-1]) & (r["k2"][1:] == r["k2"][:-1])
            out.append(r["o"][1:][same])
        return np.sort(np.concatenate(out))


def near_duplicates(sig: np.ndarray, sig_o: np.ndarray, bands: list[_Parts], threshold: float,
                    exact_drop: np.ndarray) -> tuple[np.ndarray, int, list[dict]]:
    """(numbers of near-duplicates not already exact ones, clusters, example pairs) from the MinHash
    signatures `sig` of the documents numbered `sig_o` (ascending) and their LSH band keys in `bands`."""
    pairs = []
    for parts in bands:
        for p in range(BAND_PARTS):
            r = parts.read(p)
            if len(r) < 2:
                continue
            r = r[np.lexsort((r["o"], r["key"]))]
            new = np.r_[True, r["key"][1:] != r["key"][:-1]]
            first = r["o"][np.flatnonzero(new)][np.cumsum(new) - 1]
            dup = ~new
            pairs.append(np.stack([first[dup], r["o"][dup]], axis=1))
    if not pairs:
        return np.zeros(0, np.uint64), 0, []
    pairs = np.unique(np.concatenate(pairs), axis=0)  # sorted: deterministic
    sims = np.empty(len(pairs))
    for lo in range(0, len(pairs), 65536):
        chunk = pairs[lo:lo + 65536]
        ra, rb = np.searchsorted(sig_o, chunk[:, 0]), np.searchsorted(sig_o, chunk[:, 1])
        sims[lo:lo + len(chunk)] = (sig[ra] == sig[rb]).mean(axis=1)
    good = sims >= threshold
    pairs, sims = pairs[good], sims[good]
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the first document in corpus order stays
    members = np.asarray(sorted(parent), dtype=np.uint64)
    roots = np.asarray([root(x) for x in members.tolist()], dtype=np.uint64)
    removed = members[roots != members]
    clusters = len(np.unique(roots[roots != members]))
    near = np.setdiff1d(removed, exact_drop)
    # Examples: pairs whose second document is a near-duplicate proper (exact copies have their own count).
    shown = np.flatnonzero(np.isin(pairs[:, 1], near))[:EXAMPLES]
    examples = [{"kept": a, "dropped": b, "similarity": round(s, 4)}
                for (a, b), s in zip(pairs[shown].tolist(), sims[shown].tolist())]
    return near, clusters, examples


def band_records(keys: np.ndarray, ordinals: np.ndarray, bands: list[_Parts]) -> None:
    """Each document's LSH key per band (band_keys) into that band's partition files."""
    for bi, parts in enumerate(bands):
        rec = np.empty(len(ordinals), dtype=parts.dtype)
        rec["key"], rec["o"] = keys[:, bi], ordinals
        parts.add((keys[:, bi] >> np.uint64(60)).astype(np.int64), rec)


def band_parts(folder: Path, bands: int) -> list[_Parts]:
    return [_Parts(folder, f"band{b:03d}", BAND_PARTS, np.dtype([("key", "<u8"), ("o", "<u8")]))
            for b in range(bands)]


def _validate(m) -> None:
    if m.ngram < 1 or m.num_perm < 1 or m.bands < 1 or m.num_perm % m.bands:
        raise LmforgeError(f"data.minhash: ngram ({m.ngram}) and bands ({m.bands}) must be >= 1 and "
                           f"num_perm ({m.num_perm}) a multiple of bands")
    if not 0 < m.threshold <= 1:
        raise LmforgeError(f"data.minhash.threshold must be in (0, 1], got {m.threshold}")


class Scan:
    """The documents to drop (by number in corpus order), why, and a report of the clusters."""

    def __init__(self, d: DataConfig, folder: Path, workers: int, decontaminate=None, defer_near: bool = False):
        """decontaminate: an eval.contamination.Decontaminator, whose hits are dropped too. defer_near (a task
        of many): signatures are computed but near-duplicates are left to the merge (export_near)."""
        self.d, self.folder, self.workers, self.decontaminate = d, folder, workers, decontaminate
        self.defer_near = defer_near
        self.file_ids: dict[str, int] = {}  # defer_near: each document's file, for the merge's examples
        self.cleaner = Cleaner(d.filters, d.pii)
        self.exact: ExactKeys | None = None  # made in run(), when the folder exists
        self.bands = band_parts(folder, d.minhash.bands)
        self.filtered_file = folder / "filtered.bin"
        self.contaminated_file = folder / "contaminated.bin"
        self.documents = 0
        self.counts = {"filtered": 0, "exact": 0, "near": 0, "contaminated": 0}
        self.clusters = 0
        self.examples: list[dict] = []
        self.drop = np.zeros(0, dtype=np.uint64)
        self.exact_drop = np.zeros(0, dtype=np.uint64)
        self._sig_rows = 0

    # --- scanning -------------------------------------------------------------------------
    def run(self, documents: Iterable[Document]) -> None:
        """Scan `documents`, the corpus in the order the tokenizing pass reads it."""
        d = self.d
        if d.near_dedup:
            _validate(d.minhash)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.exact = ExactKeys(self.folder)
        job = (d.minhash.ngram, d.minhash.num_perm, d.minhash.seed, d.minhash.bands)
        pool = None  # signatures cost about a quarter of reading: a pool pays only with cores to spare
        if d.near_dedup and self.workers >= POOL_MIN_WORKERS:
            pool = mp.get_context("spawn").Pool(self.workers - 1)
        try:
            inflight: deque = deque()
            for texts, ordinals in self._batches(documents):
                if not d.near_dedup:
                    continue
                if pool is None:
                    self._store(ordinals, _signature_job((texts, *job)))
                    continue
                inflight.append((ordinals, pool.apply_async(_signature_job, ((texts, *job),))))
                if len(inflight) >= 2 * self.workers:
                    o, r = inflight.popleft()
                    self._store(o, r.get())
            while inflight:
                o, r = inflight.popleft()
                self._store(o, r.get())
        finally:
            if pool is not None:
                pool.terminate()
        self._resolve()

    def _batches(self, documents: Iterable[Document]) -> Iterator[tuple[list[str], np.ndarray]]:
        """Cleaned texts with their numbers, in batches; records exact-dedup keys and filtered numbers."""
        d = self.d
        texts, ordinals, keys, size = [], [], [], 0
        filtered: list[int] = []
        wheres: list[str] = []
        ids: list[int] = []
        for n, doc in enumerate(documents):
            self.documents = n + 1
            if self.defer_near:
                ids.append(self.file_ids.setdefault(doc.source, len(self.file_ids)))
            text = self.cleaner(doc.text, doc.source) if self.cleaner.active else doc.text
            if text is None:
                filtered.append(n)
                continue
            raw = text.encode("utf-8")
            if d.dedup:
                keys.append(text_key(raw))
            texts.append(text)
            ordinals.append(n)
            if self.decontaminate is not None:
                wheres.append(f"{doc.source}:{doc.line}")
            size += len(raw)
            if size >= BATCH_BYTES:
                self._flush(ordinals, keys, filtered, ids)
                self._contaminated(texts, ordinals, wheres)
                yield texts, np.asarray(ordinals, dtype=np.uint64)
                texts, ordinals, keys, filtered, wheres, ids, size = [], [], [], [], [], [], 0
        self._flush(ordinals, keys, filtered, ids)
        self._contaminated(texts, ordinals, wheres)
        if texts:
            yield texts, np.asarray(ordinals, dtype=np.uint64)

    def _contaminated(self, texts: list[str], ordinals: list[int], wheres: list[str]) -> None:
        """data.decontaminate: records the documents that hold a window of an evaluation example."""
        dc = self.decontaminate
        if dc is None or not texts:
            return
        hits = dc.hits(texts)
        bad = np.flatnonzero(hits >= 0)
        if not len(bad):
            return
        with open(self.contaminated_file, "ab") as f:
            f.write(np.asarray(ordinals, dtype=np.uint64)[bad].tobytes())
        for i in bad[:max(0, EXAMPLES - len(dc.dropped))].tolist():
            task, where = dc.examples[int(hits[i])]
            dc.dropped.append({"document": wheres[i], "text": texts[i][:300], "task": task, "example": where})

    def _flush(self, ordinals: list[int], keys: list[bytes], filtered: list[int], ids: list[int]) -> None:
        if ids:
            with open(self.folder / "files.bin", "ab") as f:
                f.write(np.asarray(ids, dtype=np.uint32).tobytes())
        if filtered:
            with open(self.filtered_file, "ab") as f:
                f.write(np.asarray(filtered, dtype=np.uint64).tobytes())
        if keys:
            self.exact.add(np.frombuffer(b"".join(keys), dtype="<u8").reshape(-1, 2), ordinals)

    def _store(self, ordinals: np.ndarray, result: tuple) -> None:
        sig, has, keys = result
        with open(self.folder / "sig.bin", "ab") as f:
            f.write(sig[has].tobytes())
        with open(self.folder / "sig_ordinals.bin", "ab") as f:
            f.write(ordinals[has].tobytes())
        self._sig_rows += int(has.sum())
        if not self.defer_near:  # a task's merge makes the band keys of all tasks' signatures itself
            band_records(keys[has], ordinals[has], self.bands)

    # --- resolving ------------------------------------------------------------------------
    def _resolve(self) -> None:
        filtered = (np.fromfile(self.filtered_file, dtype=np.uint64) if self.filtered_file.exists()
                    else np.zeros(0, np.uint64))
        exact_drop = self.exact_drop = self.exact.duplicates() if self.d.dedup else np.zeros(0, np.uint64)
        near_drop = self._near(exact_drop) if self.d.near_dedup and not self.defer_near else np.zeros(0, np.uint64)
        contaminated = (np.fromfile(self.contaminated_file, dtype=np.uint64) if self.contaminated_file.exists()
                        else np.zeros(0, np.uint64))
        self.counts = {"filtered": len(filtered), "exact": len(exact_drop), "near": len(near_drop),
                       "contaminated": len(contaminated)}
        self.drop = np.unique(np.concatenate([filtered, exact_drop, near_drop, contaminated]))

    def _near(self, exact_drop: np.ndarray) -> np.ndarray:
        """Numbers of near-duplicates to drop (not counting exact duplicates already dropped)."""
        m = self.d.minhash
        if not self._sig_rows:
            return np.zeros(0, np.uint64)
        sig = np.memmap(self.folder / "sig.bin", dtype=np.uint32, mode="r", shape=(self._sig_rows, m.num_perm))
        sig_o = np.fromfile(self.folder / "sig_ordinals.bin", dtype=np.uint64)
        near, self.clusters, self.examples = near_duplicates(sig, sig_o, self.bands, m.threshold, exact_drop)
        return near

    def export_near(self, out: Path, sources: list[str]) -> None:
        """A task of many (data.num_tasks): what the merge needs to find near-duplicates across all tasks as
        one scan would: the signatures with their numbers, each number's file (an index into `sources`, the
        task's files in reading order), the exact duplicates found here, and the counts."""
        out.mkdir(parents=True, exist_ok=True)
        for name in ("sig.bin", "sig_ordinals.bin", "files.bin"):
            f = self.folder / name
            shutil.move(f, out / name) if f.exists() else (out / name).write_bytes(b"")
        self.exact_drop.tofile(out / "exact.bin")
        (out / "near.json").write_text(json.dumps({"documents": self.documents, "filtered": self.counts["filtered"],
                                                   "sources": sources}), encoding="utf-8")

    # --- the tokenizing pass ---------------------------------------------------------------
    def skipper(self) -> _Skipper:
        return _Skipper(self)

    def report(self) -> dict:
        m = self.d.minhash
        out = {"documents_scanned": self.documents, "exact_duplicates": self.counts["exact"],
               "near_dedup": self.d.near_dedup, "filtered": self.counts["filtered"]}
        if self.d.near_dedup:
            out.update({"near_duplicates": self.counts["near"], "clusters": self.clusters,
                        "minhash": {"ngram": m.ngram, "num_perm": m.num_perm, "bands": m.bands,
                                    "threshold": m.threshold, "seed": m.seed},
                        "example_pairs": self.examples})
        return out

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _Skipper:
    """Walks the sorted dropped numbers alongside the documents of a pass; fills in example texts."""

    def __init__(self, scan: Scan):
        self.scan, self.i, self.n = scan, 0, 0
        self.want: dict[int, list[tuple[dict, str]]] = {}
        for e in scan.examples:
            for k in ("kept", "dropped"):
                self.want.setdefault(e[k], []).append((e, k))

    def drops(self, doc: Document) -> bool:
        n, drop = self.n, self.scan.drop
        self.n += 1
        for e, k in self.want.get(n, ()):
            e[f"{k}_source"] = f"{doc.source}:{doc.line}"
            e[f"{k}_text"] = doc.text[:300]
        while self.i < len(drop) and drop[self.i] < n:
            self.i += 1
        return self.i < len(drop) and int(drop[self.i]) == n
