"""`lmforge prepare`: documents -> token ids in parallel -> RUN/data/{train,val}/ shards + manifest.

Documents are what `iter_documents` gives: a long text file is cut into documents of at most
`data.max_doc_bytes`, so a corpus of one file still has a validation split. With dedup (the default)
or near dedup on, a scan (data/dedup.py) first finds the documents to drop, on disk, filters included.
The main process then reads the documents again, skips those, applies the filters' line rules and
PII masking, and assigns each to train or val by a hash of its text (stable across reruns, machines
and worker counts). Batches of documents go to a pool of worker processes that tokenize them (in
tiktoken when data/fast_bpe.py proves it gives tokenizers' ids); results come back in submission
order and are streamed into shard files, so the output is byte-identical for any number of workers
and the corpus is never held in memory. Each split folder is built under a temporary name and
renamed into place; dedup.json and filters.json go beside them.

The manifest records, besides counts and the tokenizer's hash, `decoding`: every source file that
was not clean UTF-8, with the encoding used and the bytes replaced, so a user can audit it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from lmforge.config import Config, DataConfig
from lmforge.console import log, progress
from lmforge.data import fast_bpe
from lmforge.data.clean import Cleaner
from lmforge.data.dedup import Scan
from lmforge.data.shards import DTYPES, MANIFEST, ShardWriter, token_dtype
from lmforge.data.sources import SourceStats, count_source_bytes, iter_documents, key_fraction, text_key
from lmforge.errors import LmforgeError
from lmforge.io import AtomicDir, atomic_write_json
from lmforge.tokenizer import Tokenizer

SPLITS = ("train", "val")
BATCH_BYTES = 1 << 20  # text per worker job: large enough to amortise pickling, small enough to stream
BATCH_DOCS = 2048

_TOK: HFTokenizer | None = None  # the worker process's tokenizer
_ENC = None  # ... and its tiktoken twin, when prepare uses tiktoken
CHECK_BYTES = 32 << 10  # text of the corpus's start encoded by both encoders before trusting tiktoken


def _init_worker(tokenizer_json: str, tiktoken: bool = False) -> None:
    """Each worker tokenizes on one thread; the pool is the parallelism (no oversubscription)."""
    global _TOK, _ENC
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOK = HFTokenizer.from_str(tokenizer_json)
    _ENC = fast_bpe.build(_TOK) if tiktoken else None


def encode_docs(tok: HFTokenizer, texts: list[str], eot_id: int, dtype: str, bos_id: int | None = None,
                enc=None) -> np.ndarray:
    """Token ids of `texts`, each followed by the end-of-text id, as one flat array.

    With `bos_id` (tokenizers whose post-processor adds a BOS, as Llama's do) each document also
    starts with it, so training sees text the way that model family does. With `enc` (a tiktoken
    Encoding proven equal to `tok` by fast_bpe) the ids come from tiktoken.
    """
    if enc is not None:
        lists = fast_bpe.encode(enc, texts)
    else:
        lists = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    head = 0 if bos_id is None else 1
    out = np.empty(sum(map(len, lists)) + (1 + head) * len(lists), dtype=DTYPES[dtype])
    i = 0
    for ids in lists:
        if head:
            out[i] = bos_id
            i += 1
        out[i:i + len(ids)] = ids
        i += len(ids)
        out[i] = eot_id
        i += 1
    return out


def _encode_job(job: tuple[list[str], int, str, int | None]) -> np.ndarray:
    return encode_docs(_TOK, *job, enc=_ENC)


class _Pass:
    """One read-tokenize-write pass over the corpus into temporary split folders."""

    def __init__(self, cfg: Config, dtype: str, force: dict[bytes, str], scan: Scan | None = None, enc=None):
        self.cfg, self.dtype, self.force, self.scan, self.enc = cfg, dtype, dict(force), scan, enc
        self.cleaner = Cleaner(cfg.data.filters, cfg.data.pii)  # its counts matter only without a scan
        self.sources = SourceStats()
        self.docs = dict.fromkeys(SPLITS, 0)
        self.bytes = dict.fromkeys(SPLITS, 0)
        self.duplicates = 0
        self.min_key: bytes | None = None  # the documents a rerun may force into val / train
        self.max_key: bytes | None = None

    def batches(self) -> Iterator[tuple[str, list[str], int]]:
        """(split, texts, utf-8 bytes) batches in corpus order, after cleaning, dedup and the split decision."""
        d = self.cfg.data
        skip = self.scan.skipper() if self.scan is not None else None
        if self.scan is not None:
            self.duplicates = self.scan.counts["exact"]
        pending = {s: ([], 0) for s in SPLITS}
        for doc in iter_documents(d.sources, d.text_field, self.sources, d.max_doc_bytes):
            if skip is not None and skip.drops(doc):  # filtered or a duplicate, as the scan found
                continue
            text = self.cleaner(doc.text, doc.source) if self.cleaner.active else doc.text
            if text is None:
                continue
            doc.text = text
            raw = text.encode("utf-8")
            key = text_key(raw)
            split = self.force.pop(key, None) or ("val" if key_fraction(key) < d.val_fraction else "train")
            self.min_key = key if self.min_key is None else min(self.min_key, key)
            self.max_key = key if self.max_key is None else max(self.max_key, key)
            self.docs[split] += 1
            self.bytes[split] += len(raw)
            texts, size = pending[split]
            texts.append(doc.text)
            size += len(raw)
            if size >= BATCH_BYTES or len(texts) >= BATCH_DOCS:
                yield split, texts, size
                texts, size = [], 0
            pending[split] = (texts, size)
        for split, (texts, size) in pending.items():
            if texts:
                yield split, texts, size


@contextmanager
def _one_thread() -> Iterator[None]:
    """TOKENIZERS_PARALLELISM=false for the serial path, restoring the caller's setting after."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _tokenized(p: _Pass, tok: Tokenizer, workers: int) -> Iterator[tuple[str, np.ndarray, int]]:
    """(split, ids, utf-8 bytes) per batch, in corpus order whatever the number of workers."""
    bos = tok.bos_id if tok.add_bos else None
    if workers <= 1:
        with _one_thread():
            for split, texts, size in p.batches():
                yield split, encode_docs(tok.tok, texts, tok.eot_id, p.dtype, bos, p.enc), size
        return
    ctx = mp.get_context("spawn")  # fork is unsafe with rich's refresh thread and torch loaded
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.tok.to_str(), p.enc is not None)) as pool:
        inflight: deque = deque()  # bounded, so reading never runs far ahead of tokenizing
        for split, texts, size in p.batches():
            inflight.append((split, pool.apply_async(_encode_job, ((texts, tok.eot_id, p.dtype, bos),)), size))
            if len(inflight) >= 2 * workers:
                split, job, size = inflight.popleft()
                yield split, job.get(), size
        while inflight:
            split, job, size = inflight.popleft()
            yield split, job.get(), size


