"""Tiny tokenizers and random-weight checkpoints for the inference, server and export tests."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from tokenizers import trainers

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig
from lmforge.model.transformer import Transformer, padded_vocab
from lmforge.tokenizer import Tokenizer, new_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "机器学习是人工智能的一个分支。我们喜欢中文和英文。",
    "Hello world! Language models predict the next token.",
    "user assistant system: how are you? I am fine, thank you.",
] * 4


def make_tokenizer(directory: Path, vocab_size: int = 400) -> Tokenizer:
    tok, specials = new_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    from tokenizers import pre_tokenizers

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    wrapped = Tokenizer(tok)
    directory.mkdir(parents=True, exist_ok=True)
    wrapped.save(directory)
    return wrapped


def tiny_config(vocab: int, **overrides) -> ModelConfig:
    values = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=128, vocab_size=padded_vocab(vocab, 64),
                  init_std=0.1, rope_theta=10000.0)
    values.update(overrides)
    return ModelConfig(**values)


def make_model(vocab: int, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab, **overrides))
    with torch.no_grad():  # non-trivial norm weights, so a transposed or misplaced norm is caught
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def make_checkpoint(root: Path, seed: int = 0, **overrides) -> tuple[Path, Transformer, Tokenizer]:
    tok_dir = root / "tok"
    tok = make_tokenizer(tok_dir)
    model = make_model(tok.vocab_size, seed, **overrides)
    ckpt = save_checkpoint(root / "ckpt", model, tokenizer_dir=tok_dir)
    return ckpt, model, tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two spinning
    threads can make each step 100x slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
