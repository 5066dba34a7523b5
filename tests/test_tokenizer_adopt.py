"""Adopting tokenizers users already have: Llama-3 / Qwen / Mistral tokenizer.json, sentencepiece, tiktoken.

Each must encode exactly as its original library does on Chinese, English and code, keep its own
eos / bos, start documents with the BOS its post-processor adds, and still load in transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizer_fixtures import (
    LLAMA2_SPM,
    LLAMA3_SPECIALS,
    TEXTS,
    UNIGRAM_SPM,
    byte_level_bpe,
    corpus_docs,
    llama3_folder,
    sentencepiece_model,
    tiktoken_ranks,
    write_corpus,
    write_tiktoken,
)
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, processors

from lmforge.config import Config
from lmforge.data.prepare import _encode_job, _init_worker, encode_docs, prepare
from lmforge.errors import LmforgeError
from lmforge.tokenizer import CHAT_TEMPLATE, EOT, IM_END, IM_START, Tokenizer, render_chat, train_tokenizer
from lmforge.tokenizer_formats import TIKTOKEN_ENCODINGS, Adopted, check_parity, special_ids

TEXT_NAMES = list(TEXTS)


def adopt(tmp_path: Path, from_file: Path, *overrides: tuple[str, object], sources: list[Path] = ()) -> dict:
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.tokenizer.from_file = str(from_file)
    cfg.tokenizer.held_out_fraction = 0.1
    cfg.data.sources = [str(s) for s in sources]
    for key, value in overrides:
        setattr(cfg.tokenizer, key, value)
    return train_tokenizer(cfg)


def auto_tokenizer(folder: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder))


# --- Llama-3 / Qwen / Mistral tokenizer.json -----------------------------------------------------

@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Path:
    return llama3_folder(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def llama3_run(llama3, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama3_run")
    report = adopt(root, llama3, sources=[write_corpus(root / "corpus", 60)])
    assert report["adopted"]["format"] == "tokenizer.json" and report["adopted"]["added_tokens"] == []
    return root / "run"


def test_llama3_keeps_its_own_eos_and_bos(llama3, llama3_run):
    original = HFTokenizer.from_file(str(llama3 / "tokenizer.json"))
    t = Tokenizer.load(llama3_run / "tokenizer")
    # the Instruct config's eos_token <|eot_id|> ends a chat turn; documents end with <|end_of_text|>
    assert t.eos_token == "<|end_of_text|>" and t.eot_id == original.token_to_id("<|end_of_text|>")
    assert t.bos_token == "<|begin_of_text|>" and t.bos_id == original.token_to_id("<|begin_of_text|>")
    assert t.add_bos and t.doc_prefix == [t.bos_id]
    assert t.im_start_id is None and t.im_end_id is None and t.chat_template is None  # not asked for
    assert t.vocab_size == original.get_vocab_size()  # nothing added: a Llama-3 model's embeddings still fit
    meta = json.loads((llama3_run / "tokenizer" / "tokenizer_config.json").read_text())
    assert (meta["eos_token"], meta["bos_token"], meta["pad_token"], meta["add_bos_token"]) == (
        "<|end_of_text|>", "<|begin_of_text|>", "<|end_of_text|>", True)
    assert "chat_template" not in meta and not (llama3_run / "tokenizer" / "chat_template.jinja").exists()
    report = json.loads((llama3_run / "tokenizer" / "report.json").read_text())
    assert report["adopted"]["eos_token"] == "<|end_of_text|>" and report["adopted"]["add_bos"] is True
    assert report["special_tokens"] == {"<|end_of_text|>": t.eot_id, "<|begin_of_text|>": t.bos_id}


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_llama3_encodes_as_tokenizers_and_transformers(llama3, llama3_run, name):
    text = TEXTS[name]
    original = HFTokenizer.from_file(str(llama3 / "tokenizer.json"))
    t = Tokenizer.load(llama3_run / "tokenizer")
    ids = t.encode(text)
    assert ids == original.encode(text, add_special_tokens=False).ids
    assert t.doc_prefix + ids == original.encode(text).ids  # the BOS its post-processor adds
    hf = auto_tokenizer(llama3_run / "tokenizer")
    assert hf.encode(text) == [t.bos_id] + ids and hf.encode(text, add_special_tokens=False) == ids
    assert hf.eos_token_id == t.eot_id and hf.bos_token_id == t.bos_id
    assert t.decode(ids) == text == hf.decode(ids)


def test_documents_start_with_bos(llama3_run, tmp_path):
    t = Tokenizer.load(llama3_run / "tokenizer")
    docs = [TEXTS["chinese"], TEXTS["code"]]
    want = [t.bos_id, *t.encode(docs[0]), t.eot_id, t.bos_id, *t.encode(docs[1]), t.eot_id]
    assert encode_docs(t.tok, docs, t.eot_id, "uint16", t.bos_id).tolist() == want
    _init_worker(t.tok.to_str())  # the worker processes' path, in this process
    assert _encode_job((docs, t.eot_id, "uint16", t.bos_id))[0].tolist() == want
    assert encode_docs(t.tok, docs, t.eot_id, "uint16").tolist() == [i for i in want if i != t.bos_id]

    # prepare lays every document out that way
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(corpus_docs(12)):
        (corpus / f"{i}.txt").write_text(doc, encoding="utf-8")
    cfg = Config(run_dir=str(llama3_run))
    cfg.data.sources, cfg.data.workers, cfg.data.val_fraction = [str(corpus)], 1, 0.0
    prepare(cfg)
    manifest = json.loads((llama3_run / "data" / "train" / "manifest.json").read_text())
    ids = np.fromfile(llama3_run / "data" / "train" / manifest["shards"][0]["file"], dtype=manifest["dtype"])
    assert manifest["eot_id"] == t.eot_id and manifest["documents"] == 12
    assert (ids == t.bos_id).sum() == (ids == t.eot_id).sum() == 12
    starts = np.flatnonzero(ids == t.eot_id)[:-1] + 1
    assert ids[0] == t.bos_id and (ids[starts] == t.bos_id).all()


def test_add_chat_tokens(llama3, tmp_path):
    report = adopt(tmp_path, llama3, ("add_chat_tokens", True))
    original = HFTokenizer.from_file(str(llama3 / "tokenizer.json"))
    n = original.get_vocab_size()
    t = Tokenizer.load(tmp_path / "run" / "tokenizer")
    assert (t.im_start_id, t.im_end_id) == (n, n + 1) and t.vocab_size == n + 2  # appended: old ids unchanged
    assert report["adopted"]["added_tokens"] == [IM_START, IM_END] and report["adopted"]["chat_tokens"]
    assert t.encode(TEXTS["code"]) == original.encode(TEXTS["code"], add_special_tokens=False).ids
    assert t.chat_template == CHAT_TEMPLATE
    hf = auto_tokenizer(tmp_path / "run" / "tokenizer")
    msgs = [{"role": "system", "content": "简洁回答。"}, {"role": "user", "content": "def f(): pass"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render_chat(msgs, True)


def test_qwen_style_instruct_tokenizer(tmp_path):
    """Qwen ships <|endoftext|> and the ChatML tokens, with eos_token <|im_end|> in the Instruct config."""
    tok = byte_level_bpe(400)
    tok.add_special_tokens([EOT, IM_START, IM_END])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": IM_END, "pad_token": EOT, "bos_token": None, "add_bos_token": False}))
    report = adopt(tmp_path, tmp_path / "tokenizer.json")
    t = Tokenizer.load(tmp_path / "run" / "tokenizer")
    assert t.eot_id == tok.token_to_id(EOT) and t.bos_id is None and not t.add_bos
    assert t.im_end_id == tok.token_to_id(IM_END) and t.chat_template == CHAT_TEMPLATE  # has them: no flag needed
    assert report["adopted"]["added_tokens"] == [] and t.vocab_size == tok.get_vocab_size()
    assert t.encode(TEXTS["chinese"]) == tok.encode(TEXTS["chinese"]).ids


def test_mistral_style_without_config(tmp_path):
    """</s> and <s> are found without a tokenizer_config.json; the BOS comes from the post-processor."""
    raw = HFTokenizer(models.BPE(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}, merges=[],
                                 unk_token="<unk>"))
    raw.add_special_tokens(["<unk>", "<s>", "</s>"])
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    raw.save(str(tmp_path / "mistral.json"))
    adopt(tmp_path, tmp_path / "mistral.json")
    t = Tokenizer.load(tmp_path / "run" / "tokenizer")
    assert (t.eos_token, t.eot_id, t.bos_token, t.bos_id, t.add_bos) == ("</s>", 2, "<s>", 1, True)


def test_bos_found_in_a_vocabulary_that_cannot_spell_hello():
    raw = HFTokenizer(models.BPE(vocab={"<s>": 0, "</s>": 1, "a": 2}, merges=[]))  # no <unk>: "Hello" is []
    raw.add_special_tokens(["<s>", "</s>"])
    raw.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    t = Tokenizer(raw)
    assert (t.bos_id, t.add_bos, t.eot_id, t.doc_prefix) == (0, True, 1, [0])


def test_add_bos_token_wins_over_the_post_processor(tmp_path):
    """A folder whose config says add_bos_token=true but whose tokenizer.json adds nothing (transformers
    follows the config): documents get the BOS and the saved tokenizer.json adds it too."""
    raw = HFTokenizer(models.BPE(vocab={"<s>": 0, "</s>": 1, "a": 2, "b": 3}, merges=[]))
    raw.add_special_tokens(["<s>", "</s>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "add_bos_token": True}))
    adopt(tmp_path, tmp_path)
    t = Tokenizer.load(tmp_path / "run" / "tokenizer")
    assert t.add_bos and t.doc_prefix == [0] and t.tok.encode("ab").ids == [0, 2, 3]
    assert auto_tokenizer(tmp_path / "run" / "tokenizer").encode("ab") == [0, 2, 3]


def test_refuses_a_tokenizer_without_an_end_of_text_token(tmp_path):
    raw = HFTokenizer(models.BPE(vocab={"a": 0, "<|im_end|>": 1}, merges=[]))
    raw.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(LmforgeError, match=r"tokenizer\.json: the tokenizer has no end-of-text token.*"
                                           r"eos_token.*tokenizer_config\.json beside it"):
        adopt(tmp_path, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(LmforgeError, match=r"eos_token '<\|nope\|>' is not in its vocabulary"):
        adopt(tmp_path, tmp_path / "tokenizer.json")
    # the config's eos_token is enough, even a chat-turn token when it is the only end there is
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    adopt(tmp_path, tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "run" / "tokenizer").eot_id == 1


def test_chat_data_without_chat_tokens_names_the_switch(llama3_run):
    from lmforge.data.chat import render_conversation
    from lmforge.infer.chat import render_messages

    t = Tokenizer.load(llama3_run / "tokenizer")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(LmforgeError, match=r"tokenizer\.add_chat_tokens=true"):
        render_conversation(t, msgs)
    with pytest.raises(LmforgeError, match=r"tokenizer\.add_chat_tokens=true"):
        render_messages(t, msgs)


def test_prompts_start_with_bos(llama3_run):
    from lmforge.infer.engine import encode_prompt

    t = Tokenizer.load(llama3_run / "tokenizer")
    assert encode_prompt(t, "def f") == [t.bos_id] + t.encode("def f") and encode_prompt(t, "") == [t.bos_id]
    assert encode_prompt(t, "<|begin_of_text|>def f") == [t.bos_id] + t.encode("def f")  # not twice


# --- sentencepiece -------------------------------------------------------------------------------

SPM_STYLES = {"llama2_bpe": LLAMA2_SPM, "unigram": UNIGRAM_SPM}


@pytest.fixture(scope="module", params=list(SPM_STYLES))
def spm_run(request, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    model = sentencepiece_model(root / "tokenizer.model", **SPM_STYLES[request.param])
    report = adopt(root, model, sources=[write_corpus(root / "corpus", 60)])
    assert report["adopted"]["format"] == "sentencepiece" and report["adopted"]["parity"]["texts"] > 5
    return request.param, model, root / "run" / "tokenizer"


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_sentencepiece_encodes_as_sentencepiece(spm_run, name):
    import sentencepiece as spm

    style, model, tok_dir = spm_run
    sp = spm.SentencePieceProcessor(model_file=str(model))
    text = TEXTS[name]
    t = Tokenizer.load(tok_dir)
    ids = t.encode(text)
    assert ids == sp.encode(text)
    hf = auto_tokenizer(tok_dir)
    assert hf.encode(text, add_special_tokens=False) == ids and hf.encode(text) == [sp.bos_id()] + ids
    if style == "llama2_bpe":  # identity normalization and byte fallback: every text round-trips
        assert t.decode(ids) == text == sp.decode(ids) == hf.decode(ids)


def test_sentencepiece_keeps_its_specials(spm_run):
    import sentencepiece as spm

    _, model, tok_dir = spm_run
    sp = spm.SentencePieceProcessor(model_file=str(model))
    t = Tokenizer.load(tok_dir)
    assert (t.eos_token, t.eot_id) == ("</s>", sp.eos_id()) and (t.bos_token, t.bos_id) == ("<s>", sp.bos_id())
    assert t.unk_token == "<unk>" and t.tok.token_to_id("<unk>") == sp.unk_id() and t.add_bos
    assert t.vocab_size == sp.get_piece_size()
    meta = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert (meta["eos_token"], meta["bos_token"], meta["unk_token"], meta["add_bos_token"]) == (
        "</s>", "<s>", "<unk>", True)


def test_sentencepiece_user_defined_pieces_and_no_bos(tmp_path):
    import sentencepiece as spm

    model = sentencepiece_model(tmp_path / "t5.model", model_type="bpe", user_defined_symbols=["<tool>", "USR1"],
                                bos_id=-1, pad_id=0, eos_id=1, unk_id=2)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    adopt(tmp_path, model)
    t = Tokenizer.load(tmp_path / "run" / "tokenizer")
    assert t.bos_id is None and not t.add_bos and t.eos_token == "</s>" and t.pad_token == "<pad>"
    for text in ["USR1 inside USR1text <tool>call", TEXTS["english"], "  x  USR1  y"]:
        assert t.encode(text) == sp.encode(text)


def test_unigram_byte_fallback_skips_literal_byte_pieces(tmp_path):
    """A literal "<0x41>" may come out as the byte piece in `tokenizers`' Unigram, never in sentencepiece:
    the parity check leaves such texts out instead of refusing the tokenizer; all others must agree."""
    from lmforge.tokenizer_formats import from_sentencepiece

    adopted = from_sentencepiece(sentencepiece_model(tmp_path / "u.model", model_type="unigram", byte_fallback=True,
                                                     hard_vocab_limit=False))
    result = check_parity(adopted, ["x <0x41> y", *TEXTS.values(), "emoji 🚀 unseen ☃"])
    assert result["skipped"] == 1 and result["texts"] >= len(TEXTS) + 1 and result["mismatches"] == 0


# --- tiktoken --------------------------------------------------------------------------------------

def published(encoding: str) -> dict:
    """tiktoken's own definition of an encoding, with its rank-file download replaced by nothing."""
    import tiktoken_ext.openai_public as public

    loader = public.load_tiktoken_bpe
    public.load_tiktoken_bpe = lambda *a, **k: {}
    try:
        return getattr(public, encoding)()
    finally:
        public.load_tiktoken_bpe = loader


