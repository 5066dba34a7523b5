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
renamed into place; dedup.json (near dedup) and filters.json go beside them.

The manifest records, besides counts and the tokenizer's hash, `decoding`: every source file that
was not clean UTF-8, with the encoding used and the bytes replaced, so a user can audit it.
"""

from __future__ import annotations

import itertools
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

from lmforge.config import Config, ConfigError, DataConfig
from lmforge.console import log, progress
from lmforge.data import fast_bpe
from lmforge.data.adopt import adopt, token_files
from lmforge.data.clean import Cleaner
from lmforge.data.dedup import Scan
from lmforge.data.mixture import SourceSpec, is_mixture, mixture_weights, parse_sources, source_path
from lmforge.data.shards import DTYPES, MANIFEST, ShardWriter, token_dtype
from lmforge.data.sources import (
    Document,
    SourceStats,
    count_source_bytes,
    iter_documents,
    key_fraction,
    read_files,
    text_key,
)
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
    return encode_docs_lengths(tok, texts, eot_id, dtype, bos_id, enc)[0]


def encode_docs_lengths(tok: HFTokenizer, texts: list[str], eot_id: int, dtype: str,
                        bos_id: int | None = None, enc=None) -> tuple[np.ndarray, np.ndarray]:
    """`encode_docs`, and each document's token count (its end-of-text included)."""
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
    return out, np.fromiter((len(ids) + 1 + head for ids in lists), dtype=np.int64, count=len(lists))


def _encode_job(job: tuple[list[str], int, str, int | None]) -> tuple[np.ndarray, np.ndarray]:
    return encode_docs_lengths(_TOK, *job, enc=_ENC)


def corpus_documents(d: DataConfig, groups: list[tuple[str, list]], files: list[tuple[int, Path, bool]] | None,
                     stats: SourceStats) -> Iterator[tuple[int, Document]]:
    """(group, document) in corpus order: the groups as listed, each group's sources as `iter_documents`
    reads them; or, for a task of many, its slice `files` ((group, path, strict)). The dedup scan and the
    tokenizing pass both read through here, so they number the documents alike."""
    if files is not None:
        for g, run in itertools.groupby(files, key=lambda f: f[0]):
            for doc in read_files([(path, strict) for _, path, strict in run], d.text_field, stats,
                                  d.max_doc_bytes, d.filter):
                yield g, doc
        return
    for g, (_, paths) in enumerate(groups):
        for doc in iter_documents(paths, d.text_field, stats, d.max_doc_bytes, d.filter):
            yield g, doc


class _Pass:
    """One read-tokenize-write pass over the corpus into temporary split folders."""

    def __init__(self, cfg: Config, dtype: str, force: dict[bytes, str], groups: list[tuple[str, list]],
                 files: list[tuple[int, Path, bool]] | None = None, scan: Scan | None = None, enc=None):
        self.cfg, self.dtype, self.force, self.scan, self.enc = cfg, dtype, dict(force), scan, enc
        self.cleaner = Cleaner(cfg.data.filters, cfg.data.pii)  # its counts matter only without a scan
        self.groups = groups  # (name, paths): one unnamed group of everything, or a mixture's sources
        self.files = files  # (group, path, strict): a slice of the corpus (data.num_tasks), else all of it
        self.record: dict | None = None  # {(split, group): [(ordinal, key, bytes, scan number)]} of each kept
        self.lengths: dict = {}  # {(split, group): [tokens per document, per batch]} when recording
        self.sources = SourceStats()
        self.docs = {(s, g): 0 for s in SPLITS for g in range(len(groups))}
        self.bytes = dict.fromkeys(self.docs, 0)
        self.duplicates = 0
        self.min_key: list[bytes | None] = [None] * len(groups)  # per group, the documents a rerun may
        self.max_key: list[bytes | None] = [None] * len(groups)  # force into val / train

    def split_docs(self, split: str) -> int:
        return sum(n for (s, _), n in self.docs.items() if s == split)

    def split_bytes(self, split: str) -> int:
        return sum(n for (s, _), n in self.bytes.items() if s == split)

    def documents(self) -> Iterator[tuple[int, Document]]:
        return corpus_documents(self.cfg.data, self.groups, self.files, self.sources)

    def batches(self) -> Iterator[tuple[str, int, list[str], int]]:
        """(split, group, texts, utf-8 bytes) batches in corpus order, after cleaning, dedup and the split
        decision. The scan (dedup.Scan, run before the pass whenever dedup or decontamination is on) decided
        what to drop; a task of many dedups within its slice so, and the merge drops duplicates between tasks."""
        d = self.cfg.data
        skip = self.scan.skipper() if self.scan is not None else None
        if self.scan is not None:
            self.duplicates = self.scan.counts["exact"]
        pending = {k: ([], 0) for k in self.docs}
        for g, doc in self.documents():
            if skip is not None and skip.drops(doc):  # filtered or a duplicate, as the scan found
                continue
            if self.cleaner.active:
                text = self.cleaner(doc.text, doc.source)
                if text is None:
                    continue
                doc.text = text
            raw = doc.text.encode("utf-8")
            key = text_key(raw)
            split = self.force.pop(key, None) or ("val" if key_fraction(key) < d.val_fraction else "train")
            lo, hi = self.min_key[g], self.max_key[g]
            self.min_key[g] = key if lo is None else min(lo, key)
            self.max_key[g] = key if hi is None else max(hi, key)
            if self.record is not None:
                self.record.setdefault((split, g), []).append(
                    (sum(self.docs.values()), key, len(raw), skip.n - 1 if skip is not None else -1))
            self.docs[split, g] += 1
            self.bytes[split, g] += len(raw)
            texts, size = pending[split, g]
            texts.append(doc.text)
            size += len(raw)
            if size >= BATCH_BYTES or len(texts) >= BATCH_DOCS:
                yield split, g, texts, size
                texts, size = [], 0
            pending[split, g] = (texts, size)
        for (split, g), (texts, size) in pending.items():
            if texts:
                yield split, g, texts, size


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


