"""Contamination: how much of each benchmark the run's training data already holds.

An evaluation example (its question with the right answer, as a worked few-shot example shows it) is
contaminated when one of its windows of `eval.ngram` tokens (13, as in GPT-3's analysis) occurs in the
training shards; with `eval.contamination_share=s`, when more than a share s of its windows do. The
windows are token ids of the run's own tokenizer on both sides, so "occurs in training" means the very
ids the model was trained on, whatever the language. An example shorter than one window is not
checkable and is reported as such (never flagged).

The index: every window of RUN/data/train as a 64-bit hash (windows across a document's end left out),
built once per run into RUN/data/ngrams-<n>/. Hashes are written to partition files by their top bits
as the shards stream past, then each partition is sorted and de-duplicated on its own, so memory holds
one chunk or one partition at a time, never the corpus. index.json names the manifest it was built
from; a re-prepare makes it stale and the next report rebuilds it. A lookup memory-maps only the
partitions the queried hashes fall in and binary-searches them.

`prepare` uses the same windows the other way round (`data.decontaminate=[tasks]`): a training
document holding a window of an evaluation example is dropped before tokenizing (see dedup.Scan).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.console import log, progress
from lmforge.data.dedup import mix64, odd_multipliers
from lmforge.errors import LmforgeError
from lmforge.io import AtomicDir, atomic_write_json, atomic_write_text

CHUNK_TOKENS = 4 << 20  # tokens hashed at a time while building (about 100 MB of temporaries)
PART_BYTES = 64 << 20  # the index is cut into partitions of about this size
SAMPLES = 5  # flagged examples shown per task in the report
INDEX_VERSION = 1


def window_hashes(ids: np.ndarray, n: int, eot_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(hash of every window of `n` consecutive ids, its start position), leaving out windows that hold
    `eot_id` (they cross a document's end, and no evaluation text holds one)."""
    ids = np.asarray(ids)
    if len(ids) < n:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    a = ids.astype(np.uint64)
    m = odd_multipliers(n)
    count = len(a) - n + 1
    h = a[:count] * m[0]
    tmp = np.empty_like(h)
    with np.errstate(over="ignore"):
        for k in range(1, n):  # in place: no temporaries per position
            np.multiply(a[k:k + count], m[k], out=tmp)
            h += tmp
    start = np.arange(count, dtype=np.int64)
    if eot_id is not None:
        ends = np.flatnonzero(ids == eot_id)
        crossing = np.zeros(len(a) + n, dtype=bool)  # indexed by start + n - 1
        for k in range(n):  # the window starting at e - n + 1 + k holds the end at e
            crossing[ends + k] = True
        keep = ~crossing[n - 1:n - 1 + count]
        h, start = h[keep], start[keep]
    return mix64(h), start


def sorted_unique(h: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-table unique is several times slower on uint64 here)."""
    h = np.sort(h)
    return h[np.r_[True, h[1:] != h[:-1]]] if len(h) else h


@dataclass
class Flag:
    """One evaluation example's windows against training: how many there are and how many occur."""

    where: str
    windows: int
    found: int

    @property
    def share(self) -> float:
        return self.found / self.windows if self.windows else 0.0


# --- the index ------------------------------------------------------------------------------------------

def _manifest_digest(split_dir: Path) -> str:
    return hashlib.sha256((split_dir / "manifest.json").read_bytes()).hexdigest()