@pytest.fixture(scope="module", params=list(TIKTOKEN_ENCODINGS))
def tiktoken_run(request, tmp_path_factory):
    import tiktoken

    encoding = request.param
    root = tmp_path_factory.mktemp(encoding)
    spec = published(encoding)
    ranks = tiktoken_ranks(spec["pat_str"])
    file = write_tiktoken(root / f"{encoding}.tiktoken", ranks)
    report = adopt(root, file, sources=[write_corpus(root / "corpus", 60)])
    # a smaller vocabulary than the real one: specials right after its last rank, spaced as published
    first = min(spec["special_tokens"].values())
    specials = {t: i - first + len(ranks) for t, i in spec["special_tokens"].items()}
    assert report["adopted"]["special_ids"] == specials and report["adopted"]["parity"]["mismatches"] == 0
    reference = tiktoken.Encoding(encoding, pat_str=spec["pat_str"], mergeable_ranks=ranks, special_tokens=specials)
    return reference, root / "run" / "tokenizer"


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_tiktoken_encodes_as_tiktoken(tiktoken_run, name):
    reference, tok_dir = tiktoken_run
    text = TEXTS[name]
    t = Tokenizer.load(tok_dir)
    ids = t.encode(text)
    assert ids == reference.encode_ordinary(text)
    hf = auto_tokenizer(tok_dir)
    assert hf.encode(text) == ids and t.decode(ids) == text == hf.decode(ids) == reference.decode(ids)


