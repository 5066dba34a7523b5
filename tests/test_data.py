"""Sources, prepare and shards: counts, round trips through shards, determinism, and bad input."""

from __future__ import annotations

import builtins
import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import Config
from lmforge.data import prepare as prep
from lmforge.data.prepare import prepare
from lmforge.data.shards import check_tokenizer, open_shards, read_manifest, token_dtype
from lmforge.data.sources import iter_documents
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, train_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "机器学习是人工智能的一个分支。",
    "def add(a, b):\n    return a + b\n",
    "Emoji 🚀 and numbers 12345.",
    "Second English line, a bit longer than the first one, with commas.",
    "中文和 English 混合 text 123。",
] + [f"document number {i}: {'lorem ipsum ' * (i % 7 + 1)}" for i in range(40)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n"
                            for i, d in enumerate(docs)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory) -> Path:
    """A run folder holding a small trained tokenizer; tests copy nothing, they only read it."""
    root = tmp_path_factory.mktemp("data")
    corpus = write_jsonl(root / "corpus.jsonl", DOCS)
    cfg = Config(run_dir=str(root / "run"))
    cfg.data.sources = [str(corpus)]
    cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency = 400, 1
    train_tokenizer(cfg)
    return root / "run"


def make_cfg(tok_run: Path, tmp_path: Path, sources: list, **data) -> Config:
    """A config whose run folder (in tmp_path) reuses the module's tokenizer via a symlink."""
    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "tokenizer").exists():
        (run / "tokenizer").symlink_to(tok_run / "tokenizer")
    cfg = Config(run_dir=str(run))
    cfg.data.sources = [str(s) for s in sources]
    cfg.data.workers = 1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def split_docs(tok: Tokenizer, split_dir: Path) -> list[str]:
    """Decode a split's shards back into documents (each must end with eot)."""
    arrays, m = open_shards(split_dir)
    ids = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
    assert ids[-1] == m["eot_id"]
    ends = np.flatnonzero(ids == m["eot_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e]) for s, e in zip(starts, ends)]


def no_artifacts(run: Path) -> bool:
    data = run / "data"
    return not data.exists() or not any(data.rglob("manifest.json")) and not any(data.glob(".*tmp*"))


def test_prepare_counts_and_round_trip(tok_run, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS + DOCS[:3] + ["   \n\t "])  # 3 duplicates, 1 blank
    cfg = make_cfg(tok_run, tmp_path, [src], val_fraction=0.0, shard_tokens=50)
    summary = prepare(cfg)
    tok = Tokenizer.load(tok_run / "tokenizer")
    m = read_manifest(tmp_path / "run" / "data" / "train")
    assert m["documents"] == len(DOCS) and m["duplicates_dropped"] == 3
    assert m["bytes"] == sum(len(d.encode()) for d in DOCS)
    assert m["tokens"] == sum(len(tok.encode(d)) + 1 for d in DOCS) == summary["train"]["tokens"]
    assert m["dtype"] == "uint16" and m["tokenizer_hash"] == tok.hash and m["eot_id"] == tok.eot_id
    assert len(m["shards"]) > 1 and all(s["tokens"] <= 50 for s in m["shards"])
    assert m["sources"] == [str(src)] and m["text_field"] == "text" and m["skipped_files"] == 0
    assert split_docs(tok, tmp_path / "run" / "data" / "train") == DOCS
    assert not (tmp_path / "run" / "data" / "val").exists()  # val_fraction=0: no val split
    assert summary["val"]["documents"] == 0 and summary["tokens_per_s"] > 0


def test_split_is_deterministic_and_val_guaranteed(tok_run, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    outs = []
    cfg = make_cfg(tok_run, tmp_path, [src], val_fraction=0.2)
    data = tmp_path / "run" / "data"
    for _ in range(2):
        prepare(cfg)
        outs.append({p.relative_to(data): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()})
    assert outs[0] == outs[1]
    tok = Tokenizer.load(tok_run / "tokenizer")
    train, val = split_docs(tok, data / "train"), split_docs(tok, data / "val")
    assert sorted(train + val) == sorted(DOCS) and 0 < len(val) < len(DOCS)

    # Two documents and a tiny fraction: the hash picks no val document, one is forced into val.
    cfg = make_cfg(tok_run, tmp_path / "c", [write_jsonl(tmp_path / "two.jsonl", DOCS[:2])], val_fraction=1e-9)
    summary = prepare(cfg)
    assert summary["train"]["documents"] == 1 and summary["val"]["documents"] == 1


def test_parallel_equals_serial(tok_run, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_DOCS", 3)  # many small jobs, so ordering across workers matters
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    outs = []
    for workers in (1, 2):
        cfg = make_cfg(tok_run, tmp_path / str(workers), [src], val_fraction=0.1, workers=workers)
        summary = prepare(cfg)
        assert summary["workers"] == workers
        data = tmp_path / str(workers) / "run" / "data"
        outs.append({p.relative_to(data): p.read_bytes() for p in sorted(data.rglob("*.bin"))})
    assert outs[0] == outs[1] and outs[0]


def test_uint32_for_large_vocab(tok_run, tmp_path):
    assert token_dtype(65535) == "uint16" and token_dtype(65536) == "uint32"
    big = Tokenizer.load(tok_run / "tokenizer")
    extra = [f"<x{i}>" for i in range(66000 - big.vocab_size)]
    big.tok.add_tokens(extra)
    run = tmp_path / "run"
    Tokenizer(big.tok).save(run / "tokenizer")
    doc = f"hello {extra[-1]} world"  # id 65999: would wrap around in uint16
    src = tmp_path / "doc.txt"
    src.write_text(doc, encoding="utf-8")
    cfg = make_cfg(tok_run, tmp_path, [src], val_fraction=0.0)
    prepare(cfg)
    arrays, m = open_shards(run / "data" / "train")
    assert m["dtype"] == "uint32" and arrays[0].dtype == np.dtype("<u4") and m["max_token_id"] >= 65535
    assert split_docs(Tokenizer.load(run / "tokenizer"), run / "data" / "train") == [doc]


def test_formats_and_encodings(tok_run, tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("plain text file", encoding="utf-8")
    (d / "gbk.txt").write_bytes("你好，世界。机器学习很有趣！".encode("gbk"))
    (d / "sub" / "b.json").write_text(json.dumps([{"body": "json one"}, {"body": "json two"}]), encoding="utf-8")
    with open(d / "sub" / "c.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "body"], ["1", "csv line,\nwith newline"], ["2", "csv two"]])
    with gzip.open(d / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "gzipped jsonl"}) + "\n")
    import zstandard

    (d / "e.md.zst").write_bytes(zstandard.ZstdCompressor().compress(b"# zstd markdown"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["parquet one", None, "parquet two"]}), d / "f.parquet")
    (d / "image.png").write_bytes(b"\x89PNG\x00\x00")  # unknown extension: not walked
    (d / "blob.txt").write_bytes(b"abc\x00\x01\x02" * 10)  # binary with a text extension: skipped
    (d / ".hidden.txt").write_text("hidden", encoding="utf-8")
    texts = [(doc.text, Path(doc.source).name, doc.line) for doc in iter_documents([str(d)], "body")]
    assert texts == [
        ("plain text file", "a.txt", 1), ("gzipped jsonl", "d.jsonl.gz", 1), ("# zstd markdown", "e.md.zst", 1),
        ("parquet one", "f.parquet", 1), ("parquet two", "f.parquet", 3),
        ("你好，世界。机器学习很有趣！", "gbk.txt", 1),
        ("json one", "b.json", 1), ("json two", "b.json", 2),
        ("csv line,\nwith newline", "c.csv", 2), ("csv two", "c.csv", 4),
    ]
    cfg = make_cfg(tok_run, tmp_path, [d, str(d / "*.txt")], text_field="body", val_fraction=0.0)
    summary = prepare(cfg)
    assert summary["train"]["documents"] == 10 and summary["skipped_files"] == 1
    assert read_manifest(tmp_path / "run" / "data" / "train")["skipped_files"] == 1
    tok = Tokenizer.load(tok_run / "tokenizer")
    assert "你好，世界。机器学习很有趣！" in split_docs(tok, tmp_path / "run" / "data" / "train")


@pytest.mark.parametrize("case", ["empty", "binary", "missing_dir", "permission", "bad_json",
                                  "missing_field", "undecodable", "truncated_zst"])
def test_bad_input(tok_run, tmp_path, monkeypatch, case):
    f = tmp_path / "in.jsonl"
    if case == "empty":
        f = tmp_path / "empty.txt"
        f.write_text("  \n\n", encoding="utf-8")
        match = r"no documents in .*empty\.txt"
    elif case == "binary":
        f = tmp_path / "blob.txt"
        f.write_bytes(b"\x7fELF\x00\x00\x01")
        match = r"blob\.txt: binary file"
    elif case == "missing_dir":
        f = tmp_path / "nowhere" / "x.txt"
        match = r"source not found: .*nowhere/x\.txt.*does not exist"
    elif case == "permission":
        f.write_text('{"text": "fine"}\n', encoding="utf-8")
        real_open = builtins.open

        def deny(path, *args, **kw):
            if str(path) == str(f):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kw)

        monkeypatch.setattr(builtins, "open", deny)
        match = r"in\.jsonl: permission denied"
    elif case == "bad_json":
        f.write_text('{"text": "ok"}\n{"text": "broken\n', encoding="utf-8")
        match = r"in\.jsonl:2: invalid JSON"
    elif case == "missing_field":
        f.write_text('{"text": "ok"}\n\n{"body": "x", "id": 3}\n', encoding="utf-8")
        match = r"in\.jsonl:3: no field 'text' \(fields present: body, id\)"
    elif case == "undecodable":
        f = tmp_path / "noise.txt"
        f.write_bytes(bytes(range(128, 256)) * 4)
        match = r"noise\.txt: not UTF-8 \(512 of the first 512 bytes are invalid, the first at byte 0\)"
    else:
        import zstandard

        f = tmp_path / "cut.jsonl.zst"
        f.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "x"}\n' * 1000)[:-4])
        match = r"cut\.jsonl\.zst: cannot read \(compressed file ended"
    cfg = make_cfg(tok_run, tmp_path, [f])
    with pytest.raises(LmforgeError, match=match):
        prepare(cfg)
    assert no_artifacts(tmp_path / "run")


def test_failed_prepare_keeps_previous_split(tok_run, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    cfg = make_cfg(tok_run, tmp_path, [good], val_fraction=0.1)
    prepare(cfg)
    before = (tmp_path / "run" / "data" / "train" / "manifest.json").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    cfg.data.sources = [str(good), str(bad)]
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:2: invalid JSON"):
        prepare(cfg)
    assert (tmp_path / "run" / "data" / "train" / "manifest.json").read_bytes() == before
    assert read_manifest(tmp_path / "run" / "data" / "val")["documents"] > 0
    assert not list((tmp_path / "run" / "data").glob(".*"))


def test_check_tokenizer_and_truncated_shard(tok_run, tmp_path):
    cfg = make_cfg(tok_run, tmp_path, [write_jsonl(tmp_path / "d.jsonl", DOCS)], val_fraction=0.0)
    prepare(cfg)
    split = tmp_path / "run" / "data" / "train"
    m = read_manifest(split)
    tok = Tokenizer.load(tok_run / "tokenizer")
    check_tokenizer(m, tok)
    check_tokenizer(m, tok.hash, vocab_size=tok.vocab_size)
    with pytest.raises(LmforgeError, match=r"data/train: the shards were made with tokenizer .*lmforge prepare"):
        check_tokenizer(m, "0" * 64)
    with pytest.raises(LmforgeError, match=r"token id \d+ does not fit a model with vocab_size 10"):
        check_tokenizer(m, 10)

    shard = split / m["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(LmforgeError, match=r"shard_00000\.bin: \d+ bytes but the manifest says"):
        open_shards(split)
    shard.unlink()
    with pytest.raises(LmforgeError, match=r"shard_00000\.bin: shard listed in .* is missing"):
        read_manifest(split)
    (split / "manifest.json").write_text("{trunc")
    with pytest.raises(LmforgeError, match=r"manifest\.json: corrupt manifest"):
        read_manifest(split)
    with pytest.raises(LmforgeError, match=r"manifest\.json: missing"):
        read_manifest(tmp_path / "nope")


def test_missing_tokenizer(tmp_path):
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.data.sources = [str(write_jsonl(tmp_path / "d.jsonl", DOCS))]
    with pytest.raises(LmforgeError, match="no tokenizer at .*run `lmforge tokenizer` first"):
        prepare(cfg)
