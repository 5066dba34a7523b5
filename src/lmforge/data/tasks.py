"""`prepare` on many machines: each task tokenizes a slice of the corpus, one merge writes the result.

With `data.num_tasks=N`, task `data.task_index=i` takes a contiguous run of the corpus's files (the
file list of every source in reading order, cut into N runs of about equal bytes) and writes, under
RUN/data/tasks/task_<i>-of-<N>/, its token shards and an index of its documents: corpus position,
text hash, UTF-8 bytes and tokens of each. It drops the exact duplicates it sees itself (prepare's
scan, hashes in partition files on disk), but leaves the train/val assignment of its documents to the
merge.

`lmforge prepare --merge data.num_tasks=N` (or `data.merge=true`) reads the N indexes in corpus
order and repeats exactly what one `prepare` decides: the first copy of a text wins (across tasks
too, found through the same partitioned hashes on disk, dedup.ExactKeys), the hash picks the split,
and a group left without train or val documents gets one assigned as `prepare`'s second pass does.
It copies the kept documents' tokens into RUN/data/{train,val} shards of `data.shard_tokens`, so token
ids, document order, splits, dedup and even the shard files are those of a single-task run, whatever N.
The task folders are removed once the merge is done.

Every task must see the same files (a shared file system) and the same config; the merge checks a
fingerprint of both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from lmforge.config import Config, ConfigError
from lmforge.console import log
from lmforge.data.adopt import token_files
from lmforge.data.clean import merge_reports
from lmforge.data.dedup import ExactKeys, band_keys, band_parts, band_records, near_duplicates
from lmforge.data.prepare import (
    SPLITS,
    _Pass,
    _run_pass,
    _scan,
    choose_encoder,
    finish_dirs,
    forced_splits,
    open_writers,
    report,
    source_groups,
    write_filter_report,
    write_manifests,
)
from lmforge.data.shards import DTYPES, MANIFEST, token_dtype
from lmforge.data.sources import SourceStats, key_fraction, read_files, resolve_sources
from lmforge.errors import LmforgeError
from lmforge.io import AtomicDir, atomic_write_json
from lmforge.tokenizer import Tokenizer

TASKS = "tasks"
NEAR = "near"  # a task's signatures for the merge's near-dedup (dedup.Scan.export_near)
FILTERS = "filters.json"  # a task's filter report (clean.Cleaner.report), summed by the merge


def check_tasks(cfg: Config) -> None:
    d = cfg.data
    if d.num_tasks < 1:
        raise ConfigError(f"data.num_tasks must be at least 1, got {d.num_tasks}", "data.num_tasks")
    if d.decontaminate and d.num_tasks > 1:
        raise ConfigError("data.decontaminate runs in the one-machine prepare (its scan); with data.num_tasks > 1 "
                          "set data.num_tasks=1, or decontaminate later: `lmforge eval contamination` flags the "
                          "examples and eval.exclude_contaminated=true scores the clean ones", "data.decontaminate")
    if not 0 <= d.task_index < d.num_tasks:
        raise ConfigError(f"data.task_index must be in 0..{d.num_tasks - 1} (data.num_tasks={d.num_tasks}), "
                          f"got {d.task_index}", "data.task_index")


def task_dir(cfg: Config, index: int) -> Path:
    return cfg.run_path / "data" / TASKS / f"task_{index:05d}-of-{cfg.data.num_tasks:05d}"


def corpus_files(groups: list[tuple[str, list]]) -> list[tuple[int, Path, bool]]:
    """(group, file, strict) of the whole corpus in reading order, as one `prepare` reads it."""
    return [(g, path, strict) for g, (_, paths) in enumerate(groups) for path, strict in resolve_sources(paths)]


def _size(p: Path) -> int:
    """A file's size; 0 for what is not a local file (a Hub dataset)."""
    return p.stat().st_size if p.is_file() else 0