def test_tiktoken_specials_and_gaps(tiktoken_run):
    reference, tok_dir = tiktoken_run
    t = Tokenizer.load(tok_dir)
    assert t.eot_id == reference.eot_token and t.bos_id is None and not t.add_bos
    assert t.vocab_size == reference.n_vocab  # gaps between the published ids are filled, not dropped
    text = "x 1234567 y<|endoftext|>z"
    assert t.encode(text) == reference.encode(text, allowed_special="all")
    for special, i in reference._special_tokens.items():
        assert t.decode([i]) == special == reference.decode([i])
    gaps = set(range(reference.max_token_value + 1)) - set(reference._special_tokens.values())
    gaps -= set(range(reference.max_token_value + 1 - len(reference._special_tokens) - 20))
    gaps = {i for i in gaps if i >= min(reference._special_tokens.values())}
    assert all(t.tok.id_to_token(i) == f"<|reserved_{i}|>" for i in gaps)


def test_published_tiktoken_ids_are_kept():
    """A rank file of the encoding itself keeps the ids OpenAI publishes (100257 for cl100k's <|endoftext|>)."""
    for encoding, size in {"r50k_base": 50256, "cl100k_base": 100256, "o200k_base": 199998}.items():
        ids = special_ids(encoding, {i.to_bytes(4, "big"): i for i in range(size)})
        assert ids == published(encoding)["special_tokens"]


