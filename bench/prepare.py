"""Benchmark: `lmforge prepare` throughput against `tokenizers`' encode_batch_fast on the same text.

Corpus: the running Python's standard library .py files (every machine has them), up to --mb MB.
lmforge prepare runs with 1 and 2 worker processes (--workers) and is timed end to end: reading
files, the exact-dedup scan (prepare's default; --no-dedup turns it off), tokenizing, writing shards
and manifests; then once more with `data.near_dedup=true`, whose extra time is the near-dedup cost.
The peer only encodes texts already in memory, each distinct document once as prepare keeps them:
`encode_batch_fast` in one process (tokenizers' own rayon threads, all cores), with a fresh
tokenizer each repeat. The token ids of prepare's shard and the peer's are compared one to one.
The MinHash signatures are also timed against `datasketch` on the first --datasketch-mb MB.
Prints one JSON object on stdout; progress goes to stderr.

    python bench/prepare.py [--mb 20] [--repeats 3] [--tokenizer DIR] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from lmforge.config import Config
from lmforge.data.clean import words
from lmforge.data.dedup import signatures
from lmforge.data.prepare import prepare
from lmforge.data.shards import open_shards
from lmforge.data.sources import iter_documents
from lmforge.tokenizer import train_tokenizer


def stdlib_texts(limit_bytes: int) -> list[tuple[str, str]]:
    """(relative path, text) of stdlib .py files in sorted order, UTF-8 and non-empty, up to limit."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            raw = p.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip() or "\x00" in text:
            continue
        out.append((rel, text))
        total += len(raw)
        if total >= limit_bytes:
            break
    return out


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def peer_ids(hf_json: str, texts: list[str]) -> tuple[float, np.ndarray]:
    """encode_batch_fast on all cores with a fresh tokenizer (its word cache cold, as prepare's workers
    start), then once more on the same text with the cache warm: (seconds cold, seconds warm, ids
    with one eot after each document, as prepare writes them)."""
    hf = HFTokenizer.from_str(hf_json)
    t0 = time.perf_counter()
    enc = hf.encode_batch_fast(texts, add_special_tokens=False)
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf.encode_batch_fast(texts, add_special_tokens=False)  # again: every word now in its cache
    warm = time.perf_counter() - t0
    return dt, warm, np.concatenate([np.asarray(e.ids + [0], dtype=np.int64) for e in enc])


