"""Training modes through the real loop: bf16 on a CPU, torch.compile, activation checkpointing, Muon.

Each mode is held to the plain fp32 eager AdamW run on the same batches: activation checkpointing
must reproduce its losses, bf16 and compile must stay within a tolerance, and every mode must learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from spine import TINY, copy_run, lmforge, prepared_run

from lmforge.config import load_config
from lmforge.model import cpu_kernels as K
from lmforge.model.loss import IGNORE, linear_cross_entropy


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


# --- the loop -------------------------------------------------------------------------------------------
# Ten real optimizer steps of the 2-layer, 64-wide model on the prepared corpus, in this process.
STEPS = ["train.max_steps=10", "train.warmup_steps=1", "train.lr=1e-2", "train.save_every=0"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return prepared_run(tmp_path_factory.mktemp("modes"))


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def train_losses(base_run: Path, run: Path, *overrides: str) -> list[float]:
    from lmforge.stages import run_pretrain

    copy_run(base_run, run)
    run_pretrain(load_config(overrides=[f"run_dir={run}", *TINY, *STEPS, *overrides]))
    return losses(run)


@pytest.fixture(scope="module")
def fp32(base_run, tmp_path_factory) -> list[float]:
    """The reference: fp32, eager, AdamW, no activation checkpointing."""
    out = train_losses(base_run, tmp_path_factory.mktemp("fp32") / "run", "train.precision=fp32")
    assert len(out) == 10 and out[-1] < out[0] - 0.3, out
    return out


def test_activation_checkpointing_gives_the_same_losses(base_run, fp32, tmp_path, monkeypatch):
    """Each block runs twice per micro-batch (forward, then again in backward) and the losses are unchanged."""
    from lmforge.model.transformer import Block

    calls = []
    real = Block.forward

    def counted(self, *a, **k):
        calls.append(torch.is_grad_enabled())  # evaluation and sampling run without gradients
        return real(self, *a, **k)

    monkeypatch.setattr(Block, "forward", counted)
    out = train_losses(base_run, tmp_path / "run", "train.precision=fp32", "train.activation_checkpointing=true")
    trained = 2 * 10  # 2 blocks x 10 steps of one micro-batch
    assert sum(calls) == 2 * trained, f"the blocks were not recomputed in backward ({sum(calls)} block calls)"
    assert out == pytest.approx(fp32, abs=1e-6, rel=0)


def test_bf16_on_cpu_trains_close_to_fp32(base_run, fp32, tmp_path):
    out = train_losses(base_run, tmp_path / "run", "train.precision=bf16")
    assert out != fp32, "bf16 computed exactly what fp32 did: autocast was not on"
    assert out == pytest.approx(fp32, abs=0.02, rel=0)
    assert out[-1] < out[0] - 0.3


def test_auto_precision_follows_the_measurement(monkeypatch, capsys):
    """`auto` on a CPU is bf16 autocast exactly when the measured bf16 product is faster (both branches forced)."""
    from lmforge.train import loop

    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "bf16_speedup", lambda *shape: 3.0)
    assert loop.autocast_dtype("auto", cpu, (128, 64, 192)) is torch.bfloat16
    monkeypatch.setattr(loop, "bf16_speedup", lambda *shape: 0.2)  # emulated bf16: five times slower
    assert loop.autocast_dtype("auto", cpu, (128, 64, 192)) is None
    assert "0.20x as fast in bf16 as in fp32 on this CPU, so training uses fp32" in capsys.readouterr().err
    assert loop.autocast_dtype("bf16", cpu) is torch.bfloat16 and loop.autocast_dtype("fp32", cpu) is None
    from lmforge.train.mfu import bf16_speedup

    assert bf16_speedup(64, 64, 64) > 0  # the real probe runs


def test_auto_bf16_resumes_bit_exactly_in_the_precision_it_chose(base_run, fp32, tmp_path, monkeypatch):
    """A run whose measurement chose bf16 resumes in bf16 even when the machine now measures otherwise."""
    from safetensors.torch import load_file

    from lmforge.stages import run_pretrain
    from lmforge.train import loop

    monkeypatch.setattr(loop, "bf16_speedup", lambda *shape: 3.0)
    straight = tmp_path / "straight"
    out = train_losses(base_run, straight, "train.precision=auto", "train.save_every=5")
    assert out != fp32 and out == pytest.approx(fp32, abs=0.02, rel=0) and out[-1] < out[0] - 0.3
    # The state right after step 5's checkpoint, as a kill at step 7 leaves it (the kill itself:
    # test_pretrain's crash tests); the resumed half runs where bf16 now measures slower.
    resumed = copy_run(base_run, tmp_path / "resumed")
    (resumed / "checkpoints").mkdir()
    ckpts = straight / "checkpoints"
    import shutil

    shutil.copytree(ckpts / "step_000005", resumed / "checkpoints" / "step_000005")
    shutil.copy(straight / "lmforge.yaml", resumed / "lmforge.yaml")
    monkeypatch.setattr(loop, "bf16_speedup", lambda *shape: 0.2)
    run_pretrain(load_config(overrides=[f"run_dir={resumed}", *TINY, *STEPS, "train.precision=auto",
                                        "train.save_every=5"]))
    assert losses(resumed)[-5:] == out[-5:]
    a = load_file(ckpts / "step_000010" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_000010" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_muon_trains_through_the_loop(base_run, fp32, tmp_path):
    run = tmp_path / "run"
    out = train_losses(base_run, run, "train.optimizer=muon", "train.muon_lr=0.02")
    assert out[-1] < out[0] - 0.25, out
    assert out[1:] != pytest.approx(fp32[1:], abs=1e-3), "the same steps as AdamW"
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(run / "checkpoints" / "step_000010" / "optimizer", tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=False)["optimizer"]
    # Keyed per parameter: param_groups.<name>.kind says which optimizer each matrix had.
    kinds = {name: v for name, v in state.items() if name.startswith("param_groups.") and name.endswith(".kind")}
    assert kinds["param_groups.model.layers.0.mlp.up_proj.weight.kind"] == "muon", kinds
    assert kinds["param_groups.model.norm.weight.kind"] == "adamw", kinds


def test_compile_matches_eager(base_run, tmp_path):
    """torch.compile (inductor: C++ kernels on a CPU) of a 1-layer model, four steps, against eager.

    Both run as CLI processes with the same thread count; a fresh inductor cache shows that kernels were
    really compiled (the loop falls back to eager where compiling fails, which would pass unnoticed).
    The sample at the end runs eagerly: compiling for it recompiled the block three times.
    """
    cache = tmp_path / "inductor"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_COMPILE_THREADS": "1", "TORCH_LOGS": "recompiles"}
    runs = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        run = copy_run(base_run, tmp_path / name)
        r = lmforge("pretrain", f"run_dir={run}", *TINY, *STEPS, "model.n_layer=1", "train.max_steps=4",
                    f"train.compile={flag}", env=env, timeout=900)
        assert r.returncode == 0, r.stderr
        assert "sample at step 4" in r.stderr and "Recompiling" not in r.stderr, r.stderr[-3000:]
        runs[name] = losses(run)
        if flag == "false":
            assert not cache.exists() or not list(cache.rglob("*.so"))
    assert list(cache.rglob("*.so")), "inductor compiled nothing"
    assert len(runs["compiled"]) == 4
    assert runs["compiled"] == pytest.approx(runs["eager"], abs=1e-4, rel=0)


def test_gradient_clipping_scales_the_gradients_to_the_limit():
    """The norm is measured before clipping and the gradients come out at most `max_norm` long, their
    directions kept; under the limit they are left as they are (0 measures only)."""
    from lmforge.train.step import clip_grad_norm

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.randn(2))]
    for p in params[:2]:
        p.grad = torch.randn_like(p) * 3
    before = [p.grad.clone() for p in params[:2]]
    want = torch.cat([g.flatten() for g in before]).norm()
    norm = clip_grad_norm(params, 1.0)
    assert norm.item() == pytest.approx(want.item(), rel=1e-6) and want > 1
    after = torch.cat([p.grad.flatten() for p in params[:2]])
    assert after.norm().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(after, torch.cat([g.flatten() for g in before]) / want)
    assert clip_grad_norm(params, 5.0).item() == pytest.approx(1.0, rel=1e-5)  # under the limit: unchanged
    assert torch.cat([p.grad.flatten() for p in params[:2]]).norm().item() == pytest.approx(1.0, rel=1e-5)
    for p in params[:2]:
        p.grad.mul_(10)
    assert clip_grad_norm(params, 0.0).item() == pytest.approx(10.0, rel=1e-5)  # 0: measured, not clipped
    assert torch.cat([p.grad.flatten() for p in params[:2]]).norm().item() == pytest.approx(10.0, rel=1e-5)
