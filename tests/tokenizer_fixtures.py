"""Small tokenizers in other formats, made in the test (nothing is downloaded).

A Llama-3 style tokenizer.json (its split regex, BOS from a TemplateProcessing post-processor,
its special tokens) built with `tokenizers`; sentencepiece models trained with sentencepiece's own
trainer; `.tiktoken` rank files written from a small byte-level BPE.
"""

from __future__ import annotations

import base64
import io
import json
import random
import sysconfig
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.tokenizer_formats import byte_chars

# What every adopted tokenizer must encode exactly as its original library does.
TEXTS = {
    "chinese": "机器学习是人工智能的一个分支。今天天气很好，我们去公园散步吧！\n深度学习模型需要大量的数据和计算资源，"
               "「自然语言处理」是其中最活跃的方向之一：２０２４年，中文大模型发展迅速。",
    "english": "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'LL see: 12,345.67 apples!\n"
               "  Tokenizers split text into pieces;   a model learns which piece comes next.",
    "code": "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # 递归\n\n"
            "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\r\n\r\n    x = {'key': [1, 22, 333, 4444]}  \n",
}

_ZH = ("机器学习 人工智能 分支 今天 天气 很好 我们 公园 散步 深度学习 模型 需要 大量 数据 计算 资源 自然语言 处理 "
       "其中 活跃 方向 之一 中文 发展 迅速 使用 分词器 文本 切成 词元 训练 质量 决定 能力 函数 返回 斐波那契 数列 "
       "递归 循环 实现 春眠 不觉晓 处处 闻啼鸟 夜来 风雨声 花落 知多少 床前 明月光 疑是 地上霜 举头 望明月 低头 "
       "思故乡 北京 上海 学生 老师 学校 电脑 手机 程序 代码 错误 测试 结果 问题 答案 时间 世界 国家 人民").split()
_EN = ("the quick brown fox jumps over lazy dog tokenizers split text into pieces a model learns which piece comes "
       "next it's small corpus isn't we'll see how well compresses numbers like are digits every document ends "
       "with an end of token training data quality decides what can do she sells sea shells by shore language "
       "models predict they were going to run tests on their machine before lunch because nobody wanted "
       "surprises later in week research engineers compare results carefully and write notes about each "
       "experiment so that others understand why something worked or failed").split()
_CODE_FILES = ("textwrap.py", "json/decoder.py", "json/encoder.py", "string.py", "bisect.py", "heapq.py")


def _code_lines() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [line for f in _CODE_FILES if (stdlib / f).is_file()
            for line in (stdlib / f).read_text(encoding="utf-8").splitlines()]


def corpus_docs(n: int = 300, seed: int = 0) -> list[str]:
    """Documents mixing Chinese, English and Python code, deterministic for a seed."""
    rng = random.Random(seed)
    code = _code_lines()
    docs = []
    for _ in range(n):
        zh = "，".join("".join(rng.choices(_ZH, k=rng.randint(3, 7))) for _ in range(3)) + "。"
        en = " ".join(rng.choices(_EN, k=rng.randint(10, 25))).capitalize() + f", {rng.randint(0, 99999)}."
        start = rng.randrange(max(1, len(code) - 12))
        docs.append(f"{zh}\n{en}\n\n" + "\n".join(code[start:start + 12]) + "\n")
    return docs


def write_corpus(folder: Path, n: int = 300) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(corpus_docs(n)):
        (folder / f"{i:04d}.txt").write_text(doc, encoding="utf-8")
    return folder


# --- Llama-3 style tokenizer.json ----------------------------------------------------------------

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|eot_id|>"]


def byte_level_bpe(vocab_size: int, pattern: str = LLAMA3_PATTERN) -> HFTokenizer:
    """A byte-level BPE trained on corpus_docs() with `pattern` as its split regex."""
    tok = HFTokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_docs(), trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def llama3_folder(folder: Path, config: dict | None = None, vocab_size: int = 700) -> Path:
    """tokenizer.json + tokenizer_config.json laid out as Meta-Llama-3-8B-Instruct ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = byte_level_bpe(vocab_size)
    tok.add_special_tokens(LLAMA3_SPECIALS)  # after the BPE vocabulary, as Llama-3's 128000+
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    tok.save(str(folder / "tokenizer.json"))
    meta = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>", "model_max_length": 131072, "clean_up_tokenization_spaces": True,
            "chat_template": "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                             "{{ m['content'] }}<|eot_id|>{% endfor %}"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config if config is not None else meta))
    return folder


# --- sentencepiece ---------------------------------------------------------------------------------

# Llama-2 / Mistral v1: BPE, byte fallback, digits split, identity normalization, no whitespace removal
LLAMA2_SPM = dict(model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
                  normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                  character_coverage=0.9995)
# T5 style: unigram with sentencepiece's defaults (NFKC, extra whitespace removed)
UNIGRAM_SPM = dict(model_type="unigram", hard_vocab_limit=False)


def sentencepiece_model(path: Path, vocab_size: int = 800, **options) -> Path:
    import sentencepiece as spm

    out = io.BytesIO()
    lines = [line for doc in corpus_docs() for line in doc.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
                                   minloglevel=2, num_threads=1, **options)
    path.write_bytes(out.getvalue())
    return path


# --- tiktoken ----------------------------------------------------------------------------------------

def tiktoken_ranks(pattern: str, vocab_size: int = 700) -> dict[bytes, int]:
    """Token bytes -> rank of a small byte-level BPE (ranks in the order its merges were learned).

    Every 2- and 3-digit number is a token too, as in cl100k and o200k, so a split regex that does
    not cut digits into groups of three gives different ids.
    """
    tok = byte_level_bpe(vocab_size, pattern.replace("}+", "}"))
    back = {c: b for b, c in enumerate(byte_chars())}
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    ranks = {bytes(back[c] for c in spelled): rank for spelled, rank in vocab}
    for number in [f"{i:02d}" for i in range(100)] + [f"{i:03d}" for i in range(1000)]:
        ranks.setdefault(number.encode(), len(ranks))
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path
