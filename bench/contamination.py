"""Benchmark: the contamination index (`lmforge eval contamination`), its build speed, memory and lookups.

Three measurements in one run:
- real text: the running Python's standard library .py files (--mb MB), prepared by `lmforge prepare`
  (2 workers) and then indexed; the index's time is reported as a share of prepare's, and prepare is run
  again with `data.decontaminate` over 1,000 questions (10 of them cut from corpus files) for its cost;
- scale: --tokens random token ids (documents of 300-700 tokens) written as a prepared split and indexed,
  with the process's peak memory before and after, so the index's bound (one chunk or one partition at a
  time) is visible, and its size on disk;
- the peer: the index a user would write by hand, a Python set of every window's tuple, on the first
  --peer-tokens tokens, and the ratio of token rates; then MMLU-sized lookups (14,042 examples of about
  100 windows) against the scale index.
Prints one JSON object on stdout; progress goes to stderr.

    python bench/contamination.py [--mb 10] [--tokens 50000000] [--peer-tokens 1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_flags, log
from prepare import stdlib_texts

from lmforge.config import Config
from lmforge.data.prepare import prepare
from lmforge.data.shards import MANIFEST, ShardWriter, open_shards
from lmforge.eval.contamination import NgramIndex, window_hashes
from lmforge.tokenizer import train_tokenizer

N = 13


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_split(folder: Path, tokens: int, vocab: int = 32000, seed: int = 0) -> None:
    """A prepared split of random ids, written in pieces (the corpus never in memory)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    w = ShardWriter(folder, "uint16", 100_000_000)
    eot, left, docs = vocab - 1, tokens, 0
    while left > 0:
        lengths = rng.integers(300, 700, 20_000)
        ids = rng.integers(0, vocab - 1, int(lengths.sum()), dtype=np.int64)
        ids[np.cumsum(lengths) - 1] = eot
        ids = ids[:left]
        w.write(ids)
        left -= len(ids)
        docs += len(lengths)
    shards = w.close()
    (folder / MANIFEST).write_text(json.dumps({"dtype": "uint16", "tokens": tokens, "documents": docs,
                                               "shards": shards, "tokenizer_hash": "synthetic",
                                               "vocab_size": vocab, "eot_id": eot}))


