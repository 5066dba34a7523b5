"""Memory: the fused chunked loss and activation checkpointing each shrink what a step keeps.

Counted with saved_tensors_hooks (the tensors autograd keeps from forward to backward, parameters
left out), which is exact and independent of the allocator, so it holds on a CPU without
torch.cuda's memory statistics; and the loss's peak from the profiler's allocation events.
"""

from __future__ import annotations

import torch

from lmforge.model.loss import _ce_sum, cross_entropy_sum, free_cpu_logits_buffer
from lmforge.model.presets import model_config
from lmforge.model.transformer import Transformer
from lmforge.train.memory import peak_allocated_bytes, saved_tensor_bytes
from lmforge.train.parallelize import apply_activation_checkpointing


def _model(vocab: int = 2048) -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config("tiny", n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, max_seq_len=128)).train()


def _saved_bytes(model: Transformer, fn) -> int:
    loss, n = saved_tensor_bytes(model, fn)
    loss.backward()
    return n


def _batch(vocab: int, b: int = 4, t: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def test_fused_loss_keeps_no_logits():
    model = _model()
    x, y = _batch(2048)
    fused = _saved_bytes(model, lambda: cross_entropy_sum(model, model(x, return_hidden=True), y, 128))
    plain = _saved_bytes(model, lambda: _ce_sum(model, model(x, return_hidden=True), y))
    logits = x.numel() * 2048 * 4
    # The unfused path keeps the fp32 log-softmax of every logit; the fused one only the gradients
    # of h and of the head (vocab x C), formed in its forward pass.
    assert plain - fused > 0.8 * logits


def test_activation_checkpointing_keeps_only_block_inputs():
    model = _model()
    x, y = _batch(2048)
    full = _saved_bytes(model, lambda: cross_entropy_sum(model, model(x, return_hidden=True), y))
    apply_activation_checkpointing(list(model.model.layers))
    ckpt = _saved_bytes(model, lambda: cross_entropy_sum(model, model(x, return_hidden=True), y))
    assert ckpt < full / 3


def test_fused_loss_peak_is_a_fraction_of_the_logits():
    vocab, n, c = 8192, 1024, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, n, c, generator=g, requires_grad=True)
    head = torch.nn.Linear(c, vocab, bias=False)
    y = torch.randint(0, vocab, (1, n), generator=g)
    model = type("Head", (torch.nn.Module,), {"logits": lambda self, x: self.lm_head(x)})()
    model.lm_head = head
    plain = peak_allocated_bytes(lambda: _ce_sum(model, h, y).backward())
    free_cpu_logits_buffer()  # the chunk buffer it keeps between calls is counted, not taken as given
    fused = peak_allocated_bytes(lambda: cross_entropy_sum(model, h, y, chunk=128).backward())
    logits = n * vocab * 4
    assert plain > 2 * logits  # logits, log-softmax and their gradient
    assert fused < logits / 2  # one 128-token chunk at a time, plus the head's gradient