def task_slice(files: list[tuple[int, Path, bool]], index: int, num_tasks: int) -> list[tuple[int, Path, bool]]:
    """Task `index`'s contiguous run of `files`: cut where the running size passes k/num_tasks of the total."""
    sizes = np.array([max(_size(p), 1) for _, p, _ in files], dtype=np.float64)
    ends = np.cumsum(sizes)
    total = ends[-1] if len(ends) else 0.0
    starts = ends - sizes  # bytes before each file; a file goes to the task its first byte falls in
    owner = np.minimum((starts * num_tasks // max(total, 1)).astype(np.int64), num_tasks - 1)
    return [f for f, o in zip(files, owner, strict=True) if o == index]


def _fingerprint(cfg: Config, tok: Tokenizer, files: list[tuple[int, Path, bool]]) -> str:
    """What every task and the merge must agree on: the settings that change the result, and the files."""
    d = cfg.data
    what = {"sources": d.sources, "text_field": d.text_field, "filter": d.filter, "val_fraction": d.val_fraction,
            "dedup": d.dedup, "max_doc_bytes": d.max_doc_bytes, "filters": dataclasses.asdict(d.filters),
            "pii": d.pii, "num_tasks": d.num_tasks, "tokenizer": tok.hash,
            "files": [(g, str(p), _size(p)) for g, p, _ in files]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def prepare_task(cfg: Config) -> dict:
    """Tokenize task `data.task_index`'s slice into its task folder (see the module docstring)."""
    check_tasks(cfg)
    d = cfg.data
    if not d.sources:
        raise LmforgeError("data.sources is empty: list the files, folders or globs to tokenize")
    if token_files(d.sources):
        raise LmforgeError("data.num_tasks: token files (.bin, HDF5) are adopted, not tokenized; prepare them "
                           "in one task (data.num_tasks=1)")
    groups, _ = source_groups(d)
    tok = Tokenizer.load(cfg.run_path / "tokenizer")
    workers = d.workers or os.cpu_count() or 1
    dtype = token_dtype(tok.vocab_size)
    files = corpus_files(groups)
    mine = task_slice(files, d.task_index, d.num_tasks)
    total_mb = sum(_size(p) for _, p, _ in mine) / 1e6
    out = task_dir(cfg, d.task_index)
    with AtomicDir(out) as tmp:
        tmps = {s: tmp / s for s in SPLITS}
        for t in tmps.values():
            t.mkdir()
        enc, choice = choose_encoder(tok.tok, d)
        log(f"[dim]prepare encodes with {choice.name} ({choice.reason})[/dim]")
        # Exact duplicates within the slice, on disk; near-duplicates are the merge's, from the signatures.
        scan = _scan(cfg, workers, tmp, groups, tok, enc, files=mine, defer_near=d.near_dedup)
        try:
            p = _Pass(cfg, dtype, {}, groups, files=mine, scan=scan, enc=enc)
            p.record = {}
            res = _run_pass(p, tok, tmps, workers, total_mb)
            if d.near_dedup:
                scan.export_near(tmp / NEAR, sorted(scan.file_ids, key=scan.file_ids.get))
            cleaner = scan.cleaner if scan is not None else p.cleaner
            if cleaner.active:  # the merge adds the tasks' reports up into one filters.json
                atomic_write_json(tmp / FILTERS, cleaner.report())
        finally:
            if scan is not None:
                scan.close()
        parts = []
        for (split, g), w in res["writers"].items():
            rec = p.record.get((split, g), [])
            lengths = p.lengths.get((split, g), [])
            tokens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
            index = f"{split}-{g}.npz"
            np.savez(tmp / index, ordinal=np.array([r[0] for r in rec], np.int64),
                     key=np.frombuffer(b"".join(r[1] for r in rec), np.uint8).reshape(-1, 16),
                     bytes=np.array([r[2] for r in rec], np.int64), tokens=tokens,
                     scan=np.array([r[3] for r in rec], np.int64))
            folder = Path(split) / p.groups[g][0] if p.groups[g][0] else Path(split)
            parts.append({"split": split, "group": g, "index": index, "tokens": w.tokens,
                          "shards": [{"file": str(folder / s["file"]), "tokens": s["tokens"]} for s in w.shards]})
        atomic_write_json(tmp / MANIFEST, {
            "task_index": d.task_index, "num_tasks": d.num_tasks, "fingerprint": _fingerprint(cfg, tok, files),
            "dtype": dtype, "parts": parts, "duplicates_dropped": p.duplicates, "encoder": choice.name,
            "files": p.sources.files,
            "skipped_files": p.sources.skipped_files, "decoding": p.sources.decoding,
            "seconds": round(res["seconds"], 3)})
    docs = sum(p.docs.values())
    log(f"prepare task {d.task_index}/{d.num_tasks}: {len(mine)} file(s), {docs:,} documents, "
        f"{sum(w.tokens for w in res['writers'].values()):,} tokens -> {out}")
    return {"task_index": d.task_index, "files": len(mine), "documents": docs, "seconds": res["seconds"]}


class _TaskDocs:
    """One task's documents in corpus order, and its shards read as one stream per (split, group)."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.parts = folder, manifest["parts"]
        dtype = DTYPES[manifest["dtype"]]
        rows = []
        self.streams, self.starts = [], []
        for j, part in enumerate(self.parts):
            z = np.load(folder / part["index"])
            n = len(z["ordinal"])
            if len(z["tokens"]) != n or int(z["tokens"].sum()) != part["tokens"]:
                raise LmforgeError(f"{folder / part['index']}: does not match the task's shards; re-run this task")
            self.streams.append([np.memmap(folder / s["file"], dtype=dtype, mode="r") for s in part["shards"]])
            self.starts.append(np.concatenate([[0], np.cumsum(z["tokens"])]))
            rows.append((z["ordinal"], np.full(n, j), np.arange(n), z["key"], z["bytes"], z["scan"]))
        if not rows:  # a task with no files (more tasks than files)
            rows = [(np.zeros(0, np.int64),) * 3 + (np.zeros((0, 16), np.uint8),) + (np.zeros(0, np.int64),) * 2]
        ordinal, part, row, key, nbytes, scan = (np.concatenate(c) for c in zip(*rows, strict=True))
        order = np.argsort(ordinal, kind="stable")
        self.part, self.row, self.key, self.nbytes = part[order], row[order], key[order], nbytes[order]
        self.scan = scan[order]  # each kept document's number in the task's scan (all its documents)

    def tokens(self, part: int, lo_row: int, hi_row: int) -> np.ndarray:
        """The tokens of documents lo_row..hi_row-1 of `part`, across its shard files."""
        lo, hi = int(self.starts[part][lo_row]), int(self.starts[part][hi_row])
        out, base = [], 0
        for arr in self.streams[part]:
            a, b = max(lo - base, 0), min(hi - base, len(arr))
            if a < b:
                out.append(np.asarray(arr[a:b]))
            base += len(arr)
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def duplicates_between(tasks: list[_TaskDocs], scratch: Path) -> list[np.ndarray]:
    """Per task, a mask of its documents whose text an earlier one (in corpus order, any task) already
    had: the hashes go through dedup.ExactKeys' partition files on disk, never one in-memory set."""
    keys = ExactKeys(scratch)
    try:
        offset = 0
        for td in tasks:
            keys.add(td.key, np.arange(offset, offset + len(td.key), dtype=np.uint64))
            offset += len(td.key)
        dup = np.zeros(offset, dtype=bool)
        dup[keys.duplicates().astype(np.int64)] = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    bounds = np.cumsum([0] + [len(td.key) for td in tasks])
    return [dup[bounds[i]:bounds[i + 1]] for i in range(len(tasks))]


def near_between(cfg: Config, tasks: list[_TaskDocs], exact: list[np.ndarray], scratch: Path
                 ) -> tuple[list[np.ndarray], dict]:
    """data.near_dedup across tasks: per task, a mask of its documents that are near-duplicates (and not
    exact ones), and dedup.json's report. Every task's signatures are numbered as one scan of the whole
    corpus numbers its documents, so the LSH candidates, the clusters and who stays in each are exactly
    those of a one-machine prepare (dedup.near_duplicates on the same signatures)."""
    m = cfg.data.minhash
    metas = [json.loads((td.folder / NEAR / "near.json").read_text(encoding="utf-8")) for td in tasks]
    offsets = np.cumsum([0] + [mt["documents"] for mt in metas]).astype(np.uint64)
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        bands = band_parts(scratch, m.bands)
        numbers, rows = [], 0
        with open(scratch / "sig.bin", "wb") as out:
            for t, td in enumerate(tasks):
                o = np.fromfile(td.folder / NEAR / "sig_ordinals.bin", dtype=np.uint64) + offsets[t]
                if len(o):
                    sig = np.memmap(td.folder / NEAR / "sig.bin", dtype=np.uint32, mode="r", shape=(len(o), m.num_perm))
                    for lo in range(0, len(o), 65536):
                        chunk = np.asarray(sig[lo:lo + 65536])
                        out.write(chunk.tobytes())
                        band_records(band_keys(chunk, m.bands), o[lo:lo + 65536], bands)
                numbers.append(o)
                rows += len(o)
        exact_drop = np.sort(np.concatenate(
            [np.fromfile(td.folder / NEAR / "exact.bin", dtype=np.uint64) + offsets[t] for t, td in enumerate(tasks)]
            + [td.scan[mask].astype(np.uint64) + offsets[t] for t, (td, mask) in enumerate(zip(tasks, exact))]))
        near, clusters, examples = np.zeros(0, np.uint64), 0, []
        if rows:
            sig = np.memmap(scratch / "sig.bin", dtype=np.uint32, mode="r", shape=(rows, m.num_perm))
            near, clusters, examples = near_duplicates(sig, np.concatenate(numbers), bands, m.threshold, exact_drop)
            del sig
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    masks = [np.isin(td.scan.astype(np.uint64) + offsets[t], near) for t, td in enumerate(tasks)]
    for e in examples:  # dedup.json shows each pair's texts, as the one-machine pass fills them in
        for k in ("kept", "dropped"):
            e[f"{k}_source"], e[f"{k}_text"] = _document_at(cfg, tasks, metas, offsets, e[k])
    report = {"documents_scanned": int(offsets[-1]), "exact_duplicates": len(exact_drop), "near_dedup": True,
              "filtered": sum(mt["filtered"] for mt in metas), "near_duplicates": len(near), "clusters": clusters,
              "minhash": {"ngram": m.ngram, "num_perm": m.num_perm, "bands": m.bands, "threshold": m.threshold,
                          "seed": m.seed},
              "example_pairs": examples}
    return masks, report


def _document_at(cfg: Config, tasks: list[_TaskDocs], metas: list[dict], offsets: np.ndarray, number: int
                 ) -> tuple[str, str]:
    """(source:line, first 300 characters) of the corpus's document `number`, re-read from its file."""
    t = int(np.searchsorted(offsets, np.uint64(number), side="right")) - 1
    n = number - int(offsets[t])
    ids = np.fromfile(tasks[t].folder / NEAR / "files.bin", dtype=np.uint32)
    source = metas[t]["sources"][int(ids[n])]
    k = n - int(np.searchsorted(ids, ids[n]))  # files are read one after another: their ids never go down
    strict = next((st for _, path, st in corpus_files(source_groups(cfg.data)[0]) if str(path) == source), False)
    d = cfg.data
    doc = next(itertools.islice(read_files([(Path(source), strict)], d.text_field, SourceStats(), d.max_doc_bytes,
                                           d.filter), k, None))
    return f"{doc.source}:{doc.line}", doc.text[:300]


def _walk(p: _Pass, tasks: list[_TaskDocs], drops: list[tuple[np.ndarray, np.ndarray]], force: dict[bytes, str],
          emit) -> None:
    """Decide every document as one `prepare` would (dedup, split), counting into `p`; `emit(task, part,
    row, split, group)` receives each kept one, in corpus order. drops: per task, (exact, near) masks."""
    force = dict(force)
    p.near = 0
    for t, td in enumerate(tasks):
        exact, near = drops[t]
        for part, row, key_arr, nbytes, dup, close in zip(td.part, td.row, td.key, td.nbytes, exact, near,
                                                          strict=True):
            if dup:
                p.duplicates += 1
                continue
            if close:
                p.near += 1
                continue
            key = key_arr.tobytes()
            g = td.parts[part]["group"]
            split = force.pop(key, None) or ("val" if key_fraction(key) < p.cfg.data.val_fraction else "train")
            lo, hi = p.min_key[g], p.max_key[g]
            p.min_key[g] = key if lo is None else min(lo, key)
            p.max_key[g] = key if hi is None else max(hi, key)
            p.docs[split, g] += 1
            p.bytes[split, g] += int(nbytes)
            emit(t, int(part), int(row), split, g)


def merge_tasks(cfg: Config) -> dict:
    """Write RUN/data/{train,val} from the task folders, exactly as one `prepare` would have."""
    check_tasks(cfg)
    d = cfg.data
    groups, specs = source_groups(d)
    tok = Tokenizer.load(cfg.run_path / "tokenizer")
    dtype = token_dtype(tok.vocab_size)
    want = _fingerprint(cfg, tok, corpus_files(groups))
    t0 = time.perf_counter()
    tasks, manifests = [], []
    for i in range(d.num_tasks):
        folder = task_dir(cfg, i)
        if not (folder / MANIFEST).is_file():
            raise LmforgeError(f"{folder}: task {i} of {d.num_tasks} has not finished; run `lmforge prepare "
                               f"data.num_tasks={d.num_tasks} data.task_index={i}` first")
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if m["fingerprint"] != want:
            raise LmforgeError(f"{folder}: made with other settings or files than this merge's (data.* keys, "
                               "tokenizer or the files themselves changed); re-run the tasks")
        manifests.append(m)
        tasks.append(_TaskDocs(folder, m))

    def fresh() -> _Pass:
        p = _Pass(cfg, dtype, {}, groups)
        p.duplicates = sum(m["duplicates_dropped"] for m in manifests)
        return p

    scratch = cfg.run_path / "data" / f".merge-dedup-{os.getpid()}"
    dups = (duplicates_between(tasks, scratch) if d.dedup else [np.zeros(len(td.key), dtype=bool) for td in tasks])
    near, near_report = [np.zeros(len(td.key), dtype=bool) for td in tasks], None
    if d.near_dedup:
        near, near_report = near_between(cfg, tasks, dups, scratch)
    drops = list(zip(dups, near, strict=True))
    first = fresh()
    _walk(first, tasks, drops, {}, lambda *a: None)
    if sum(first.docs.values()) == 0:
        raise LmforgeError(f"no documents in {d.sources}: every file is empty, whitespace or binary")
    force = forced_splits(first, specs)
    data_dir = cfg.run_path / "data"
    dirs = {s: AtomicDir(data_dir / s) for s in SPLITS}
    tmps = {s: dirs[s].__enter__() for s in SPLITS}
    try:
        p = fresh()
        p.sources = SourceStats(files=sum(m["files"] for m in manifests),
                                skipped_files=sum(m["skipped_files"] for m in manifests),
                                decoding=[x for m in manifests for x in m["decoding"]])
        writers = open_writers(p, tmps)
        run: list = []  # consecutive documents of one task part going to one writer: copied at once

        def flush() -> None:
            if run:
                t, part, lo, hi, dest = run
                writers[dest].write(tasks[t].tokens(part, lo, hi))
                run.clear()

        def emit(t: int, part: int, row: int, split: str, g: int) -> None:
            if run and run[0] == t and run[1] == part and run[3] == row and run[4] == (split, g):
                run[3] = row + 1
                return
            flush()
            run.extend([t, part, row, row + 1, (split, g)])

        try:
            _walk(p, tasks, drops, force, emit)
            flush()
        finally:
            for w in writers.values():
                w.close()
        seconds = time.perf_counter() - t0
        summary: dict = {"workers": d.num_tasks, "seconds": round(seconds, 3), "duplicates_dropped": p.duplicates,
                         "skipped_files": p.sources.skipped_files, "decoding": p.sources.decoding}
        # Every task's encoder gave tokenizers' ids (fast_bpe proves it before use); the manifest names it
        # as one prepare's would.
        encoders = sorted({m.get("encoder", "tokenizers") for m in manifests})
        extra: dict = {"encoder": "+".join(encoders)}
        for stale in ("dedup.json", "filters.json", "decontamination.json"):  # an earlier prepare's
            (data_dir / stale).unlink(missing_ok=True)
        if near_report is not None:
            atomic_write_json(data_dir / "dedup.json", near_report)
            summary["near_duplicates_dropped"] = extra["near_duplicates_dropped"] = p.near
        filters = [json.loads((task_dir(cfg, i) / FILTERS).read_text(encoding="utf-8"))
                   for i in range(d.num_tasks) if (task_dir(cfg, i) / FILTERS).is_file()]
        if filters:
            cleaning = write_filter_report(data_dir, merge_reports(filters))
            summary.update(cleaning)
            extra.update(cleaning)
        weights = write_manifests(p, tok, writers, specs, tmps, summary, extra)
    except BaseException as e:
        for s in SPLITS:
            dirs[s].__exit__(type(e), e, e.__traceback__)
        raise
    finish_dirs(dirs, tmps, data_dir, p.split_docs("val") > 0)
    shutil.rmtree(data_dir / TASKS, ignore_errors=True)
    log(f"merged {d.num_tasks} task(s)")
    return report(summary, p, specs, weights, seconds, d.num_tasks, data_dir)