def _run_pass(p: _Pass, tok: Tokenizer, tmps: dict[str, Path], workers: int, total_mb: float) -> dict:
    """Stream the tokenized batches of `p` into one ShardWriter per split, with a progress bar."""
    writers = {s: ShardWriter(tmps[s], p.dtype, p.cfg.data.shard_tokens) for s in SPLITS}
    t0, done = time.perf_counter(), 0
    try:
        with progress("tokenizing", total_mb, "") as advance:
            for split, ids, size in _tokenized(p, tok, workers):
                writers[split].write(ids)
                done += size
                dt = max(time.perf_counter() - t0, 1e-9)
                tokens = writers["train"].tokens + writers["val"].tokens
                advance(size / 1e6, f"MB  {done / 1e6 / dt:.1f} MB/s  {tokens / dt / 1e3:,.0f}k tok/s")
    finally:  # also on errors: no open handles left in the folder AtomicDir deletes
        for w in writers.values():
            w.close()
    return {"writers": writers, "seconds": time.perf_counter() - t0}


def _clear(d: Path) -> None:
    for f in d.iterdir():
        f.unlink()


def choose_encoder(tok: HFTokenizer, d: DataConfig) -> tuple[object | None, fast_bpe.Choice]:
    """tiktoken when `data.encoder` allows it and it gives tokenizers' ids, on the probe and on the
    corpus's first `CHECK_BYTES`; else tokenizers. `data.encoder=tiktoken` makes a refusal an error."""
    if d.encoder == "tokenizers":
        return None, fast_bpe.Choice("tokenizers", "data.encoder=tokenizers")
    enc, choice = fast_bpe.convert(tok)
    if enc is not None:
        sample, size = [], 0
        for doc in iter_documents(d.sources, d.text_field, SourceStats(), d.max_doc_bytes):
            sample.append(doc.text)
            size += len(doc.text)
            if size >= CHECK_BYTES:
                break
        bad = fast_bpe.same_ids(enc, tok, sample)
        if bad is not None:
            enc, choice = None, fast_bpe.Choice("tokenizers", f"tiktoken ids differ on the corpus at {bad[:60]!r}")
    if enc is None and d.encoder == "tiktoken":
        raise LmforgeError(f"data.encoder=tiktoken, but {choice.reason}; use data.encoder=auto or tokenizers")
    return enc, choice


