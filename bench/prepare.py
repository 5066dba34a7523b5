"""Benchmark: `lmforge prepare` tokenization throughput against one-process `tokenizers` on the same text.

Corpus: the running Python's standard library .py files (every machine has them), up to --mb MB.
lmforge prepare runs with all cores (worker processes) and is timed end to end: reading files,
hashing, tokenizing, writing shards and manifests. The peers only encode texts already in memory:
`encode_batch_fast` in one process (tokenizers' own rayon threads, all cores) and an `encode` loop
(one thread). Prints one JSON object on stdout; progress goes to stderr.

    python bench/prepare.py [--mb 20] [--repeats 3] [--tokenizer DIR] [--workers 0]
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

from tokenizers import Tokenizer as HFTokenizer

from lmforge.config import Config
from lmforge.data.prepare import prepare
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB (default 20)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer", default="", help="existing tokenizer folder; default: train one")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=0, help="prepare workers; 0: all cores")
    args = ap.parse_args()

    docs = stdlib_texts(int(args.mb * 1e6))
    nbytes = sum(len(t.encode("utf-8")) for _, t in docs)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        corpus, run = Path(tmp) / "corpus", Path(tmp) / "run"
        for i, (_, text) in enumerate(docs):  # flat names keep the walk order equal to `docs`
            f = corpus / f"{i:06d}.py"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text, encoding="utf-8")
        cfg = Config(run_dir=str(run))
        cfg.data.sources = [str(corpus)]
        cfg.data.workers = args.workers
        cfg.data.dedup = False  # the peers encode every file, so prepare must too
        cfg.data.val_fraction = 0.01
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
        hf = HFTokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
        tok_info["vocab_size"] = hf.get_vocab_size()
        # The peers get exactly the documents prepare tokenizes (e.g. a UTF-8 BOM is stripped).
        texts = [d.text for d in iter_documents(cfg.data.sources)]

        ours, batch, loop = [], [], []
        tokens = peer_tokens = 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            summary = prepare(cfg)
            ours.append(time.perf_counter() - t0)
            tokens = summary["train"]["tokens"] + summary["val"]["tokens"]

            t0 = time.perf_counter()
            enc = hf.encode_batch_fast(texts, add_special_tokens=False)
            batch.append(time.perf_counter() - t0)
            peer_tokens = sum(len(e.ids) for e in enc)
            del enc

            t0 = time.perf_counter()
            for t in texts:
                hf.encode(t, add_special_tokens=False)
            loop.append(time.perf_counter() - t0)

    mb = nbytes / 1e6
    result = {
        "bench": "lmforge prepare vs tokenizers",
        "corpus": {"source": "python stdlib .py files", "files": len(docs), "mb": round(mb, 2)},
        "tokenizer": tok_info,
        "cpu_cores": os.cpu_count(),
        "workers": summary["workers"],
        "repeats": args.repeats,
        "tokens": tokens,
        "tokens_match": tokens == peer_tokens + len(texts),  # prepare adds one eot per document
        "lmforge_prepare": {"mb_per_s": spread([mb / s for s in ours]),
                            "tokens_per_s": spread([tokens / s for s in ours]),
                            "seconds": [round(s, 2) for s in ours]},
        "tokenizers_encode_batch_fast": {"mb_per_s": spread([mb / s for s in batch]),
                                         "tokens_per_s": spread([peer_tokens / s for s in batch]),
                                         "seconds": [round(s, 2) for s in batch]},
        "tokenizers_encode_loop": {"mb_per_s": spread([mb / s for s in loop]),
                                   "tokens_per_s": spread([peer_tokens / s for s in loop]),
                                   "seconds": [round(s, 2) for s in loop]},
        "ratio_vs_encode_batch_fast": round(statistics.median(batch) / statistics.median(ours), 3),
        "ratio_vs_encode_loop": round(statistics.median(loop) / statistics.median(ours), 3),
        "note": "prepare is timed end to end (read, hash, tokenize, write shards); peers encode in-memory "
                "text only. Ratio > 1: prepare is faster.",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
