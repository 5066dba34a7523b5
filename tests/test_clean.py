"""Cleaning before tokenizing: near/exact dedup, quality filters with hand-computed counts, PII, tiktoken."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from test_data import make_cfg, tok_run, write_jsonl  # noqa: F401  (tok_run is a fixture)
from tokenizers import Regex, normalizers, pre_tokenizers

from lmforge.config import FilterConfig
from lmforge.data import dedup, fast_bpe
from lmforge.data.clean import Cleaner, top_ngram_fraction, words
from lmforge.data.dedup import signatures
from lmforge.data.prepare import encode_docs, prepare
from lmforge.data.shards import open_shards
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

VOCAB = ("alpha beta gamma delta river stone cloud paper window garden light music table orange "
         "silver market winter summer forest bridge").split()
HAN = "山水风云天地日月星辰花草树木春夏秋冬江河湖海"


def _doc(rng: random.Random, n: int = 120) -> str:
    return " ".join(rng.choice(VOCAB) + str(rng.randrange(50)) for _ in range(n)) + "."


def _near(text: str, rng: random.Random, changes: int = 2) -> str:
    w = text.split()
    for _ in range(changes):
        w[rng.randrange(len(w))] = "edited"
    return " ".join(w)


def _corpus(tmp_path: Path) -> tuple[Path, list[list[str]], int]:
    """Distinct documents with near-duplicates planted among them (English and Chinese), as groups."""
    rng = random.Random(0)
    base = [_doc(rng) for _ in range(30)] + ["".join(rng.choice(HAN) for _ in range(300)) + "。" for _ in range(5)]
    groups = [[d] for d in base]
    for i in (0, 3, 7, 12, 20):
        groups[i].append(_near(base[i], rng))
    groups[3].append(_near(base[3], rng, 1))  # a second copy of the same original: one cluster of three
    han = base[31]
    groups[31].append(han[:150] + "龙" + han[151:])  # one character changed (龙 is not in HAN)
    docs = [d for g in groups for d in g]
    rng.shuffle(docs)
    return write_jsonl(tmp_path / "near.jsonl", docs), groups, len(docs) - len(groups)


def test_signatures_estimate_jaccard_and_handle_cjk():
    rng = random.Random(1)
    a = _doc(rng, 400)
    b = _near(a, rng, 4)
    c = _doc(rng, 400)
    sig, has = signatures([a, b, c, "", "中文"], 5, 128, 1)
    assert has.tolist() == [True, True, True, False, True]
    assert (sig[0] == sig[1]).mean() > 0.8 and (sig[0] == sig[2]).mean() < 0.2
    assert words("中文text 和 code_1") == ["中", "文", "text", "和", "code_1"]


def test_near_dedup_removes_planted_keeps_distinct_and_is_deterministic(tok_run, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(dedup, "POOL_MIN_WORKERS", 2)  # workers=2: signatures in a pool, workers=1: inline
    monkeypatch.setattr(dedup, "BATCH_BYTES", 4096)  # many batches, so their order across the pool matters
    src, groups, planted = _corpus(tmp_path)
    outs = []
    for workers in (1, 2):
        cfg = make_cfg(tok_run, tmp_path / str(workers), [src], near_dedup=True, workers=workers, val_fraction=0.0)
        summary = prepare(cfg)
        assert summary["near_duplicates_dropped"] == planted and summary["duplicates_dropped"] == 0
        data = tmp_path / str(workers) / "run" / "data"
        report = json.loads((data / "dedup.json").read_text())
        assert report["clusters"] == planted - 1 and report["near_duplicates"] == planted
        ex = report["example_pairs"][0]
        assert ex["similarity"] >= 0.8 and ex["kept"] < ex["dropped"] and ex["kept_text"] and ex["dropped_text"]
        assert summary["train"]["documents"] == len(groups)
        outs.append({p.relative_to(data): p.read_bytes() for p in sorted(data.rglob("*"))
                     if p.suffix == ".bin" or p.name == "dedup.json"})  # manifests name the run folder
    assert outs[0] == outs[1]
    # one document of each group stays (the first in corpus order), whichever it is
    tok = Tokenizer.load(tok_run / "tokenizer")
    arrays, _ = open_shards(tmp_path / "1" / "run" / "data" / "train")
    ids = np.concatenate(arrays).tolist()
    kept, cur = [], []
    for i in ids:
        if i == tok.eot_id:
            kept.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert sorted(sum(d in kept for d in g) for g in groups) == [1] * len(groups)


def test_exact_dedup_on_disk_keeps_first(tok_run, tmp_path):  # noqa: F811
    src = write_jsonl(tmp_path / "d.jsonl", ["one doc here", "two doc", "one doc here", "three", "two doc"])
    summary = prepare(make_cfg(tok_run, tmp_path, [src], val_fraction=0.0))
    assert summary["duplicates_dropped"] == 2 and summary["train"]["documents"] == 3


FILTER_DOCS = [
    # 0: C4 lines: "no punctuation here" (no terminal mark) and "Enable javascript please." go, 2 lines
    "A good line of text here.\nno punctuation here\nEnable javascript please.\nAnother fine sentence ends.",
    # 1: lorem ipsum: the whole document goes
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    # 2: every line short (2 words): the document is left empty and goes
    "Too short.\nAlso short.",
    # 3: Chinese prose: each character is a word, so its lines are long enough and it stays
    "机器学习是人工智能的一个分支。\n我们使用大规模语料训练语言模型。",
]


def _clean(docs: list[str], source: str = "x.jsonl", **kw) -> Cleaner:
    c = Cleaner(FilterConfig(**kw), pii=False)
    for d in docs:
        c(d, source)
    return c


def test_c4_line_filter_counts():
    c = _clean(FILTER_DOCS, lines=True)
    lines, lorem = c.tallies["lines"], c.tallies["lorem_ipsum"]
    assert (lorem.documents, lorem.bytes) == (1, len(FILTER_DOCS[1].encode()))
    dropped0 = "no punctuation here\nEnable javascript please.\n"
    assert lines.documents == 1 and lines.lines == 2 + 2
    assert lines.bytes == len(dropped0.encode()) + len(FILTER_DOCS[2].encode())
    assert c("A good line of text here.\nno punctuation", "a.jsonl") == "A good line of text here.\n"
    # code is not prose: the same rules leave a .py file alone unless filters.code is set
    code = "def f(x):\n    return x\n"
    assert c(code, "m.py") == code and _clean([], lines=True, code=True)(code, "m.py") is None


def test_repetition_filter_counts():
    rep = "same line here.\n" * 4 + "other line.\n"  # 3 of 5 lines repeat an earlier one: 0.6 > 0.3
    grams = "a b " * 20  # the 2-gram "a b" covers far more than 20 % of the characters
    ok = "First paragraph is unique.\n\nSecond paragraph differs entirely."
    c = _clean([rep, grams, ok], repetition=True)
    t = c.tallies["repetition"]
    assert (t.documents, t.bytes) == (2, len(rep) + len(grams))
    assert top_ngram_fraction(["a", "b", "a", "b", "c"], 2) == pytest.approx(4 / 5)


def test_word_filter_counts_and_spares_chinese():
    prose = " ".join(["word"] * 60) + "."  # 60 words of length 4: passes
    few = "only five words are here."  # 5 < 50 words
    longw = " ".join(["extraordinarily"] * 60)  # mean length 15 > 10
    hashes = " ".join(["#tag"] * 60)  # 60 '#' for 60 words: ratio 1 > 0.1
    bullets = "\n".join(["- item number"] * 30)  # every line a bullet: 1.0 > 0.9
    chinese = "机器学习是人工智能的一个分支" * 5  # 70 CJK words, no Latin words: stays
    c = _clean([prose, few, longw, hashes, bullets, chinese], words=True)
    t = c.tallies["words"]
    assert t.documents == 4 and t.bytes == sum(len(x) for x in (few, longw, hashes, bullets))
    assert c.tallies["words"].samples[0] == few


def test_min_chars_and_pii():
    c = Cleaner(FilterConfig(min_chars=10), pii=True)
    assert c("short", "a.txt") is None
    out = c("mail bob.smith+x@example.co.uk or 192.168.1.20, not 999.1.1.1; v6 2001:db8:0:0:0:0:2:1 ok", "a.txt")
    assert out == "mail <EMAIL> or <IP>, not 999.1.1.1; v6 <IP> ok"
    r = c.report()
    assert r["filters"]["min_chars"]["documents"] == 1 and r["filters"]["min_chars"]["bytes"] == 5
    assert r["pii"] == {"email": 1, "ipv4": 1, "ipv6": 1}


@pytest.mark.parametrize("dedup", [True, False])  # filters inside the scan, or in the tokenizing pass
def test_filters_report_beside_manifest(tok_run, tmp_path, dedup):  # noqa: F811
    src = write_jsonl(tmp_path / "f.jsonl", FILTER_DOCS)
    cfg = make_cfg(tok_run, tmp_path, [src], val_fraction=0.0, dedup=dedup)
    cfg.data.filters.lines = True
    summary = prepare(cfg)
    rep = json.loads((tmp_path / "run" / "data" / "filters.json").read_text())
    assert rep["filters"]["lines"]["documents"] == 1 and rep["filters"]["lorem_ipsum"]["documents"] == 1
    assert summary["train"]["documents"] == 2
    assert summary["filtered"]["lines"]["bytes"] == rep["filters"]["lines"]["bytes"]


def test_tiktoken_equals_tokenizers_and_falls_back(tok_run, tmp_path):  # noqa: F811
    tok = Tokenizer.load(tok_run / "tokenizer")
    enc, choice = fast_bpe.convert(tok.tok)
    assert choice.name == "tiktoken", choice.reason
    texts = fast_bpe.PROBE.splitlines(keepends=True) + ["<|endoftext|><|im_start|>x<|im_end|>", "  \t\n\u3000😀"]
    assert fast_bpe.same_ids(enc, tok.tok, texts) is None
    a = encode_docs(tok.tok, texts, tok.eot_id, "uint16", enc=enc)
    b = encode_docs(tok.tok, texts, tok.eot_id, "uint16")
    assert np.array_equal(a, b)
    nfc = Tokenizer.load(tok_run / "tokenizer").tok
    nfc.normalizer = normalizers.NFC()
    assert fast_bpe.convert(nfc)[1].reason == "not convertible to tiktoken: normalizer NFC"
    meta = Tokenizer.load(tok_run / "tokenizer").tok
    meta.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert "isolating regex Split" in fast_bpe.convert(meta)[1].reason


def test_prepare_encoder_choice_same_shards(tok_run, tmp_path):  # noqa: F811
    src = write_jsonl(tmp_path / "d.jsonl", [fast_bpe.PROBE, "def f():\n    return 1\n", "中文 text 😀"])
    outs = []
    for enc in ("tiktoken", "tokenizers"):
        cfg = make_cfg(tok_run, tmp_path / enc, [src], val_fraction=0.0, encoder=enc)
        assert prepare(cfg)["encoder"] == enc
        outs.append((tmp_path / enc / "run" / "data" / "train" / "shard_00000.bin").read_bytes())
    assert outs[0] == outs[1]


def test_prepare_refuses_tiktoken_when_not_convertible(tok_run, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    tok = Tokenizer.load(tok_run / "tokenizer")
    tok.tok.normalizer = normalizers.NFC()
    tok.save(run / "tokenizer")
    src = write_jsonl(tmp_path / "d.jsonl", ["hello world"])
    with pytest.raises(LmforgeError, match="data.encoder=tiktoken, but not convertible"):
        prepare(make_cfg(tok_run, tmp_path, [src], encoder="tiktoken"))
    assert prepare(make_cfg(tok_run, tmp_path, [src], encoder="auto"))["encoder"] == "tokenizers"


def test_tiktoken_gpt2_style_byte_level_regex():
    """A tokenizer that splits with ByteLevel's own (GPT-2) regex converts too, ids equal on the probe."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=1, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([fast_bpe.PROBE * 3, " ".join(VOCAB) * 20, HAN * 20], trainer)
    enc, choice = fast_bpe.convert(tok)
    assert choice.name == "tiktoken", choice.reason
    assert fast_bpe.same_ids(enc, tok, [fast_bpe.PROBE, "  hello   world\n\n", "don't 中文 😀 x=1"]) is None


