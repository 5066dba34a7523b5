"""Training modes through the real loop: bf16 on a CPU, torch.compile, activation checkpointing, Muon.

Each mode is held to the plain fp32 eager AdamW run on the same batches: activation checkpointing
must reproduce its losses, bf16 and compile must stay within a tolerance, and every mode must learn.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import cpu_kernels as K
from lmforge.train.losses import IGNORE, linear_cross_entropy


def _loss_and_grads(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, bf16: bool):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = linear_cross_entropy(h, w, t, chunk=96)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
def test_bf16_fused_loss_is_close_to_fp32(path, monkeypatch):
    """Under bf16 autocast the head matmuls run in bf16; the softmax and the loss stay fp32."""
    if path == "kernel" and K.library() is None:
        pytest.skip("CPU kernels unavailable (no C compiler, or LMFORGE_CPU_KERNELS=0)")
    if path == "kernel":
        monkeypatch.setattr(K, "MIN_ELEMENTS", 0)  # the chunks here are below the size floor
    else:
        monkeypatch.setattr(K, "enabled", False)
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 160, 64, generator=g), 0.2 * torch.randn(512, 64, generator=g)
    t = torch.randint(0, 512, (2, 160), generator=g)
    t[0, :7] = IGNORE  # a prompt's worth of ignored targets, inside the first chunk
    t[1, -3:] = IGNORE
    ref = F.cross_entropy((h @ w.T).view(-1, 512), t.view(-1), ignore_index=IGNORE, reduction="sum")

    loss32, gh32, gw32 = _loss_and_grads(h, w, t, bf16=False)
    loss16, gh16, gw16 = _loss_and_grads(h, w, t, bf16=True)
    assert loss16.dtype == torch.float32 and gh16.dtype == torch.float32 and gw16.dtype == torch.float32
    torch.testing.assert_close(loss32, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(loss16, loss32, rtol=5e-3, atol=0)
    for a, b in ((gh16, gh32), (gw16, gw32)):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * b.abs().max().item())
        assert not torch.equal(a, b), "the bf16 run multiplied in fp32"
    assert not gh16.view(-1, 64)[:7].any() and not gh16.view(-1, 64)[-3:].any(), "ignored tokens got a gradient"