class NgramIndex:
    """The sorted, de-duplicated window hashes of a run's training split, in partitions on disk."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "index.json").read_text(encoding="utf-8"))
        self.bits = int(self.meta["bits"])
        self.n = int(self.meta["ngram"])

    def part(self, p: int) -> Path:
        return self.folder / f"part-{p:04d}.u64"

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Which of `hashes` occur in training."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        found = np.zeros(len(hashes), dtype=bool)
        if not len(hashes):
            return found
        parts = (hashes >> np.uint64(64 - self.bits)).astype(np.int64)
        for p in np.unique(parts).tolist():
            f = self.part(p)
            if not f.is_file() or f.stat().st_size == 0:
                continue
            table = np.memmap(f, dtype=np.uint64, mode="r")
            sel = np.flatnonzero(parts == p)
            q = hashes[sel]
            i = np.minimum(np.searchsorted(table, q), len(table) - 1)
            found[sel] = table[i] == q
        return found

    @staticmethod
    def build(split_dir: Path, folder: Path, n: int) -> NgramIndex:
        """Hash every window of the split's shards into `folder` (atomically: a crash leaves no index)."""
        from lmforge.data.shards import open_shards

        shards, manifest = open_shards(split_dir)
        total = int(manifest["tokens"])
        bits = max(4, min(12, math.ceil(math.log2(max(total * 8 / PART_BYTES, 1)))))
        shift = np.uint64(64 - bits)
        eot = int(manifest["eot_id"])
        t0 = time.perf_counter()
        with AtomicDir(folder) as tmp:
            raw = [open(tmp / f"raw-{p:04d}.u64", "wb") for p in range(1 << bits)]  # noqa: SIM115 (closed below)
            try:
                with progress(f"indexing {n}-grams", total / 1e6, "M tokens") as advance:
                    for shard in shards:
                        tail = np.zeros(0, dtype=shard.dtype)
                        for lo in range(0, len(shard), CHUNK_TOKENS):
                            chunk = np.concatenate([tail, shard[lo:lo + CHUNK_TOKENS]])
                            h = sorted_unique(window_hashes(chunk, n, eot)[0])
                            bounds = np.searchsorted((h >> shift).astype(np.int64), np.arange((1 << bits) + 1))
                            for p in range(1 << bits):
                                if bounds[p + 1] > bounds[p]:
                                    raw[p].write(h[bounds[p]:bounds[p + 1]].tobytes())
                            tail = chunk[-(n - 1):] if n > 1 else chunk[:0]
                            advance(min(CHUNK_TOKENS, len(shard) - lo) / 1e6)
            finally:
                for f in raw:
                    f.close()
            distinct = 0
            for p in range(1 << bits):
                f = tmp / f"raw-{p:04d}.u64"
                h = sorted_unique(np.fromfile(f, dtype=np.uint64))
                f.unlink()
                h.tofile(tmp / f"part-{p:04d}.u64")
                distinct += len(h)
            seconds = time.perf_counter() - t0
            atomic_write_json(tmp / "index.json", {
                "version": INDEX_VERSION, "ngram": n, "bits": bits, "tokens": total, "distinct_windows": distinct,
                "manifest_sha256": _manifest_digest(split_dir), "tokenizer_hash": manifest["tokenizer_hash"],
                "seconds": round(seconds, 3), "tokens_per_s": round(total / max(seconds, 1e-9))})
        log(f"{n}-gram index of {total:,} training tokens: {distinct:,} distinct windows in {seconds:.1f}s "
            f"({total / max(seconds, 1e-9) / 1e6:.1f} M tokens/s) -> {folder}")
        return NgramIndex(folder)


def run_index(run: Path, n: int) -> NgramIndex:
    """The run's training-window index, built now if it is missing or older than the data."""
    split = run / "data" / "train"
    if not (split / "manifest.json").is_file():
        raise LmforgeError(f"{split}: no prepared training data; the contamination report looks for evaluation "
                           "examples in the run's training shards (run `lmforge prepare` first)")
    if n < 1:
        raise LmforgeError(f"eval.ngram must be >= 1, got {n}")
    folder = run / "data" / f"ngrams-{n}"
    try:
        index = NgramIndex(folder)
        if index.meta.get("version") == INDEX_VERSION and index.meta["manifest_sha256"] == _manifest_digest(split):
            return index
        log(f"[dim]{folder} was built from other data; rebuilding it[/dim]")
    except (OSError, ValueError, KeyError):
        pass
    return NgramIndex.build(split, folder, n)


# --- evaluation examples -------------------------------------------------------------------------------

def example_text(doc) -> str:
    """What of an example a training document could hold: its question with the right answer."""
    return doc.shot()


