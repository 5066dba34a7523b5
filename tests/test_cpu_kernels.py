"""The fused CPU kernels (model/cpu_kernels.c) agree with the PyTorch formulas they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import cpu_kernels as K
from lmforge.model.loss import linear_cross_entropy
from lmforge.model.presets import model_config
from lmforge.model.transformer import Transformer, rope_cache, signed_sin

pytestmark = pytest.mark.skipif(K.library() is None,
                                reason="kernels unavailable (no C compiler, or LMFORGE_CPU_KERNELS=0)")


@pytest.fixture(autouse=True)
def kernels_for_small_tensors(monkeypatch):
    """The tests' tensors are small; the size floor that keeps decoding on PyTorch would skip them."""
    monkeypatch.setattr(K, "MIN_ELEMENTS", 0)


def _grads(fn, inputs, seed=0):
    xs = [t.clone().requires_grad_() for t in inputs]
    y = fn(*xs)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)))
    return [y.detach()] + [x.grad for x in xs]


def _close(a, b, rtol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * y.abs().max().item())


def test_rms_norm_matches_torch():
    torch.manual_seed(0)
    x, w = torch.randn(3, 50, 96) * 4, 1 + 0.1 * torch.randn(96)
    fused = _grads(lambda x, w: K.rms_norm(x, w, 1e-6), [x, w])
    plain = _grads(lambda x, w: F.rms_norm(x, (96,), w, 1e-6), [x, w])
    _close(fused, plain)


def test_swiglu_matches_torch_including_saturation():
    torch.manual_seed(0)
    a, b = torch.randn(4, 33, 70) * 6, torch.randn(4, 33, 70)
    a[0, 0, :4] = torch.tensor([-200.0, -90.0, 90.0, 200.0])  # exp's clamped range
    _close(_grads(K.swiglu, [a, b]), _grads(lambda a, b: F.silu(a) * b, [a, b]))


def test_rope_matches_rotate_half():
    torch.manual_seed(0)
    cos, sin = rope_cache(16, 40, 10000.0)
    q = torch.randn(2, 40, 3, 16)  # (B, T, H, D) memory, as the projections lay it out
    fused = _grads(lambda q: K.apply_rope(q.transpose(1, 2), cos, signed_sin(sin)), [q])
    plain = _grads(lambda q: K.rope_reference(q.transpose(1, 2), cos, signed_sin(sin)), [q])
    _close(fused, plain)


def test_few_row_kernels_for_decoding_match_torch():
    """The decoding step's single-threaded calls: RMSNorm and SwiGLU of a few rows; RoPE, each row at its position."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 64), torch.randn(64)
    torch.testing.assert_close(K.rows_rms_norm(x, w, 1e-5), F.rms_norm(x, (64,), w, 1e-5), rtol=1e-5, atol=1e-6)
    heads = torch.randn(3, 48)[:, :40].view(3, 5, 8)  # rows of a wider q/k/v output, as in the step
    cos, sin = rope_cache(8, 32, 10000.0)
    pos = torch.tensor([3, 0, 17])
    c, s = cos[pos], signed_sin(sin[pos])
    want = K.rope_reference(heads.unsqueeze(2), c[:, None, None], s[:, None, None]).squeeze(2)
    torch.testing.assert_close(K.rows_rope(heads, c, s), want, rtol=0, atol=1e-6)
    assert K.rows_rope(heads, c[:2], s[:2]) is None  # one table row per x row, else the caller's formula
    gate_up = torch.randn(3, 2 * 48) * 4  # [gate | up] per row, as the fused product writes it
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(K.rows_swiglu(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_cross_entropy_chunk_matches_torch_with_ignored_targets():
    torch.manual_seed(0)
    z = torch.randn(64, 300) * 8
    t = torch.randint(0, 300, (64,))
    t[::7] = -100
    g = z.clone()
    loss = K.softmax_xent_(g, t, -100)
    ref = z.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref, t, ignore_index=-100, reduction="sum")
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(g, ref.grad, rtol=1e-5, atol=1e-6)
    assert g[::7].abs().sum() == 0, "ignored rows get no gradient"
    with pytest.raises(IndexError, match="out of bounds for a vocabulary of 300"):
        K.softmax_xent_(z.clone(), torch.full((64,), 300), -100)


def test_fused_loss_matches_plain_cross_entropy():
    torch.manual_seed(0)
    h, w = torch.randn(2, 40, 32), torch.randn(200, 32) * 0.3
    t = torch.randint(0, 200, (2, 40))
    t[0, :5] = -100
    fused = _grads(lambda h, w: linear_cross_entropy(h, w, t, chunk=16), [h, w])
    plain = _grads(lambda h, w: F.cross_entropy((h @ w.T).view(-1, 200), t.view(-1), reduction="sum"), [h, w])
    _close(fused, plain)


def _train_step(model, x):
    loss = model(x[:, :-1]).flatten(0, 1)
    loss = F.cross_entropy(loss, x[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_with_kernels_and_fused_qkv_matches_plain_pytorch(monkeypatch):
    """The whole model: loss and every gradient equal the unfused PyTorch path, and repeat bit for bit."""
    cfg = model_config("tiny", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, vocab_size=128, max_seq_len=32)
    x = torch.randint(0, 128, (3, 33), generator=torch.Generator().manual_seed(0))

    def run(kernels: bool, fuse: bool):
        monkeypatch.setattr(K, "enabled", kernels)
        torch.manual_seed(0)
        model = Transformer(cfg).train()
        for block in model.model.layers:
            block.self_attn.fuse_qkv = fuse
        return _train_step(model, x)

    fast, fast_again, plain = run(True, True), run(True, True), run(False, False)
    assert torch.equal(fast[0], fast_again[0]) and all(torch.equal(fast[1][n], fast_again[1][n]) for n in fast[1])
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-6, atol=1e-6)
    for name in plain[1]:
        torch.testing.assert_close(fast[1][name], plain[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_disabled_kernels_and_small_tensors_use_pytorch(monkeypatch):
    x = torch.randn(4, 8, requires_grad=True)
    assert type(K.rms_norm(x, torch.ones(8), 1e-6).grad_fn).__name__ == "_RMSNormBackward"
    monkeypatch.setattr(K, "MIN_ELEMENTS", 1 << 16)  # the default: one decoded token is far below it
    assert type(K.rms_norm(x, torch.ones(8), 1e-6).grad_fn).__name__ != "_RMSNormBackward"
    monkeypatch.setattr(K, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(K, "enabled", False)  # what LMFORGE_CPU_KERNELS=0 sets
    assert type(K.rms_norm(x, torch.ones(8), 1e-6).grad_fn).__name__ != "_RMSNormBackward"
    assert K.softmax_xent_(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), -100) is None