def _tokenized(p: _Pass, tok: Tokenizer, workers: int) -> Iterator[tuple[str, int, np.ndarray, np.ndarray, int]]:
    """(split, group, ids, tokens per document, utf-8 bytes) per batch, in corpus order whatever the
    number of workers."""
    bos = tok.bos_id if tok.add_bos else None
    if workers <= 1:
        with _one_thread():
            for split, g, texts, size in p.batches():
                yield split, g, *encode_docs_lengths(tok.tok, texts, tok.eot_id, p.dtype, bos, p.enc), size
        return
    ctx = mp.get_context("spawn")  # fork is unsafe with rich's refresh thread and torch loaded
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.tok.to_str(), p.enc is not None)) as pool:
        inflight: deque = deque()  # bounded, so reading never runs far ahead of tokenizing
        for split, g, texts, size in p.batches():
            job = pool.apply_async(_encode_job, ((texts, tok.eot_id, p.dtype, bos),))
            inflight.append((split, g, job, size))
            if len(inflight) >= 2 * workers:
                split, g, job, size = inflight.popleft()
                yield split, g, *job.get(), size
        while inflight:
            split, g, job, size = inflight.popleft()
            yield split, g, *job.get(), size


def open_writers(p: _Pass, tmps: dict[str, Path]) -> dict[tuple[str, int], ShardWriter]:
    """A ShardWriter per split and group; a mixture's sources write into a folder each, named after it."""
    writers = {}
    for split, g in p.docs:
        name = p.groups[g][0]
        folder = tmps[split] / name if name else tmps[split]
        folder.mkdir(exist_ok=True)
        writers[split, g] = ShardWriter(folder, p.dtype, p.cfg.data.shard_tokens)
    return writers


def _run_pass(p: _Pass, tok: Tokenizer, tmps: dict[str, Path], workers: int, total_mb: float) -> dict:
    """Stream the tokenized batches of `p` into one ShardWriter per split (and mixture source), with a
    progress bar. A mixture's sources write into a folder each, named after the source."""
    writers = open_writers(p, tmps)
    t0, done = time.perf_counter(), 0
    try:
        with progress("tokenizing", total_mb, "") as advance:
            for split, g, ids, lengths, size in _tokenized(p, tok, workers):
                writers[split, g].write(ids)
                if p.record is not None:
                    p.lengths.setdefault((split, g), []).append(lengths)
                done += size
                dt = max(time.perf_counter() - t0, 1e-9)
                tokens = sum(w.tokens for w in writers.values())
                advance(size / 1e6, f"MB  {done / 1e6 / dt:.1f} MB/s  {tokens / dt / 1e3:,.0f}k tok/s")
    finally:  # also on errors: no open handles left in the folder AtomicDir deletes
        for w in writers.values():
            w.close()
    return {"writers": writers, "seconds": time.perf_counter() - t0}