def _language_model(path: Path) -> Path:
    """A small fastText language-ID model trained here on English and Chinese lines (a stand-in for lid.176).
    Trained in a fresh interpreter: with torch imported first, this fastText build's training gives NaN
    (its predictions are unaffected, which is all prepare uses)."""
    import subprocess
    import sys

    pytest.importorskip("fasttext")
    from corpora import chinese, english

    lines = [f"__label__en {s}" for s in english(20_000, seed=3).splitlines()]
    lines += [f"__label__zh {s}" for s in chinese(20_000, seed=3).splitlines()]
    random.Random(0).shuffle(lines)
    train = path / "langid.txt"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = (f"import fasttext; fasttext.train_supervised(input={str(train)!r}, epoch=5, dim=16, bucket=5000, "
            f"minn=1, maxn=2, verbose=0, thread=1).save_model({str(path / 'langid.bin')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    return path / "langid.bin"


def test_language_filter_keeps_the_named_languages(tok_run, tmp_path):  # noqa: F811
    """data.filters.language=[en] with a local model drops the Chinese documents (counted by hand: 3 files,
    their bytes), keeps the English ones, and reports each document's language; [en, zh] keeps all."""
    from corpora import chinese, english

    model = _language_model(tmp_path)
    src = tmp_path / "docs"
    src.mkdir()
    zh_bytes = 0
    for i in range(5):
        (src / f"en{i}.txt").write_text(english(1500, seed=10 + i), encoding="utf-8")
    for i in range(3):
        text = chinese(1500, seed=20 + i)
        (src / f"zh{i}.txt").write_text(text, encoding="utf-8")
        zh_bytes += len(text.encode("utf-8"))
    for langs, kept in ((["en"], 5), (["en", "zh"], 8)):
        cfg = make_cfg(tok_run, tmp_path / "-".join(langs), [src], val_fraction=0.0, dedup=False)
        cfg.data.filters.language, cfg.data.filters.language_model = langs, str(model)
        summary = prepare(cfg)
        rep = json.loads((tmp_path / "-".join(langs) / "run" / "data" / "filters.json").read_text())
        assert summary["train"]["documents"] == kept
        assert rep["languages"] == {"en": 5, "zh": 3}
        dropped = rep["filters"]["language"]
        assert dropped["documents"] == 8 - kept and dropped["bytes"] == (zh_bytes if kept == 5 else 0)
        assert all(any("\u4e00" <= c <= "\u9fff" for c in s) for s in dropped["samples"])


def test_language_filter_errors_name_the_key(tmp_path):
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match="data.filters.language_model=PATH") as e:
        Cleaner(FilterConfig(language=["en"]), pii=False)
    assert e.value.key == "data.filters.language_model"
    with pytest.raises(LmforgeError, match="no such file"):
        Cleaner(FilterConfig(language=["en"], language_model=str(tmp_path / "lid.176.bin")), pii=False)
    (tmp_path / "bad.bin").write_bytes(b"not a model")
    with pytest.raises(LmforgeError, match="not a fastText model"):
        Cleaner(FilterConfig(language=["en"], language_model=str(tmp_path / "bad.bin")), pii=False)