def _scan(cfg: Config, workers: int, data_dir: Path) -> Scan | None:
    """The dedup/filter scan before tokenizing (exact dedup on disk, near dedup), or None if neither is on."""
    d = cfg.data
    if not (d.dedup or d.near_dedup):
        return None
    scan = Scan(d, data_dir / f".scan-{os.getpid()}", workers)
    t0 = time.perf_counter()
    try:
        scan.run(SourceStats())
    except BaseException:
        scan.close()
        raise
    scan.seconds = time.perf_counter() - t0
    return scan


def _write_reports(data_dir: Path, p: _Pass, scan: Scan | None) -> dict:
    """dedup.json and filters.json beside the split folders; returns the summary's view of them."""
    cleaner = scan.cleaner if scan is not None else p.cleaner
    out: dict = {}
    if scan is not None:
        rep = scan.report()  # no timings in it: the data folder is byte-identical across reruns
        atomic_write_json(data_dir / "dedup.json", rep)
        out["near_duplicates_dropped"] = rep.get("near_duplicates", 0)
        out["scan_seconds"] = round(scan.seconds, 3)
    if cleaner.active:
        rep = cleaner.report()
        atomic_write_json(data_dir / "filters.json", rep)
        out["filtered"] = {k: {"documents": v["documents"], "bytes": v["bytes"]} for k, v in rep["filters"].items()}
        if rep["pii"] is not None:
            out["pii_masked"] = rep["pii"]
    return out