def _clear(d: Path) -> None:
    for f in d.iterdir():
        shutil.rmtree(f) if f.is_dir() else f.unlink()


def source_groups(d) -> tuple[list[tuple[str, list]], list[SourceSpec] | None]:
    """The document groups of `data.sources`: one of everything (a plain list), or one per mixture source."""
    if not is_mixture(d.sources):
        return [("", list(d.sources))], None
    specs = parse_sources(d.sources)
    for i, sp in enumerate(specs):
        if token_files([sp.path]):
            raise ConfigError(f"data.sources[{i}].path: {sp.path} holds token files (.bin, HDF5); a mixture "
                              "tokenizes text sources, and token files are adopted only as a plain list",
                              f"data.sources[{i}].path")
    return [(s.name, [s.path]) for s in specs], specs


def _split_manifest(p: _Pass, split: str, writers: dict, specs: list[SourceSpec] | None, weights: list[float],
                    base: dict) -> dict:
    """A split's manifest: its shards, and with a mixture each source's shards (files `<name>/shard_*`),
    token counts and weight."""
    parts = [(g, writers[split, g]) for g in range(len(p.groups))]
    shards, mixture = [], []
    for g, w in parts:
        name = p.groups[g][0]
        for sh in w.shards:
            shards.append({"file": f"{name}/{sh['file']}", "tokens": sh["tokens"], "source": name}
                          if name else sh)
        if specs is not None:
            sp = specs[g]
            mixture.append({"name": name, "path": sp.path, "weight": weights[g], "weight_given": sp.weight,
                            "epochs": sp.epochs, "tokens": w.tokens, "documents": p.docs[split, g],
                            "bytes": p.bytes[split, g]})
    m = {**base, "tokens": sum(w.tokens for _, w in parts), "documents": p.split_docs(split),
         "bytes": p.split_bytes(split), "shards": shards,
         "max_token_id": max(w.max_id for _, w in parts), "split": split}
    if specs is not None:
        m["mixture"] = mixture
    return m


def forced_splits(p: _Pass, specs: list[SourceSpec] | None) -> dict[bytes, str]:
    """The documents a second pass assigns explicitly, so that each group has train and (with two or more
    documents) val documents: {key: split}."""
    force = {}
    for g, (name, _) in enumerate(p.groups):
        n = p.docs["train", g] + p.docs["val", g]
        if specs and n == 0:
            raise LmforgeError(f"data.sources[{g}] ({name}): no documents left in {specs[g].path} (empty, "
                               "binary or every document a duplicate of an earlier source's)")
        if n and p.docs["train", g] == 0:  # every document hashed into val (a tiny corpus)
            force[p.max_key[g]] = "train"
        if p.cfg.data.val_fraction > 0 and n >= 2 and p.docs["val", g] == 0:
            force[p.min_key[g]] = "val"
    return force


def choose_encoder(tok: HFTokenizer, d: DataConfig) -> tuple[object | None, fast_bpe.Choice]:
    """tiktoken when `data.encoder` allows it and it gives tokenizers' ids, on the probe and on the
    corpus's first `CHECK_BYTES`; else tokenizers. `data.encoder=tiktoken` makes a refusal an error."""
    if d.encoder == "tokenizers":
        return None, fast_bpe.Choice("tokenizers", "data.encoder=tokenizers")
    enc, choice = fast_bpe.convert(tok)
    if enc is not None:
        sample, size = [], 0
        for doc in iter_documents([source_path(e) for e in d.sources], d.text_field, SourceStats(), d.max_doc_bytes,
                                  d.filter):
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


def _scan(cfg: Config, workers: int, data_dir: Path, groups: list[tuple[str, list]], tok: Tokenizer,
          enc=None, files: list[tuple[int, Path, bool]] | None = None, defer_near: bool = False) -> Scan | None:
    """The dedup/filter scan before tokenizing (exact dedup on disk, near dedup, data.decontaminate), or None
    if none is on. It reads the documents in the order the tokenizing pass will."""
    d = cfg.data
    if not (d.dedup or d.near_dedup or d.decontaminate):
        return None
    decontaminate = None
    if d.decontaminate:
        from lmforge.eval.contamination import Decontaminator

        decontaminate = Decontaminator(d.decontaminate, cfg.run_dir, tok, cfg.eval.ngram, enc)
        log(f"[dim]data.decontaminate: training documents holding a {cfg.eval.ngram}-token window of "
            f"{len(decontaminate.examples)} evaluation examples ({', '.join(decontaminate.tasks)}) are dropped[/dim]")
    scan = Scan(d, data_dir / f".scan-{os.getpid()}", workers, decontaminate, defer_near)
    t0 = time.perf_counter()
    try:
        scan.run(doc for _, doc in corpus_documents(d, groups, files, SourceStats()))
    except BaseException:
        scan.close()
        raise
    scan.seconds = time.perf_counter() - t0
    return scan