def example_windows(docs: list, tok, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(window hashes of every example, the example each belongs to, windows per example)."""
    lists = tok.encode_batch([example_text(d) for d in docs])
    hashes, owners = [], []
    for i, ids in enumerate(lists):
        h, _ = window_hashes(np.asarray(ids, dtype=np.int64), n)
        hashes.append(h)
        owners.append(np.full(len(h), i, dtype=np.int64))
    per = np.asarray([len(h) for h in hashes], dtype=np.int64)
    if not hashes:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), per
    return np.concatenate(hashes), np.concatenate(owners), per


def check_docs(docs: list, tok, index: NgramIndex) -> list[Flag]:
    """Each example's windows and how many of them the training data holds."""
    hashes, owners, per = example_windows(docs, tok, index.n)
    found = np.bincount(owners[index.contains(hashes)], minlength=len(docs)) if len(hashes) else \
        np.zeros(len(docs), np.int64)
    return [Flag(d.where, int(w), int(f)) for d, w, f in zip(docs, per.tolist(), found.tolist(), strict=True)]


def is_flagged(flag: Flag, share: float) -> bool:
    return flag.found > 0 and flag.share > share


def data_tokenizer(run: Path):
    """The tokenizer the run's shards were made with (the report must cut examples as training was cut)."""
    from lmforge.data.shards import read_manifest
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(run / "tokenizer")
    manifest = read_manifest(run / "data" / "train")
    if manifest["tokenizer_hash"] != tok.hash:
        raise LmforgeError(f"{run / 'data' / 'train'}: made with another tokenizer than {run / 'tokenizer'}; "
                           "re-run `lmforge prepare` before measuring contamination")
    return tok


class Cleaner:
    """`eval.exclude_contaminated`: drops a task's contaminated examples before it is scored."""

    def __init__(self, cfg):
        self.run, self.n, self.share = cfg.run_path, cfg.eval.ngram, cfg.eval.contamination_share
        self.tok = data_tokenizer(self.run)
        self.index = run_index(self.run, self.n)

    def __call__(self, task) -> int:
        """Removes the task's contaminated examples in place; returns how many went."""
        flags = check_docs(task.docs, self.tok, self.index)
        keep = [d for d, f in zip(task.docs, flags, strict=True) if not is_flagged(f, self.share)]
        dropped = len(task.docs) - len(keep)
        if not keep:
            raise LmforgeError(f"{task.name}: every example is contaminated ({dropped} of {dropped}); nothing "
                               "is left to score with eval.exclude_contaminated=true")
        task.docs = keep
        return dropped


# --- the report -------------------------------------------------------------------------------------------

def report(cfg) -> dict:
    """`lmforge eval contamination eval.tasks=[...]`: per task, the share of examples whose windows occur in
    the run's training shards, the flagged examples, and JSON + Markdown beside the benchmarks' results."""
    from lmforge.eval.tasks import load_task, parse_spec

    ec = cfg.eval
    if not ec.tasks:
        raise LmforgeError("eval.tasks is empty: name the benchmarks to check, e.g. "
                           "eval.tasks=[hellaswag:hellaswag_val.jsonl]")
    run = cfg.run_path
    tok = data_tokenizer(run)
    index = run_index(run, ec.ngram)
    tasks: dict[str, dict] = {}
    t0 = time.perf_counter()
    for raw in ec.tasks:
        spec = parse_spec(raw, cfg.run_dir)
        task = load_task(spec)
        flags = check_docs(task.docs, tok, index)
        checked = [f for f in flags if f.windows]
        bad = [(d, f) for d, f in zip(task.docs, flags, strict=True) if is_flagged(f, ec.contamination_share)]
        tasks[task.name] = {
            "path": str(spec.path), "examples": len(flags), "checked": len(checked),
            "too_short": len(flags) - len(checked), "contaminated": len(bad),
            "share": len(bad) / len(checked) if checked else 0.0,
            "flagged": [{"where": f.where, "windows": f.windows, "found": f.found, "share": round(f.share, 4)}
                        for _, f in bad],
            "samples": [{"where": f.where, "share": round(f.share, 4), "text": example_text(d)[:300]}
                        for d, f in bad[:SAMPLES]]}
    result = {"ngram": ec.ngram, "contamination_share": ec.contamination_share,
              "index": {k: index.meta[k] for k in ("tokens", "distinct_windows", "seconds", "tokens_per_s")},
              "check_seconds": round(time.perf_counter() - t0, 3), "tasks": tasks}
    out = (Path(ec.out) if ec.out else run / "eval") / f"contamination-{ec.ngram}.json"
    atomic_write_json(out, result)
    table = markdown(result)
    atomic_write_text(out.with_suffix(".md"), table)
    print(table)
    log(f"contamination report -> {out} (+ .md); eval.exclude_contaminated=true scores the clean examples only")
    return result


def markdown(result: dict) -> str:
    share = result["contamination_share"]
    rule = "any of its windows occurs" if share == 0 else f"more than {100 * share:g} % of its windows occur"
    lines = [f"# Contamination: {result['ngram']}-token windows of each example in the training shards", "",
             f"An example is flagged when {rule} in training "
             f"({result['index']['tokens']:,} tokens, {result['index']['distinct_windows']:,} distinct windows).", "",
             "| task | examples | checked | too short | contaminated | share |", "|---|---:|---:|---:|---:|---:|"]
    for name, t in result["tasks"].items():
        lines.append(f"| {name} | {t['examples']} | {t['checked']} | {t['too_short']} | {t['contaminated']} | "
                     f"{100 * t['share']:.2f} % |")
    for name, t in result["tasks"].items():
        if t["samples"]:
            lines += ["", f"## {name}: flagged examples (first {len(t['samples'])})", ""]
            lines += [f"- `{s['where']}` ({100 * s['share']:.0f} % of windows): "
                      + s["text"].replace("\n", " ")[:160] for s in t["samples"]]
    return "\n".join(lines) + "\n"


# --- prepare: dropping training documents that hold evaluation examples ------------------------------

class Decontaminator:
    """`data.decontaminate=[tasks]`: the window hashes of those tasks' examples, sorted, to find training
    documents that hold one. Documents are cut by the tokenizing pass's own encoder, so a document is
    dropped exactly when the report would have flagged its examples."""

    def __init__(self, specs: list[str], run_dir: str, tok, n: int, enc=None):
        from lmforge.eval.tasks import load_task, parse_spec

        if n < 1:
            raise LmforgeError(f"eval.ngram must be >= 1, got {n}")
        self.tok, self.n, self.enc = tok, n, enc
        self.examples: list[tuple[str, str]] = []  # (task, where) of each example, by number
        self.tasks: dict[str, int] = {}
        hashes, owners = [], []
        for raw in specs:
            task = load_task(parse_spec(raw, run_dir))
            h, o, _ = example_windows(task.docs, tok, n)
            hashes.append(h)
            owners.append(o + len(self.examples))
            self.examples += [(task.name, d.where) for d in task.docs]
            self.tasks[task.name] = len(task.docs)
        h, o = np.concatenate(hashes), np.concatenate(owners)
        order = np.argsort(h, kind="stable")
        self.hashes, self.owners = h[order], o[order]
        self.dropped: list[dict] = []  # samples for the report

    def hits(self, texts: list[str]) -> np.ndarray:
        """Per text: the number of an example one of its windows belongs to, or -1."""
        from lmforge.data.prepare import encode_docs_lengths

        out = np.full(len(texts), -1, dtype=np.int64)
        if not len(self.hashes) or not texts:
            return out
        ids, lengths = encode_docs_lengths(self.tok.tok, texts, self.tok.eot_id, "uint32", None, self.enc)
        h, start = window_hashes(ids, self.n, self.tok.eot_id)
        i = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        hit = self.hashes[i] == h
        doc = np.searchsorted(np.cumsum(lengths), start[hit], side="right")
        docs, first = np.unique(doc, return_index=True)  # the first window found in each document names it
        out[docs] = self.owners[i[hit]][first]
        return out

    def report(self, dropped: int) -> dict:
        return {"ngram": self.n, "tasks": self.tasks, "documents_dropped": dropped, "samples": self.dropped}