def prepare(cfg: Config) -> dict:
    """Tokenize `cfg.data.sources` with RUN/tokenizer into RUN/data/{train,val}; return a summary.

    Every document is followed by eot_id. Validation documents are those whose text hash falls
    below `val_fraction`; with at least two documents, one is forced into val (and one into train)
    if the hash gave none, by a second pass, since small corpora would otherwise have no val split.
    """
    d = cfg.data
    run = Path(cfg.run_dir)
    tok = Tokenizer.load(run / "tokenizer")
    if not d.sources:
        raise LmforgeError("data.sources is empty: list the files, folders or globs to tokenize")
    if d.workers < 0:
        raise LmforgeError(f"data.workers must be >= 0 (0: all cores), got {d.workers}")
    workers = d.workers or os.cpu_count() or 1
    dtype = token_dtype(tok.vocab_size)
    total_mb = count_source_bytes(d.sources) / 1e6
    data_dir = run / "data"

    enc, choice = choose_encoder(tok.tok, d)
    log(f"[dim]prepare encodes with {choice.name} ({choice.reason})[/dim]")
    data_dir.mkdir(parents=True, exist_ok=True)
    scan = _scan(cfg, workers, data_dir)
    dirs = {s: AtomicDir(data_dir / s) for s in SPLITS}
    tmps = {s: dirs[s].__enter__() for s in SPLITS}
    try:
        p = _Pass(cfg, dtype, {}, scan, enc)
        res = _run_pass(p, tok, tmps, workers, total_mb)
        n = p.docs["train"] + p.docs["val"]
        if n == 0:
            raise LmforgeError(f"no documents in {', '.join(d.sources)}: every file is empty or "
                               "whitespace" + (" or binary" if p.sources.skipped_files else ""))
        force = {}
        if p.docs["train"] == 0:  # every document hashed into val (a tiny corpus)
            force[p.max_key] = "train"
        if d.val_fraction > 0 and n >= 2 and p.docs["val"] == 0:
            force[p.min_key] = "val"
        if force:
            log(f"[dim]the hash split left {'train' if p.docs['train'] == 0 else 'val'} empty; "
                "assigning one document explicitly (second pass)[/dim]")
            for s in SPLITS:
                _clear(tmps[s])
            p = _Pass(cfg, dtype, force, scan, enc)
            res = _run_pass(p, tok, tmps, workers, total_mb)
        writers, seconds = res["writers"], res["seconds"]
        cleaning = _write_reports(data_dir, p, scan)
        seconds += cleaning.get("scan_seconds", 0.0)
        summary: dict = {"workers": workers, "seconds": round(seconds, 3), "encoder": choice.name,
                         "duplicates_dropped": p.duplicates, "skipped_files": p.sources.skipped_files,
                         "decoding": p.sources.decoding, **cleaning}
        for s in SPLITS:
            w = writers[s]
            manifest = {
                "dtype": dtype, "tokens": w.tokens, "documents": p.docs[s], "bytes": p.bytes[s],
                "shards": w.shards, "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id, "max_token_id": w.max_id, "sources": list(d.sources),
                "text_field": d.text_field, "duplicates_dropped": p.duplicates,
                "skipped_files": p.sources.skipped_files, "files": p.sources.files, "split": s,
                "val_fraction": d.val_fraction, "max_doc_bytes": d.max_doc_bytes,
                "decoding": p.sources.decoding, "tokenizer": str(run / "tokenizer"),
                "encoder": choice.name, **{k: v for k, v in cleaning.items() if k != "scan_seconds"},
            }
            atomic_write_json(tmps[s] / MANIFEST, manifest)
            summary[s] = {"tokens": w.tokens, "documents": p.docs[s], "bytes": p.bytes[s],
                          "shards": len(w.shards)}
    except BaseException as e:
        for s in SPLITS:
            dirs[s].__exit__(type(e), e, e.__traceback__)
        raise
    finally:
        if scan is not None:
            scan.close()
    dirs["train"].__exit__(None, None, None)
    if p.docs["val"]:
        dirs["val"].__exit__(None, None, None)
    else:  # no val documents (val_fraction=0 or a single document): no val folder, not a stale one
        shutil.rmtree(tmps["val"], ignore_errors=True)
        if (data_dir / "val").exists():
            old = data_dir / f".val.old-{os.getpid()}"
            os.replace(data_dir / "val", old)
            shutil.rmtree(old, ignore_errors=True)
    tokens = summary["train"]["tokens"] + summary["val"]["tokens"]
    nbytes = summary["train"]["bytes"] + summary["val"]["bytes"]
    summary["tokens_per_s"] = round(tokens / max(seconds, 1e-9))
    summary["mb_per_s"] = round(nbytes / 1e6 / max(seconds, 1e-9), 3)
    summary["bytes_per_token"] = round(nbytes / max(tokens, 1), 4)
    log(f"prepare: train {summary['train']['tokens']:,} tokens ({summary['train']['documents']:,} docs), "
        f"val {summary['val']['tokens']:,} tokens ({summary['val']['documents']:,} docs); "
        f"{p.duplicates:,} duplicates dropped"
        + (f", {summary['near_duplicates_dropped']:,} near-duplicates" if d.near_dedup else "")
        + f"; {summary['mb_per_s']:.1f} MB/s, "
        f"{summary['tokens_per_s']:,} tokens/s on {workers} worker(s) -> {data_dir}")
    return summary
