"""Tokenizer: lossless round trips, parity with transformers' AutoTokenizer, chat template, specials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.tokenizer import CHAT_TEMPLATE, EOT, Tokenizer, render_chat, train_tokenizer

SAMPLES = {
    "chinese": "机器学习是人工智能的一个分支。今天天气很好，我们去公园散步吧！",
    "english": "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see.",
    "code": "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "emoji": "Launch 🚀 done ✅ family 👨‍👩‍👧 thumbs 👍🏽",
    "whitespace": "  a\t\tb \r\n\r\n   c   \n\n\u3000全角 \u00a0nbsp\n\n\n    \t",
    "specials": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>next",
    "not_nfc": "cafe\u0301 and caf\u00e9",  # round-trips only because there is no normalizer
    "mixed": "用 Python 写 for i in range(10): print(i**2)  # 注释 😀\n",
}


def make_corpus(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, (name, text) in enumerate(SAMPLES.items()):
        (d / f"{i:02d}_{name}.txt").write_text((text + "\n") * 20, encoding="utf-8")
    (d / "numbers.txt").write_text("12345 67890 " * 200, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    cfg = Config(run_dir=str(root / "run"))
    cfg.data.sources = [str(make_corpus(root / "corpus"))]
    cfg.tokenizer.vocab_size = 600
    cfg.tokenizer.min_frequency = 1
    cfg.tokenizer.held_out_fraction = 0.0
    train_tokenizer(cfg)
    return root / "run" / "tokenizer"


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.mark.parametrize("name", list(SAMPLES))
def test_round_trip(tok, name):
    text = SAMPLES[name]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("name", list(SAMPLES))
def test_autotokenizer_matches(tok, hf, name):
    text = SAMPLES[name]
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == text


def test_files_and_specials(tok, tok_dir, hf):
    assert {p.name for p in tok_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                   "chat_template.jinja", "report.json"}
    meta = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert meta["tokenizer_class"] == "PreTrainedTokenizerFast" and meta["bos_token"] is None
    assert meta["eos_token"] == meta["pad_token"] == EOT and meta["chat_template"] == CHAT_TEMPLATE
    assert (tok.eot_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)
    assert tok.encode(EOT) == [tok.eot_id] and tok.token_id("<|im_end|>") == 2
    assert tok.vocab_size == len(hf) <= 600  # a tiny corpus runs out of merges before 600
    assert hf.eos_token_id == tok.eot_id and hf.pad_token_id == tok.eot_id
    assert tok.decode(tok.encode(SAMPLES["specials"]), skip_special_tokens=True) == "user\nhi\nnext"
    with pytest.raises(LmforgeError, match="not in the tokenizer"):
        tok.token_id("<|nope|>")


def test_digits_split_one_by_one(tok):
    ids = tok.encode("12345 67890")  # trained on many repeats, yet never merged
    digits = [tok.decode([i]) for i in ids]
    assert [d for d in digits if d.strip()] == list("1234567890")


def test_chat_template_matches_transformers(tok, hf):
    msgs = [{"role": "system", "content": "简洁回答。"}, {"role": "user", "content": "def f(): pass\n?"},
            {"role": "assistant", "content": "OK 👍"}, {"role": "user", "content": "again"}]
    for gen in (False, True):
        ours = render_chat(msgs, add_generation_prompt=gen)
        assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == ours
        theirs = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        assert list(theirs) == tok.encode(ours)
    assert render_chat(msgs[:1]) == "<|im_start|>system\n简洁回答。<|im_end|>\n"
    assert render_chat([], add_generation_prompt=True) == "<|im_start|>assistant\n"


def test_save_load_hash_and_determinism(tok, tok_dir, tmp_path):
    tok.save(tmp_path / "copy")
    again = Tokenizer.load(tmp_path / "copy" / "tokenizer.json")
    assert again.hash == tok.hash and again.encode(SAMPLES["mixed"]) == tok.encode(SAMPLES["mixed"])
    # Training is deterministic: the same corpus and config give the same tokenizer.
    cfg = Config(run_dir=str(tmp_path / "run2"))
    cfg.data.sources = [str(make_corpus(tmp_path / "corpus"))]
    cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, cfg.tokenizer.held_out_fraction = 600, 1, 0.0
    train_tokenizer(cfg)
    assert Tokenizer.load(tmp_path / "run2" / "tokenizer").hash == tok.hash


def test_held_out_report(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(40):
        (d / f"{i}.txt").write_text(f"document {i}: " + SAMPLES["english"] + SAMPLES["chinese"], encoding="utf-8")
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.data.sources = [str(d)]
    cfg.tokenizer.vocab_size, cfg.tokenizer.held_out_fraction = 400, 0.25
    report = train_tokenizer(cfg)
    assert 0 < report["held_out_documents"] < 40
    assert report["training_documents"] + report["held_out_documents"] == 40
    assert report["bytes_per_token"] > 1.0
    assert json.loads((tmp_path / "run" / "tokenizer" / "report.json").read_text()) == report


def test_adopt_existing_tokenizer(tok_dir, tmp_path):
    raw = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1, EOT: 2}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.save(str(tmp_path / "adopt.json"))
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.tokenizer.from_file = str(tmp_path / "adopt.json")
    report = train_tokenizer(cfg)
    t = Tokenizer.load(tmp_path / "run" / "tokenizer")
    # the chat tokens change the vocabulary, so they come only when asked for
    assert t.eot_id == 2 and t.im_start_id is None and t.im_end_id is None and t.vocab_size == 3
    assert t.bos_id is None and not t.add_bos and t.chat_template is None
    assert report["adopted_from"] == cfg.tokenizer.from_file and report["adopted"]["chat_tokens"] is False
    cfg.tokenizer.add_chat_tokens = True
    train_tokenizer(cfg)
    t = Tokenizer.load(tmp_path / "run" / "tokenizer")
    assert (t.eot_id, t.im_start_id, t.im_end_id) == (2, 3, 4) and t.chat_template == CHAT_TEMPLATE

    no_eot = HFTokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    no_eot.save(str(tmp_path / "bad.json"))
    cfg.tokenizer.from_file = str(tmp_path / "bad.json")
    with pytest.raises(LmforgeError, match=r"bad\.json.*<\|endoftext\|>"):
        train_tokenizer(cfg)


def test_adopting_an_lmforge_tokenizer_changes_nothing(tok, tok_dir, tmp_path):
    """Same ids, same files, same hash: a run can reuse another run's tokenizer."""
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.tokenizer.from_file = str(tok_dir)
    report = train_tokenizer(cfg)
    again = Tokenizer.load(tmp_path / "run" / "tokenizer")
    assert report["hash"] == again.hash == tok.hash and report["adopted"]["added_tokens"] == []
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "run" / "tokenizer" / name).read_bytes() == (tok_dir / name).read_bytes()
    assert again.encode(SAMPLES["mixed"]) == tok.encode(SAMPLES["mixed"]) and again.doc_prefix == []


def test_load_errors(tmp_path):
    with pytest.raises(LmforgeError, match="no tokenizer at .*run `lmforge tokenizer`"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        Tokenizer.load(tmp_path)


def test_config_errors(tmp_path):
    cfg = Config(run_dir=str(tmp_path / "run"))
    with pytest.raises(LmforgeError, match="tokenizer.sources or data.sources"):
        train_tokenizer(cfg)
    cfg.data.sources = [str(make_corpus(tmp_path / "c"))]
    cfg.tokenizer.vocab_size = 100
    with pytest.raises(LmforgeError, match="vocab_size=100 is too small"):
        train_tokenizer(cfg)
    assert not (tmp_path / "run" / "tokenizer").exists()