def peer_one_thread(hf_json: str, texts: list[str]) -> float:
    """encode_batch_fast on one thread (fresh tokenizer): the peer of one prepare worker."""
    hf = HFTokenizer.from_str(hf_json)
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        t0 = time.perf_counter()
        hf.encode_batch_fast(texts, add_special_tokens=False)
        return time.perf_counter() - t0
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def datasketch_seconds(texts: list[str], ngram: int, num_perm: int) -> dict:
    """datasketch's MinHash against lmforge's numpy signatures on the same documents and shingle size."""
    out = {}
    t0 = time.perf_counter()
    signatures(texts, ngram, num_perm, 1)
    out["numpy_seconds"] = round(time.perf_counter() - t0, 3)
    try:
        from datasketch import MinHash
    except ImportError:
        out["datasketch_seconds"] = None
        return out
    t0 = time.perf_counter()
    for t in texts:
        w = words(t.lower())
        grams = [" ".join(w[i:i + ngram]).encode() for i in range(max(len(w) - ngram + 1, 1))]
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch(grams)
    out["datasketch_seconds"] = round(time.perf_counter() - t0, 3)
    out["numpy_speedup"] = round(out["datasketch_seconds"] / max(out["numpy_seconds"], 1e-9), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB (default 20)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer", default="", help="existing tokenizer folder; default: train one")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--workers", default="1,2", help="prepare worker counts to measure")
    ap.add_argument("--datasketch-mb", type=float, default=2.0, help="MB of documents for the datasketch peer")
    ap.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                    help="exact dedup on in prepare (its default; the scan reads the corpus once more)")
    args = ap.parse_args()

    docs = stdlib_texts(int(args.mb * 1e6))
    nbytes = sum(len(t.encode("utf-8")) for _, t in docs)
    worker_counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        corpus, run = Path(tmp) / "corpus", Path(tmp) / "run"
        for i, (_, text) in enumerate(docs):  # flat names keep the walk order equal to `docs`
            f = corpus / f"{i:06d}.py"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text, encoding="utf-8")
        cfg = Config(run_dir=str(run))
        cfg.data.sources = [str(corpus)]
        cfg.data.dedup = args.dedup  # prepare's default; the peers then encode each distinct document once
        cfg.data.val_fraction = 0.0  # one split in corpus order: the ids compare one to one
        t0 = time.perf_counter()
        if args.tokenizer:
            shutil.copytree(args.tokenizer, run / "tokenizer")
            tok_info = {"from": args.tokenizer}
        else:
            cfg.tokenizer.vocab_size = args.vocab_size
            cfg.tokenizer.max_train_bytes = 5_000_000
            report = train_tokenizer(cfg)
            tok_info = {"trained_on_mb": round(report["training_bytes"] / 1e6, 2),
                        "bytes_per_token": report["bytes_per_token"]}
        tok_info["seconds"] = round(time.perf_counter() - t0, 2)
        hf_json = (run / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8")
        tok_info["vocab_size"] = HFTokenizer.from_str(hf_json).get_vocab_size()
        # The peers get exactly the documents prepare tokenizes (e.g. a UTF-8 BOM is stripped).
        texts = [d.text for d in iter_documents(cfg.data.sources)]
        if args.dedup:  # what prepare keeps: the first copy of each text
            texts = list(dict.fromkeys(texts))

        runs = {f"workers_{w}": [] for w in worker_counts}
        runs["near_dedup"] = []
        batch, warm, single, same, encoder = [], [], [], True, ""
        top = max(worker_counts)
        for _ in range(args.repeats):  # interleaved, so load on the shared machine hits all alike
            for w in worker_counts:
                cfg.data.workers, cfg.data.near_dedup = w, False
                t0 = time.perf_counter()
                summary = prepare(cfg)
                runs[f"workers_{w}"].append(time.perf_counter() - t0)
                encoder = summary["encoder"]
            arrays, _ = open_shards(run / "data" / "train")
            ours = np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays])
            cfg.data.workers, cfg.data.near_dedup = top, True
            t0 = time.perf_counter()
            near = prepare(cfg)
            runs["near_dedup"].append(time.perf_counter() - t0)
            dt, dt_warm, theirs = peer_ids(hf_json, texts)
            batch.append(dt)
            warm.append(dt_warm)
            single.append(peer_one_thread(hf_json, texts))
            same = same and np.array_equal(ours, theirs)
        sketch = datasketch_seconds(_first_mb(texts, args.datasketch_mb), cfg.data.minhash.ngram,
                                    cfg.data.minhash.num_perm)

    mb = nbytes / 1e6
    peer, peer_warm = statistics.median(batch), statistics.median(warm)
    result = {
        "bench": "lmforge prepare vs tokenizers",
        "corpus": {"source": "python stdlib .py files", "files": len(docs), "mb": round(mb, 2)},
        "tokenizer": tok_info,
        "cpu_cores": os.cpu_count(),
        "repeats": args.repeats,
        "encoder": encoder,
        "token_ids_identical": bool(same),
        "tokenizers_encode_batch_fast": {"threads": os.cpu_count(), "mb_per_s": spread([mb / s for s in batch]),
                                         "seconds": [round(s, 2) for s in batch]},
        "tokenizers_encode_batch_fast_1_thread": {"mb_per_s": spread([mb / s for s in single]),
                                                  "seconds": [round(s, 2) for s in single],
                                                  "ratio_prepare_workers_1": None},
        "tokenizers_encode_batch_fast_warm": {"threads": os.cpu_count(), "mb_per_s": spread([mb / s for s in warm]),
                                              "seconds": [round(s, 2) for s in warm]},
        "near_dedup": {"workers": top, "near_duplicates_dropped": near.get("near_duplicates_dropped"),
                       "scan_seconds": near.get("scan_seconds"),
                       "mb_per_s": spread([mb / s for s in runs["near_dedup"]]),
                       "added_time_vs_prepare": round(statistics.median(runs["near_dedup"])
                                                      / statistics.median(runs[f"workers_{top}"]) - 1, 3),
                       "minhash_numpy_vs_datasketch": sketch},
        "dedup": args.dedup,
        "note": "prepare is timed end to end (read, exact-dedup scan unless --no-dedup, tokenize, write shards); "
                "the peer encodes in-memory text only: a fresh tokenizer per repeat (cold), "
                "then the same text again (warm). Ratio > 1: prepare is faster. "
                "Shared machine: other jobs may run beside it.",
    }
    for w in worker_counts:
        t = runs[f"workers_{w}"]
        result[f"prepare_workers_{w}"] = {"mb_per_s": spread([mb / s for s in t]), "seconds": [round(s, 2) for s in t],
                                          "ratio_vs_encode_batch_fast": round(peer / statistics.median(t), 3),
                                          "ratio_vs_encode_batch_fast_warm": round(peer_warm / statistics.median(t), 3)}
    if "workers_1" in runs:
        result["tokenizers_encode_batch_fast_1_thread"]["ratio_prepare_workers_1"] = round(
            statistics.median(single) / statistics.median(runs["workers_1"]), 3)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))


def _first_mb(texts: list[str], mb: float) -> list[str]:
    out, size = [], 0
    for t in texts:
        out.append(t)
        size += len(t)
        if size >= mb * 1e6:
            break
    return out


if __name__ == "__main__":
    main()
