"""Arrow files, datasets folders, row filters, and adopted token files (nanoGPT .bin, HDF5): reads and bad input."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from lmforge.config import load_config
from lmforge.data.loader import TokenWindows
from lmforge.data.shards import read_manifest
from lmforge.data.sources import iter_documents
from lmforge.errors import LmforgeError
from lmforge.stages import run_prepare, run_tokenizer

ROWS = {"text": [f"row {i} says {'hello ' * (i % 5 + 1)}" for i in range(12)],
        "lang": ["en" if i % 3 else "fr" for i in range(12)], "score": [i / 10 for i in range(12)]}


def texts(sources, **kw) -> list[str]:
    return [d.text for d in iter_documents([str(s) for s in sources], **kw)]


def write_arrow(path: Path, table: pa.Table) -> Path:
    with ipc.new_stream(str(path), table.schema) as w:  # the stream format `datasets` writes
        for batch in table.to_batches(max_chunksize=5):
            w.write_batch(batch)
    return path


def test_datasets_folder_and_arrow_files_with_a_filter(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(ROWS)
    ds.save_to_disk(str(tmp_path / "hf"))
    assert texts([tmp_path / "hf"]) == ROWS["text"]
    english = [t for t, g in zip(ROWS["text"], ROWS["lang"], strict=True) if g == "en"]
    assert texts([tmp_path / "hf"], row_filter="lang=en") == english
    assert texts([tmp_path / "hf"], row_filter="score>=0.9") == ROWS["text"][9:]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(LmforgeError, match=r"DatasetDict.*dd/train"):
        texts([tmp_path / "dd"])
    table = pa.table(ROWS)
    (tmp_path / "plain").mkdir()
    arrow = write_arrow(tmp_path / "plain" / "part.arrow", table)
    with pa.OSFile(str(tmp_path / "plain" / "file_format.arrow"), "wb") as f, ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    assert texts([tmp_path / "plain"]) == ROWS["text"] * 2  # folders walk .arrow files, both IPC formats
    import zstandard

    (tmp_path / "z.arrow.zst").write_bytes(zstandard.ZstdCompressor().compress(arrow.read_bytes()))
    assert texts([tmp_path / "z.arrow.zst"]) == ROWS["text"]  # a compressed stream, read as it decompresses
    (tmp_path / "cut.arrow.zst").write_bytes((tmp_path / "z.arrow.zst").read_bytes()[:-40])
    with pytest.raises(LmforgeError, match=r"cut\.arrow\.zst: (not a valid Arrow file|corrupt)"):
        texts([tmp_path / "cut.arrow.zst"])
    pq.write_table(table, tmp_path / "t.parquet")
    assert texts([tmp_path / "t.parquet"], row_filter="lang!=en") == ROWS["text"][::3]
    # bad input: errors name the file (and the key)
    with pytest.raises(LmforgeError, match=r"part\.arrow: no column 'body'.*data\.text_field"):
        texts([arrow], text_field="body")
    with pytest.raises(LmforgeError, match=r"part\.arrow: data\.filter names column 'lang2'"):
        texts([arrow], row_filter="lang2=en")
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(arrow.read_bytes()[:200])
    with pytest.raises(LmforgeError, match=r"bad\.arrow: (not a valid Arrow file|corrupt)"):
        texts([bad])
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(LmforgeError, match=r"c\.jsonl: data\.filter"):
        texts([tmp_path / "c.jsonl"], row_filter="lang=en")
    with pytest.raises(LmforgeError, match=r"data\.filter: 'lang~en'"):
        texts([arrow], row_filter="lang~en")
    (tmp_path / "hf" / "state.json").write_text("{")
    with pytest.raises(LmforgeError, match=r"state\.json: not a datasets state\.json"):
        texts([tmp_path / "hf"])


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adopt")
    (root / "c.txt").write_text("hello world, a few words of text for a tokenizer\n" * 50)
    cfg = load_config(overrides=[f"run_dir={root / 'run'}", f"data.sources=[{root / 'c.txt'}]",
                                 "tokenizer.vocab_size=300", "tokenizer.min_frequency=1"])
    run_tokenizer(cfg)
    return root / "run"


def _adopt(tok_run: Path, tmp_path: Path, sources: list[Path], **data):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    if not (run / "tokenizer").exists():
        (run / "tokenizer").symlink_to(tok_run / "tokenizer")
    cfg = load_config(overrides=[f"run_dir={run}", "data.workers=1"])
    cfg.data.sources = [str(s) for s in sources]
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return run_prepare(cfg), run


def _ids(n: int, seed: int, eot: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, 250, n).astype(np.uint16)
    ids[ids == eot] = (eot + 1) % 250
    ids[::50] = eot
    return ids


def test_nanogpt_bin_files_are_adopted_in_place(tok_run, tmp_path):
    from lmforge.tokenizer import Tokenizer

    eot = Tokenizer.load(tok_run / "tokenizer").eot_id
    src = tmp_path / "owt"
    src.mkdir()
    train, val = _ids(5000, 0, eot), _ids(700, 1, eot)
    train.tofile(src / "train.bin")
    val.tofile(src / "val.bin")
    summary, run = _adopt(tok_run, tmp_path, [src])
    assert summary["train"]["tokens"] == 5000 and summary["val"]["tokens"] == 700
    m = read_manifest(run / "data" / "train")
    assert m["adopted"] and m["documents"] == 100 and (run / "data" / "train" / m["shards"][0]["file"]).is_symlink()
    w = TokenWindows(run / "data" / "train", 32)
    assert np.array_equal(w.get(1), train[32:65].astype(np.int64))
    # bad input names the file
    (src / "train.bin").write_bytes(train.tobytes()[:-1])
    with pytest.raises(LmforgeError, match=r"train\.bin: 9999 bytes is not a whole number"):
        _adopt(tok_run, tmp_path, [src])
    big = train.copy()
    big[3] = 60000
    big.tofile(src / "train.bin")
    with pytest.raises(LmforgeError, match=r"train\.bin: token id 60000 is outside"):
        _adopt(tok_run, tmp_path, [src])
    (tmp_path / "t.txt").write_text("text")
    with pytest.raises(LmforgeError, match="mixes token files"):
        _adopt(tok_run, tmp_path, [src / "val.bin", tmp_path / "t.txt"])
    cfg = load_config(overrides=[f"run_dir={run}"])
    cfg.data.sources = [{"path": str(tmp_path / "t.txt"), "weight": 1}, {"path": str(src), "weight": 1}]
    with pytest.raises(LmforgeError, match=r"data\.sources\[1\]\.path: .*holds token files"):
        run_prepare(cfg)


def test_hdf5_token_datasets(tok_run, tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    from lmforge.tokenizer import Tokenizer

    eot = Tokenizer.load(tok_run / "tokenizer").eot_id
    ids = _ids(3000, 2, eot)
    with h5py.File(tmp_path / "tokens_train.h5", "w") as f:
        f.create_dataset("tokens", data=ids.astype(np.int32), chunks=(512,), compression="gzip")
    summary, run = _adopt(tok_run, tmp_path, [tmp_path / "tokens_train.h5"], shard_tokens=1000)
    assert summary["train"] == {"tokens": 3000, "documents": 60, "shards": 3} and "val" not in summary
    w = TokenWindows(run / "data" / "train", 32)
    assert np.array_equal(w.get(0), ids[:33].astype(np.int64))
    with h5py.File(tmp_path / "two_train.h5", "w") as f:
        f.create_dataset("a", data=ids)
        f.create_dataset("b", data=ids)
    with pytest.raises(LmforgeError, match=r"two_train\.h5: no dataset 'text' \(datasets: a, b\)"):
        _adopt(tok_run, tmp_path, [tmp_path / "two_train.h5"])
    (tmp_path / "broken_train.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(LmforgeError, match=r"broken_train\.h5: not a readable HDF5 file"):
        _adopt(tok_run, tmp_path, [tmp_path / "broken_train.h5"])
    real = builtins.__import__

    def no_h5py(name, *a, **k):
        if name == "h5py":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(LmforgeError, match=r"pip install 'lmforge\[hdf5\]'"):
        _adopt(tok_run, tmp_path, [tmp_path / "tokens_train.h5"])


def test_a_hub_dataset_is_streamed_only_when_named(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if name == "missing/ds":
            raise FileNotFoundError("no such dataset")
        return iter([{"text": t, "lang": g} for t, g in zip(ROWS["text"], ROWS["lang"], strict=True)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert texts(["hf:org/ds:sub@validation"], row_filter="lang=fr") == ROWS["text"][::3]
    assert calls == [("org/ds", "sub", "validation", True)]
    assert len(texts(["hf:org/ds"])) == 12 and calls[-1] == ("org/ds", None, "train", True)
    with pytest.raises(LmforgeError, match=r"hf:org/ds': row 1 has no field 'body'"):
        texts(["hf:org/ds"], text_field="body")
    with pytest.raises(LmforgeError, match=r"hf:missing/ds': cannot open the dataset \(FileNotFoundError"):
        texts(["hf:missing/ds"])


def test_a_large_utf16_file_streams_in_pieces(tmp_path, monkeypatch):
    from corpora import chinese

    from lmforge.data import sources

    text = chinese(4_500_000, seed=3)  # about 4.5 MB of UTF-8, 3 MB of UTF-16: several read chunks
    (tmp_path / "big.txt").write_bytes(text.encode("utf-16"))
    reads = []
    real = sources._wide_lines

    def counting(f, dec, by_line):
        for piece in real(f, dec, by_line):
            reads.append(len(piece))
            yield piece

    monkeypatch.setattr(sources, "_wide_lines", counting)
    docs = list(iter_documents([str(tmp_path / "big.txt")], max_doc_bytes=32768))
    assert "".join(d.text for d in docs) == text
    assert len(reads) >= 3 and max(reads) < (1 << 19) + 100  # a MiB of UTF-16 (+ a line) at a time, not all
    (tmp_path / "rows.csv").write_bytes("text\n" .encode("utf-16") + "一\n二\n".encode("utf-16-le"))
    assert texts([tmp_path / "rows.csv"]) == ["一", "二"]