def python_set_seconds(ids: np.ndarray, n: int, eot: int) -> float:
    """The hand-written peer: every window without an end of document, as a tuple, into a set."""
    t0 = time.perf_counter()
    seen = set()
    row = ids.tolist()
    for i in range(len(row) - n + 1):
        w = tuple(row[i:i + n])
        if eot not in w:
            seen.add(w)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=10.0, help="MB of real text (python stdlib) to prepare and index")
    ap.add_argument("--tokens", type=int, default=50_000_000, help="random tokens for the scale measurement")
    ap.add_argument("--peer-tokens", type=int, default=1_000_000, help="tokens the Python-set peer indexes")
    args = ap.parse_args()
    out: dict = {"bench": "contamination index", "ngram": N, "cpu_flags": cpu_flags()}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        root = Path(tmp)
        # 1. Real text, against prepare's own time.
        corpus, run = root / "corpus", root / "run"
        corpus.mkdir()
        for i, (_, text) in enumerate(stdlib_texts(int(args.mb * 1e6))):
            (corpus / f"{i:06d}.py").write_text(text, encoding="utf-8")
        cfg = Config(run_dir=str(run))
        cfg.data.sources, cfg.data.workers = [str(corpus)], 2
        cfg.tokenizer.vocab_size, cfg.tokenizer.max_train_bytes = 8192, 5_000_000
        train_tokenizer(cfg)
        t0 = time.perf_counter()
        summary = prepare(cfg)
        prep = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = NgramIndex.build(run / "data" / "train", root / "real-index", N)
        real = time.perf_counter() - t0
        # prepare again, dropping documents that hold one of 1,000 questions (10 of them planted in the corpus).
        texts = stdlib_texts(int(args.mb * 1e6))
        rows = [{"question": f"question {i}: " + " ".join(f"w{(i * 7919 + j) % 10007}" for j in range(20)),
                 "choices": ["yes", "no"], "answer": 0} for i in range(990)]
        rows += [{"question": text[200:600], "choices": ["yes", "no"], "answer": 0} for _, text in texts[:10]]
        quiz = root / "quiz.jsonl"
        quiz.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        cfg.data.decontaminate = [f"mc:{quiz}"]
        t0 = time.perf_counter()
        clean = prepare(cfg)
        prep_clean = time.perf_counter() - t0
        cfg.data.decontaminate = []
        out["real_text"] = {"mb": round(args.mb, 2), "tokens": index.meta["tokens"],
                            "prepare_seconds": round(prep, 2), "prepare_mb_per_s": summary["mb_per_s"],
                            "index_seconds": round(real, 2),
                            "index_tokens_per_s": round(index.meta["tokens"] / real),
                            "index_time_vs_prepare": round(real / prep, 3),
                            "prepare_decontaminate_seconds": round(prep_clean, 2),
                            "decontaminate_added_time": round(prep_clean / prep - 1, 3),
                            "decontaminate_examples": len(rows), "planted_documents": 10,
                            "documents_dropped": clean.get("contaminated_dropped")}
        log(f"real text: prepare {prep:.1f}s, index {real:.1f}s")

        # 2. Scale: random ids, memory and disk.
        split = root / "synthetic" / "train"
        synthetic_split(split, args.tokens)
        before = peak_rss_mb()
        t0 = time.perf_counter()
        big = NgramIndex.build(split, root / "synthetic-index", N)
        build = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in (root / "synthetic-index").iterdir())
        out["scale"] = {"tokens": args.tokens, "seconds": round(build, 2), "tokens_per_s": round(args.tokens / build),
                        "distinct_windows": big.meta["distinct_windows"], "partitions": 1 << big.bits,
                        "index_mb_on_disk": round(disk / 1e6, 1), "peak_rss_mb_before": round(before, 1),
                        "peak_rss_mb_after": round(peak_rss_mb(), 1),
                        "hours_per_100gb_text_at_4_bytes_per_token": round(25e9 / (args.tokens / build) / 3600, 2)}
        log(f"scale: {args.tokens:,} tokens in {build:.1f}s")

        # 3. The peer, and MMLU-sized lookups.
        shards, m = open_shards(split)
        head = np.asarray(shards[0][:args.peer_tokens]).astype(np.int64)
        t_peer = python_set_seconds(head, N, m["eot_id"])
        t0 = time.perf_counter()
        window_hashes(head, N, m["eot_id"])
        t_ours = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        queries = np.concatenate([window_hashes(rng.integers(0, 31999, 112), N)[0] for _ in range(14042)])
        planted = window_hashes(np.asarray(shards[0][5000:5200]).astype(np.int64), N, m["eot_id"])[0]
        t0 = time.perf_counter()
        hits = big.contains(np.concatenate([queries, planted]))
        look = time.perf_counter() - t0
        out["peer_python_set"] = {"tokens": args.peer_tokens, "seconds": round(t_peer, 3),
                                  "tokens_per_s": round(args.peer_tokens / t_peer),
                                  "ratio_index_build_vs_python_set": round((args.tokens / build)
                                                                          / (args.peer_tokens / t_peer), 2),
                                  "ratio_hashing_only_vs_python_set": round(t_peer / t_ours, 1)}
        out["lookups"] = {"examples": 14042, "windows": int(len(queries) + len(planted)), "seconds": round(look, 3),
                          "planted_found": int(hits[len(queries):].sum()), "planted": int(len(planted)),
                          "random_found": int(hits[:len(queries)].sum())}
        shutil.rmtree(root / "synthetic", ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