def _write_reports(data_dir: Path, p: _Pass, scan: Scan | None) -> dict:
    """dedup.json and filters.json beside the split folders; returns the summary's view of them."""
    cleaner = scan.cleaner if scan is not None else p.cleaner
    out: dict = {}
    for stale in ("dedup.json", "filters.json", "decontamination.json"):  # an earlier prepare's, other settings
        (data_dir / stale).unlink(missing_ok=True)
    if scan is not None:
        out["scan_seconds"] = round(scan.seconds, 3)
    if scan is not None and scan.decontaminate is not None:
        atomic_write_json(data_dir / "decontamination.json", scan.decontaminate.report(scan.counts["contaminated"]))
        out["contaminated_dropped"] = scan.counts["contaminated"]
    if scan is not None and p.cfg.data.near_dedup:  # exact duplicates alone are the manifest's duplicates_dropped
        rep = scan.report()  # no timings in it: the data folder is byte-identical across reruns
        atomic_write_json(data_dir / "dedup.json", rep)
        out["near_duplicates_dropped"] = rep.get("near_duplicates", 0)
    if cleaner.active:
        out.update(write_filter_report(data_dir, cleaner.report()))
    return out


def write_filter_report(data_dir: Path, rep: dict) -> dict:
    """filters.json beside the split folders; returns the summary's (and manifest's) view of it."""
    atomic_write_json(data_dir / "filters.json", rep)
    out: dict = {"filtered": {k: {"documents": v["documents"], "bytes": v["bytes"]} for k, v in rep["filters"].items()}}
    if rep["pii"] is not None:
        out["pii_masked"] = rep["pii"]
    return out


def prepare(cfg: Config) -> dict:
    """Tokenize `cfg.data.sources` with RUN/tokenizer into RUN/data/{train,val}; return a summary.

    Every document is followed by eot_id. Validation documents are those whose text hash falls
    below `val_fraction`; with at least two documents, one is forced into val (and one into train)
    if the hash gave none, by a second pass, since small corpora would otherwise have no val split.
    In a mixture that holds for each source, so each has its own validation loss.
    """
    d = cfg.data
    run = Path(cfg.run_dir)
    if not d.sources:
        raise LmforgeError("data.sources is empty: list the files, folders or globs to tokenize")
    adopted = token_files(d.sources)
    if adopted:  # nanoGPT .bin / HDF5 token files: already tokens
        return adopt(cfg, adopted)
    groups, specs = source_groups(d)
    tok = Tokenizer.load(run / "tokenizer")
    if d.workers < 0:
        raise LmforgeError(f"data.workers must be >= 0 (0: all cores), got {d.workers}")
    workers = d.workers or os.cpu_count() or 1
    dtype = token_dtype(tok.vocab_size)
    paths = [source_path(e) for e in d.sources]
    total_mb = count_source_bytes(paths) / 1e6
    data_dir = run / "data"

    enc, choice = choose_encoder(tok.tok, d)
    log(f"[dim]prepare encodes with {choice.name} ({choice.reason})[/dim]")
    data_dir.mkdir(parents=True, exist_ok=True)
    scan = _scan(cfg, workers, data_dir, groups, tok, enc)
    dirs = {s: AtomicDir(data_dir / s) for s in SPLITS}
    tmps = {s: dirs[s].__enter__() for s in SPLITS}
    try:
        p = _Pass(cfg, dtype, {}, groups, scan=scan, enc=enc)
        res = _run_pass(p, tok, tmps, workers, total_mb)
        if p.split_docs("train") + p.split_docs("val") == 0:
            raise LmforgeError(f"no documents in {', '.join(paths)}: every file is empty or "
                               "whitespace" + (" or binary" if p.sources.skipped_files else ""))
        force = forced_splits(p, specs)
        if force:
            log("[dim]the hash split left a split empty; assigning one document explicitly (second pass)[/dim]")
            for s in SPLITS:
                _clear(tmps[s])
            p = _Pass(cfg, dtype, force, groups, scan=scan, enc=enc)
            res = _run_pass(p, tok, tmps, workers, total_mb)
        writers, seconds = res["writers"], res["seconds"]
        cleaning = _write_reports(data_dir, p, scan)
        seconds += cleaning.get("scan_seconds", 0.0)
        summary: dict = {"workers": workers, "seconds": round(seconds, 3), "encoder": choice.name,
                         "duplicates_dropped": p.duplicates, "skipped_files": p.sources.skipped_files,
                         "decoding": p.sources.decoding, **cleaning}
        extra = {"encoder": choice.name, **{k: v for k, v in cleaning.items() if k != "scan_seconds"}}
        weights = write_manifests(p, tok, writers, specs, tmps, summary, extra)
    except BaseException as e:
        for s in SPLITS:
            dirs[s].__exit__(type(e), e, e.__traceback__)
        raise
    finally:
        if scan is not None:
            scan.close()
    finish_dirs(dirs, tmps, data_dir, p.split_docs("val") > 0)
    return report(summary, p, specs, weights, seconds, workers, data_dir)


