"""A user's own data: one big text file, Chinese, a folder of code, stray bytes and legacy encodings.

Covers what a document is (data.max_doc_bytes) and how a file's bytes become text; the quickstart
runs on such data are in test_quickstart_own_data.py.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from corpora import CODE, LIMIT, WORDS, cfg_for, chinese, code_folder, english, split_texts

from lmforge.data.documents import split_text
from lmforge.data.prepare import prepare
from lmforge.data.shards import read_manifest
from lmforge.data.sources import SourceStats, iter_documents
from lmforge.errors import LmforgeError
from lmforge.stages import data_prompt
from lmforge.tokenizer import Tokenizer, train_tokenizer

# --- what a document is ---------------------------------------------------------------------------

def pieces_of(text: str, limit: int) -> list[tuple[int, str]]:
    return list(split_text([text], limit))


def test_split_text_groups_lines_and_prefers_paragraphs():
    rng = random.Random(1)
    paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 300))) + "\n" for _ in range(300)]
    text = "\n".join(paras)  # paragraphs of one long line, blank lines between
    pieces = pieces_of(text, 4096)
    assert "".join(t for _, t in pieces) == text
    assert all(len(t.encode()) <= 4096 for _, t in pieces)
    assert all(t.endswith("\n\n") for _, t in pieces[:-1])  # every cut is at a paragraph break
    assert all(len(t) >= 2048 for _, t in pieces[:-1])  # ... that leaves the document at least half full
    starts = [n for n, _ in pieces]
    assert starts[0] == 1 and starts == sorted(starts)
    assert text.splitlines(keepends=True)[starts[1] - 1] == pieces[1][1].splitlines(keepends=True)[0]

    book = english(100_000)  # no blank lines: cut between lines, documents nearly full
    pieces = [t for _, t in pieces_of(book, 4096)]
    assert "".join(pieces) == book and all(t.endswith("\n") for t in pieces)
    assert all(3800 < len(t) <= 4096 for t in pieces[:-1])

    # Chinese without a single line break: cut after a punctuation mark, never inside a character
    verse = chinese(50_000, newline="")
    pieces = [t for _, t in pieces_of(verse, 4096)]
    assert "".join(pieces) == verse and len(pieces) >= 12
    assert all(len(t.encode()) <= 4096 and t[-1] in "，。" for t in pieces[:-1])

    assert pieces_of(book, 0) == [(1, book)]  # 0: no limit


def test_split_text_does_not_depend_on_how_the_text_arrives():
    """Streamed in chunks that end at line ends, a text is cut exactly as when it is whole."""
    rng = random.Random(2)
    parts = []
    for _ in range(400):  # blank-line runs, whitespace-only lines, long and short lines, Chinese, code
        parts.append(rng.choice([
            "\n", "   \n", "\n\n\n", english(rng.randint(10, 600), rng.random()) ,
            chinese(rng.randint(10, 3000), rng.randint(0, 99), newline=rng.choice(["", "\n"])),
            "    return x  # indented\n", "x" * rng.randint(1, 5000) + "\n"]))
    text = "".join(parts)
    whole = pieces_of(text, 2048)
    lines = text.splitlines(keepends=True)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(lines)), 40))
        chunks = ["".join(lines[a:b]) for a, b in zip([0, *cuts], [*cuts, len(lines)])]
        assert list(split_text(chunks, 2048)) == whole
    assert "".join(t for _, t in whole) == text and all(len(t.encode()) <= 2048 for _, t in whole)
    assert all(n == 1 + text.count("\n", 0, sum(len(t) for _, t in whole[:i])) for i, (n, _) in enumerate(whole))


def test_a_folder_of_code_and_one_huge_code_file(tmp_path):
    folder = code_folder(tmp_path / "code")
    docs = list(iter_documents([str(folder)]))
    assert len(docs) == len(CODE) and all(d.line == 1 for d in docs)  # one document per file
    # one huge code file: cut between functions (at blank lines), into train and val
    big = tmp_path / "all.py"
    big.write_text("".join(d.text for d in docs) * 2, encoding="utf-8")
    pieces = list(iter_documents([str(big)]))
    assert len(pieces) >= 8 and all(d.text.endswith("\n\n") and len(d.text) <= LIMIT for d in pieces[:-1])
    cfg = cfg_for(tmp_path / "py", [big])
    train_tokenizer(cfg)
    summary = prepare(cfg)
    assert summary["train"]["documents"] >= 4 and summary["val"]["documents"] >= 1

    # the sample prompt: the first words of the first validation document, else of the first training one
    run, tok = tmp_path / "py", Tokenizer.load(tmp_path / "py" / "tokenizer")
    for split in ("val", "train"):
        first_line = next(line.strip() for line in split_texts(run, split)[0].splitlines() if line.strip())
        prompt = data_prompt(tok, run / "data")
        assert prompt and first_line.startswith(prompt) and len(prompt.encode()) <= 32
        if split == "val":
            shutil.rmtree(run / "data" / "val")


def test_max_doc_bytes_is_checked(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"data.max_doc_bytes must be 0 \(no limit\) or at least 1024, got 10"):
        list(iter_documents([str(f)], max_doc_bytes=10))


# --- encodings ------------------------------------------------------------------------------------

def test_stray_bytes_are_replaced_with_a_warning(tmp_path, capsys):
    text = english(200_000, seed=3).encode()
    data = bytearray(text)
    for off in (5000, 120_000, 199_000):
        data[off] = 0x92  # a cp1252 apostrophe in a UTF-8 file
    f = tmp_path / "stray.txt"
    f.write_bytes(bytes(data))
    stats = SourceStats()
    docs = list(iter_documents([str(f)], stats=stats))
    joined = "".join(d.text for d in docs)
    assert joined.count("\ufffd") == 3 and len(joined) == len(text)  # each bad byte is one U+FFFD, nothing else
    assert stats.decoding == [{"file": str(f), "encoding": "utf-8", "replaced_bytes": 3, "first_bad_byte": 5000}]
    err = " ".join(capsys.readouterr().err.split())  # rich may wrap the line
    assert f"WARNING {f}: 3 byte(s) are not valid utf-8, the first at byte offset 5,000" in err

    # line-streamed formats follow the same rule: a bad line deep in the file is counted, not fatal
    rows = [json.dumps({"text": s}) for s in english(100_000, seed=4).splitlines()]
    raw = ("\n".join(rows) + "\n").encode()
    at = raw.index(b"\n", 80_000) + 12  # inside the text of a row far into the file
    jl = tmp_path / "rows.jsonl"
    jl.write_bytes(raw[:at] + b"\xff\xfe" + raw[at:])
    cfg = cfg_for(tmp_path / "run", [jl, f])
    train_tokenizer(cfg)
    prepare(cfg)
    m = read_manifest(tmp_path / "run" / "data" / "train")
    assert m["decoding"] == [
        {"file": str(jl), "encoding": "utf-8", "replaced_bytes": 2, "first_bad_byte": at},
        {"file": str(f), "encoding": "utf-8", "replaced_bytes": 3, "first_bad_byte": 5000}]


def test_legacy_encodings_are_decoded_not_replaced(tmp_path, capsys):
    zh = chinese(20_000, seed=5)
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes(zh.encode("gbk"))
    ko = "이것은 한국어 문장입니다. 인코딩 감지가 올바르게 작동하는지 확인합니다. 서울은 아름다운 도시입니다.\n" * 40
    euckr = tmp_path / "korean.txt"
    euckr.write_bytes(ko.encode("euc_kr"))  # its bytes are valid GB2312 too: must not become Chinese
    jl = tmp_path / "gbk.jsonl"
    jl.write_bytes("".join(json.dumps({"text": s}, ensure_ascii=False) + "\n"
                           for s in zh.splitlines()).encode("gbk"))
    stats = SourceStats()
    docs = list(iter_documents([str(gbk), str(euckr), str(jl)], stats=stats))
    assert "".join(d.text for d in docs if d.source == str(gbk)) == zh
    assert "".join(d.text for d in docs if d.source == str(euckr)) == ko
    assert [d.text for d in docs if d.source == str(jl)] == zh.splitlines()
    korean = {"euc_kr", "cp949"}  # cp949 is EUC-KR's superset
    assert [(d["file"], d["encoding"] in korean if d["file"] == str(euckr) else d["encoding"], d["replaced_bytes"])
            for d in stats.decoding] == [(str(gbk), "gbk", 0), (str(euckr), True, 0), (str(jl), "gbk", 0)]
    err = capsys.readouterr().err
    assert "WARNING" not in err and f"{gbk}: decoded as gbk" in err

    # single-byte code pages: a non-Latin alphabet is told reliably, Latin-script ones are not guessed
    ru = "Это проверка. Мы проверяем определение кодировки для русского текста, строка за строкой.\n" * 30
    cyr = tmp_path / "russian.txt"
    cyr.write_bytes(ru.encode("cp1251"))
    stats = SourceStats()
    assert "".join(d.text for d in iter_documents([str(cyr)], stats=stats)) == ru
    assert stats.decoding == [{"file": str(cyr), "encoding": "cp1251", "replaced_bytes": 0}]
    de = tmp_path / "german.txt"
    de.write_bytes(("Die Straße führt über die Brücke nach Köln, wo wir schöne Häuser sahen.\n" * 30).encode("latin-1"))
    with pytest.raises(LmforgeError, match=r"german\.txt: not UTF-8 \(210 of the first 2,160 bytes are invalid, "
                                           r"the first at byte 8\) .* convert it to UTF-8 \(e\.g\. with `iconv -f "):
        list(iter_documents([str(de)]))

    # a folder of many such files: five named, the rest counted (each is in the manifest)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.txt").write_bytes(chinese(2000, seed=i).encode("gbk"))
    stats = SourceStats()
    assert len(list(iter_documents([str(folder)], stats=stats))) == 8 and len(stats.decoding) == 8
    err = capsys.readouterr().err
    assert err.count(": decoded as gbk") == 5 and "... and 3 more file(s) were decoded as gbk" in err