def test_tiktoken_encoding_from_the_key(tmp_path):
    ranks = tiktoken_ranks(TIKTOKEN_ENCODINGS["cl100k_base"][0], 300)
    file = write_tiktoken(tmp_path / "vocab.tiktoken", ranks)
    with pytest.raises(LmforgeError, match=r"cannot tell which encoding vocab\.tiktoken is.*tiktoken_encoding"):
        adopt(tmp_path, file)
    report = adopt(tmp_path, file, ("tiktoken_encoding", "o200k_base"))
    assert report["adopted"]["encoding"] == "o200k_base"
    other = write_tiktoken(tmp_path / "ranks.txt", ranks)  # with the key, any file name will do
    assert adopt(tmp_path, other, ("tiktoken_encoding", "r50k_base"))["adopted"]["encoding"] == "r50k_base"


# --- mistakes and missing packages -----------------------------------------------------------------

def test_bad_files(tmp_path):
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(LmforgeError, match=r"cl100k_base\.tiktoken:2: expected `<base64 token> <rank>`"):
        adopt(tmp_path, bad)
    bad.write_text("YQ== 0\n")
    with pytest.raises(LmforgeError, match=r"255 of the 256 single bytes have no rank"):
        adopt(tmp_path, bad)
    # Llama-3's original/tokenizer.model is a tiktoken file under a sentencepiece name
    write_tiktoken(tmp_path / "tokenizer.model", {bytes([b]): b for b in range(256)})
    with pytest.raises(LmforgeError, match=r"tokenizer\.model is a tiktoken rank file.*tokenizer\.json"):
        adopt(tmp_path, tmp_path / "tokenizer.model")
    (tmp_path / "junk.model").write_bytes(b"\x00\x01junk")
    with pytest.raises(LmforgeError, match=r"junk\.model is not a sentencepiece model"):
        adopt(tmp_path, tmp_path / "junk.model")
    with pytest.raises(LmforgeError, match=r"missing\.model does not exist"):
        adopt(tmp_path, tmp_path / "missing.model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmforgeError, match=r"empty holds no tokenizer\.json, tokenizer\.model"):
        adopt(tmp_path, empty)
    assert not (tmp_path / "run" / "tokenizer").exists()


@pytest.mark.parametrize("module, file", [("sentencepiece", "x.model"), ("tiktoken", "cl100k_base.tiktoken"),
                                          ("google.protobuf", "x.model")])
def test_missing_package_says_how_to_install(tmp_path, monkeypatch, module, file):
    (tmp_path / file).write_bytes(b"x")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    package = module.replace("google.", "")
    with pytest.raises(LmforgeError, match=rf"needs the `{package}` package: pip install 'lmforge\[tokenizers\]'"):
        adopt(tmp_path, tmp_path / file)


def test_parity_check_refuses_a_conversion_that_differs():
    tok = byte_level_bpe(300)
    wrong = Adopted(tok, eos=None, reference=lambda texts: [[0] for _ in texts], info={"format": "tiktoken"})
    with pytest.raises(LmforgeError, match=r"encodes \d+ of \d+ texts differently from the original library"):
        check_parity(wrong, ["some text"])
    right = Adopted(tok, eos=None, reference=lambda texts: [e.ids for e in tok.encode_batch(texts)])
    skipped = "has <|endoftext|> in it"
    tok.add_special_tokens([EOT])
    assert check_parity(right, ["plain text", skipped])["skipped"] == 1


def test_llama3_specials_survive(llama3_run):
    t = Tokenizer.load(llama3_run / "tokenizer")
    assert all(t.tok.token_to_id(s) is not None for s in LLAMA3_SPECIALS)
    assert t.encode("<|eot_id|>") == [t.tok.token_to_id("<|eot_id|>")]


# --- the whole pipeline with an adopted tokenizer --------------------------------------------------

def test_pipeline_with_a_sentencepiece_tokenizer(tmp_path, monkeypatch):
    """tokenizer -> prepare -> pretrain -> generate, with a Llama-2 style tokenizer that has no <|endoftext|>."""
    import sentencepiece as spm
    from spine import TINY

    from lmforge.checkpoint import load_model
    from lmforge.config import load_config
    from lmforge.infer.engine import SamplingParams, generate
    from lmforge.infer.loading import load_tokenizer, resolve_checkpoint
    from lmforge.stages import run_prepare, run_pretrain, run_tokenizer

    model_file = sentencepiece_model(tmp_path / "tokenizer.model", **LLAMA2_SPM)
    corpus = write_corpus(tmp_path / "corpus", 120)
    cfg = load_config(overrides=[f"run_dir={tmp_path / 'run'}", f"data.sources=[{corpus}]",
                                 f"tokenizer.from_file={model_file}", "data.val_fraction=0.1", "data.workers=1",
                                 *TINY, "train.max_steps=4", "train.save_every=4", "train.sample_every=0"])
    run_tokenizer(cfg)
    run_prepare(cfg)
    run_pretrain(cfg)
    ckpt = resolve_checkpoint(tmp_path / "run")
    tok = load_tokenizer(ckpt)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    assert (tok.eot_id, tok.bos_id, tok.add_bos) == (sp.eos_id(), sp.bos_id(), True)
    assert auto_tokenizer(ckpt).encode(TEXTS["code"]) == [sp.bos_id()] + sp.encode(TEXTS["code"])
    model = load_model(ckpt)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, seed=0)
    out = generate(model, tok, ["机器学习", ""], params)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)

    # eval on raw files lays documents out as prepare did: BOS, text, EOS
    import lmforge.eval.lm as lm

    seen = []
    real = lm.evaluate_tokens
    monkeypatch.setattr(lm, "evaluate_tokens", lambda m, ids, *a, **k: seen.append(ids) or real(m, ids, *a, **k))
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXTS["english"], encoding="utf-8")
    cfg.eval.files, cfg.eval.seq_len = [str(doc)], 16
    assert lm.evaluate(cfg)["loss"] > 0
    assert seen[0].tolist() == [sp.bos_id(), *sp.encode(TEXTS["english"]), sp.eos_id()]