def write_manifests(p: _Pass, tok: Tokenizer, writers: dict, specs: list[SourceSpec] | None,
                    tmps: dict[str, Path], summary: dict, extra: dict | None = None) -> list[float]:
    """Each split's manifest into its folder; the counts go to `summary`. Returns the mixture's weights."""
    d, run = p.cfg.data, Path(p.cfg.run_dir)
    weights = mixture_weights(specs, [writers["train", g].tokens for g in range(len(p.groups))]) if specs else []
    base = {"dtype": p.dtype, "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "sources": list(d.sources), "text_field": d.text_field, "duplicates_dropped": p.duplicates,
            "skipped_files": p.sources.skipped_files, "files": p.sources.files,
            "val_fraction": d.val_fraction, "max_doc_bytes": d.max_doc_bytes,
            "decoding": p.sources.decoding, "tokenizer": str(run / "tokenizer"), **(extra or {})}
    for s in SPLITS:
        manifest = _split_manifest(p, s, writers, specs, weights, base)
        atomic_write_json(tmps[s] / MANIFEST, manifest)
        summary[s] = {"tokens": manifest["tokens"], "documents": manifest["documents"],
                      "bytes": manifest["bytes"], "shards": len(manifest["shards"])}
        if specs:
            summary[s]["mixture"] = {m["name"]: m["tokens"] for m in manifest["mixture"]}
    return weights


def finish_dirs(dirs: dict[str, AtomicDir], tmps: dict[str, Path], data_dir: Path, has_val: bool) -> None:
    """Rename the built split folders into place; with no val documents, no val folder (not a stale one)."""
    dirs["train"].__exit__(None, None, None)
    if has_val:
        dirs["val"].__exit__(None, None, None)
        return
    shutil.rmtree(tmps["val"], ignore_errors=True)
    if (data_dir / "val").exists():
        old = data_dir / f".val.old-{os.getpid()}"
        os.replace(data_dir / "val", old)
        shutil.rmtree(old, ignore_errors=True)


def report(summary: dict, p: _Pass, specs: list[SourceSpec] | None, weights: list[float], seconds: float,
           workers: int, data_dir: Path) -> dict:
    """Rates into `summary`, and the one line that says what was prepared."""
    groups = p.groups
    tokens = summary["train"]["tokens"] + summary["val"]["tokens"]
    nbytes = summary["train"]["bytes"] + summary["val"]["bytes"]
    summary["tokens_per_s"] = round(tokens / max(seconds, 1e-9))
    summary["mb_per_s"] = round(nbytes / 1e6 / max(seconds, 1e-9), 3)
    summary["bytes_per_token"] = round(nbytes / max(tokens, 1), 4)
    mix = ""
    if specs:
        mix = "; mixture " + ", ".join(f"{m} {w:.3f}" for m, w in zip([g[0] for g in groups], weights, strict=True))
    log(f"prepare: train {summary['train']['tokens']:,} tokens ({summary['train']['documents']:,} docs), "
        f"val {summary['val']['tokens']:,} tokens ({summary['val']['documents']:,} docs); "
        f"{p.duplicates:,} duplicates dropped"
        + (f", {summary['near_duplicates_dropped']:,} near-duplicates" if p.cfg.data.near_dedup else "")
        + (f", {summary['contaminated_dropped']:,} holding evaluation examples" if p.cfg.data.decontaminate else "")
        + f"; {summary['mb_per_s']:.1f} MB/s, "
        f"{summary['tokens_per_s']:,} tokens/s on {workers} worker(s) -> {data_dir}{mix}")
    return summary
