"""The CUDA paths lmforge relies on, one check each; `bench/gpu.sh` runs them all and sums them up.

    python bench/gpu_checks.py run CHECK [CHECK ...] --dir DIR [--device cuda|cpu]
    torchrun --nproc_per_node=1 bench/gpu_checks.py run fsdp2 --dir DIR        # likewise ddp on N GPUs

Each check writes DIR/NAME.json through bench/gpu_report.py's `write` ({"check", "status":
PASS|FAIL|SKIP, "reason", "seconds", ...its figures}) and prints one line; an exception is a FAIL of
that check alone. On CUDA the checks use
the `small` preset (124M, vocab 50304); with --device cpu the `tiny` one at a few tokens, the CPU
smoke that keeps this script tested where there is no GPU (each such check is named cpu_NAME).

A check compares two ways of computing the same thing, so a PASS means the CUDA path agrees with
a reference, not only that it ran.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_report import write

Result = tuple[str, str, dict]  # (status, reason, figures)


# --- shapes -----------------------------------------------------------------------------------------

def config(device: torch.device, **train):
    """The `small` preset on a GPU; on a CPU the `tiny` one cut to 2 x 64 at 64 tokens (bf16 is emulated
    on most CPUs, so the smoke must stay small to finish in seconds)."""
    from lmforge.config import load_config

    if device.type == "cuda":
        over = ["model.preset=small", "model.vocab_size=50304", "train.seq_len=1024", "train.micro_batch=8"]
    else:
        over = ["model.preset=tiny", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=4",
                "model.vocab_size=512", "model.max_seq_len=64", "train.seq_len=64", "train.micro_batch=2"]
    over += ["train.warmup_steps=0", "train.max_steps=100", "train.lr=1e-3"]
    return load_config(overrides=over + [f"train.{k}={v}" for k, v in train.items()])


def tokens(cfg, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from train import batch

    return batch(cfg, device, seed)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# --- the checks -------------------------------------------------------------------------------------

def check_autocast(device: torch.device) -> Result:
    """bf16 autocast training steps through lmforge's own step (bench/train.py's lmforge side).

    The first bf16 loss must match the fp32 loss of the same weights within 2 %, and 8 steps on one
    batch must lower it (a step that trains nothing, or NaNs, fails).
    """
    from train import Side

    cfg = config(device)
    x, y = tokens(cfg, device)
    fp32 = Side("lmforge", cfg, device, None)
    ref = float(fp32.step(x, y))
    del fp32
    side = Side("lmforge", cfg, device, torch.bfloat16)
    losses = [float(side.step(x, y)) for _ in range(8)]
    figures = {"fp32_first_loss": round(ref, 4), "bf16_losses": [round(v, 4) for v in losses]}
    if not all(math.isfinite(v) for v in losses):
        return "FAIL", "a bf16 loss is not finite", figures
    if rel(losses[0], ref) > 0.02:
        return "FAIL", f"first bf16 loss {losses[0]:.4f} vs fp32 {ref:.4f}", figures
    if not losses[-1] < losses[0] - 0.1:
        return "FAIL", f"8 steps on one batch did not lower the loss ({losses[0]:.3f} -> {losses[-1]:.3f})", figures
    return "PASS", f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in 8 steps; first within " \
                   f"{rel(losses[0], ref):.1e} of fp32", figures


def check_fused_adamw(device: torch.device) -> Result:
    """torch.optim.AdamW(fused=True) against the per-tensor loop on the model's parameters, 5 steps,
    and lmforge's `build_optimizer` choosing it here."""
    from lmforge.model.transformer import Transformer
    from lmforge.train.optim import build_optimizer

    cfg = config(device)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    chosen = build_optimizer(model, cfg.train).defaults.get("fused")
    params = {kind: [p.detach().clone().requires_grad_() for p in model.parameters()] for kind in ("fused", "loop")}
    opts = {kind: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=kind == "fused",
                                    foreach=False if kind == "loop" else None) for kind, ps in params.items()}
    g = torch.Generator(device=device).manual_seed(0)
    ms = {"fused": 0.0, "loop": 0.0}
    for _ in range(5):
        grads = [torch.randn(p.shape, device=device, generator=g) for p in params["fused"]]
        for kind, ps in params.items():
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            sync(device)
            t = time.perf_counter()
            opts[kind].step()
            sync(device)
            ms[kind] += (time.perf_counter() - t) * 1e3 / 5
    diff = max((a - b).abs().max().item() for a, b in zip(params["fused"], params["loop"]))
    figures = {"max_abs_diff": diff, "fused_step_ms": round(ms["fused"], 2), "loop_step_ms": round(ms["loop"], 2),
               "build_optimizer_fused": bool(chosen)}
    if diff > 1e-5:
        return "FAIL", f"fused AdamW differs from the loop by {diff:.2e} after 5 steps", figures
    if not chosen:
        return "FAIL", "lmforge's build_optimizer did not choose the fused kernel here", figures
    return "PASS", f"equal to the loop within {diff:.1e}; step {ms['fused']:.1f} ms vs {ms['loop']:.1f} ms", figures


def check_flash_sdpa(device: torch.device) -> Result:
    """SDPA forced onto the flash kernel, against the math kernel, forward and backward; then the
    model's own attention under the flash kernel alone (it must not need another)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, t, d = (4, 12, 1024, 64) if device.type == "cuda" else (2, 4, 64, 32)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, device=device, generator=g) for _ in range(3))

    def attend(backend, dtype):
        qq, kk, vv = (z.detach().to(dtype).requires_grad_() for z in (q, k, v))
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        out.float().square().sum().backward()
        return [out.float()] + [z.grad.float() for z in (qq, kk, vv)]

    exact = attend(SDPBackend.MATH, torch.float32)
    flash = attend(SDPBackend.FLASH_ATTENTION, torch.bfloat16)
    math16 = attend(SDPBackend.MATH, torch.bfloat16)
    err = [(a - e).abs().max().item() for a, e in zip(flash, exact)]
    err16 = [(a - e).abs().max().item() for a, e in zip(math16, exact)]
    figures = {"flash_err_vs_fp32": err, "math_bf16_err_vs_fp32": err16}
    bad = [n for n, a, m in zip(("out", "dq", "dk", "dv"), err, err16) if a > 3 * m + 1e-3]
    if bad:
        return "FAIL", f"flash differs from math more than bf16 math does in {', '.join(bad)}", figures
    model_losses = model_under(device, SDPBackend.FLASH_ATTENTION), model_under(device, SDPBackend.MATH)
    figures["model_loss_flash_math"] = [round(v, 5) for v in model_losses]
    if rel(*model_losses) > 1e-2:
        return "FAIL", f"the model's loss under flash {model_losses[0]:.4f} vs math {model_losses[1]:.4f}", figures
    return "PASS", f"within bf16 math's error of fp32 (out {err[0]:.1e} vs {err16[0]:.1e}); the model runs " \
                   "on flash alone", figures


def check_cp_blocks(device: torch.device) -> Result:
    """Context parallel's ring off a CPU computes each block with PyTorch ops (train/context.py
    `_math_block`): its output, log-sum-exp and gradients from them, against SDPA over the same block
    (causal, grouped-query) in fp32, forward and backward."""
    from lmforge.train import context

    b, h, hkv, t, d = (2, 12, 4, 1024, 64) if device.type == "cuda" else (2, 4, 2, 64, 16)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, t, d, device=device, generator=g)
    k, v, dout = (torch.randn(b, n, t, d, device=device, generator=g) for n in (hkv, hkv, h))
    out, lse = context._math_block(q, k, v, True)
    grads = context._math_block_backward(dout, q, k, v, out, lse, True)
    qq, kk, vv = (z.clone().requires_grad_() for z in (q, k, v))
    ref = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
    ref.backward(dout)
    err = [(a.float() - r.float()).abs().max().item() for a, r in zip((out, *grads), (ref, qq.grad, kk.grad, vv.grad))]
    figures = {"max_abs_err_out_dq_dk_dv": err, "shape": [b, h, hkv, t, d]}
    if max(err) > 1e-3:
        return "FAIL", f"the ring's block differs from SDPA by up to {max(err):.1e}", figures
    return "PASS", f"output and gradients within {max(err):.1e} of SDPA", figures


def check_flex_masks(device: torch.device) -> Result:
    """Masked attention through FlexAttention's block masks (model/masks.py) against SDPA's dense masks:
    packed documents (SFT) and a window + block-sparse pattern, the model's loss and gradients in bf16, and
    the step time of each. On a CPU (no FlexAttention backward there) the forward only, unfused."""
    from lmforge.model import masks
    from lmforge.model.transformer import Transformer

    cfg = config(device)
    m = cfg.model
    m.sliding_window, m.sparse_block, m.window_pattern = 256 if device.type == "cuda" else 16, \
        128 if device.type == "cuda" else 8, "SBL"
    x, y = tokens(cfg, device)
    B, T = x.shape
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randint(1, T, (B, 6), generator=g), dim=1).values  # 7 documents a row
    doc = (torch.arange(T).view(1, T, 1) >= cuts.view(B, 1, 6)).sum(-1).to(device)
    starts = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=device), cuts.to(device)], 1)
    pos = torch.arange(T, device=device).view(1, T) - starts.gather(1, doc)
    train = device.type == "cuda"
    if not train:
        masks.COMPILE = False
    figures: dict = {}
    results = {}
    for impl in ("sdpa", "flex"):
        m.attn_impl = impl
        torch.manual_seed(0)
        model = Transformer(m).to(device).train(train)

        def step(model: Transformer = model) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=train), torch.set_grad_enabled(train):
                loss = model(x, labels=y, positions=pos, doc_ids=doc) / y.numel()
            if train:
                loss.backward()
            return loss

        loss = step()
        grads = [p.grad.float().clone() for p in model.parameters()] if train else []
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            step()
        sync(device)
        figures[f"{impl}_step_ms"] = round((time.perf_counter() - t0) * 1e3 / 3, 1)
        results[impl] = (float(loss), grads)
    (ls, gs), (lf, gf) = results["sdpa"], results["flex"]
    figures["loss_sdpa_flex"] = [round(ls, 5), round(lf, 5)]
    worst = max([(a - b).norm().item() / max(b.norm().item(), 1e-12) for a, b in zip(gf, gs)], default=0.0)
    figures["grad_rel_err"] = worst
    if rel(lf, ls) > 1e-2 or worst > 5e-2:
        return "FAIL", f"flex loss {lf:.4f} vs sdpa {ls:.4f}, gradients {worst:.1e} apart", figures
    return "PASS", f"loss within {rel(lf, ls):.1e}, gradients {worst:.1e}; step {figures['flex_step_ms']} ms " \
                   f"with block masks vs {figures['sdpa_step_ms']} ms with dense masks", figures


def model_under(device: torch.device, backend) -> float:
    """The model's bf16 training loss (forward and backward) with SDPA held to one backend."""
    from torch.nn.attention import sdpa_kernel

    from lmforge.model.transformer import Transformer

    cfg = config(device)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device).train()
    x, y = tokens(cfg, device)
    with sdpa_kernel(backend), torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(x, labels=y) / y.numel()
        loss.backward()
    return float(loss)


def check_compile(device: torch.device) -> Result:
    """`train.compile=true` (each block compiled, as the trainer does): the compiled model's steps
    against eager ones from the same weights and batches (bf16), the time compiling takes and the
    step time it buys. The trainer lets dynamo fall back to eager where compiling fails; here a
    failure must show, so that fallback is switched off again."""
    from train import Side

    eager_cfg, compiled_cfg = config(device), config(device, compile="true")
    sides = {"eager": Side("lmforge", eager_cfg, device, torch.bfloat16),
             "compiled": Side("lmforge", compiled_cfg, device, torch.bfloat16)}
    torch._dynamo.config.suppress_errors = False
    losses: dict[str, list[float]] = {k: [] for k in sides}
    first_s: dict[str, float] = {}
    for name, side in sides.items():
        t = time.perf_counter()
        for i in range(3):
            losses[name].append(float(side.step(*tokens(eager_cfg, device, i))))
            if i == 0:
                first_s[name] = time.perf_counter() - t
    step_ms = {name: timed_ms(side, *tokens(eager_cfg, device, 99)) for name, side in sides.items()}
    worst = max(rel(a, b) for a, b in zip(losses["compiled"], losses["eager"]))
    figures = {"losses": losses, "first_step_s": {k: round(v, 1) for k, v in first_s.items()},
               "step_ms": step_ms}
    if not all(math.isfinite(v) for v in losses["compiled"]) or worst > 2e-2:
        return "FAIL", f"compiled losses {losses['compiled']} vs eager {losses['eager']}", figures
    return "PASS", f"losses within {worst:.1e} of eager; compiling took {first_s['compiled']:.0f} s; step " \
                   f"{step_ms['compiled']:.0f} ms vs eager {step_ms['eager']:.0f} ms", figures


def timed_ms(side, x, y, steps: int = 3) -> float:
    sync(side.device)
    t = time.perf_counter()
    for _ in range(steps):
        side.step(x, y)
    sync(side.device)
    return round((time.perf_counter() - t) * 1e3 / steps, 1)


def check_fsdp2(device: torch.device, offload: bool = False) -> Result:
    """FSDP2 `fully_shard` applied to an lmforge Transformer, each Block then the root, against the
    same model unsharded: 5 AdamW steps on the same batches, losses equal within bf16 tolerance.

    On CUDA with bf16 parameters gathered and fp32 gradient reduction (parallel.mixed_precision),
    against bf16 autocast; on a CPU in fp32 (gloo), where the two must agree to 1e-5. With `offload`,
    FSDP's CPUOffloadPolicy: the sharded state in host memory, the optimizer stepping there. Runs
    under torchrun (one process is a world of one: the sharding code paths all run).
    """
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from lmforge.model.transformer import Transformer

    cfg = config(device)
    torch.manual_seed(0)
    ref = Transformer(cfg.model).to(device).train()
    sharded = copy.deepcopy(ref)
    cuda = device.type == "cuda"
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if cuda else {}
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in sharded.model.layers:
        fully_shard(block, **kw)
    fully_shard(sharded, **kw)
    kinds = {type(p).__name__ for p in sharded.parameters()}
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, sharded)]
    losses: dict[str, list[float]] = {"unsharded": [], "fsdp2": []}
    for i in range(5):
        x, y = tokens(cfg, device, i)
        for (name, model), opt in zip((("unsharded", ref), ("fsdp2", sharded)), opts):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and model is ref):
                loss = model(x, labels=y) / y.numel()  # the loss inside forward, where the head is whole
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(round(float(loss), 5))
    tol = 2e-2 if cuda else 1e-5
    worst = max(rel(a, b) for a, b in zip(losses["fsdp2"], losses["unsharded"]))
    figures = {"losses": losses, "parameter_types": sorted(kinds), "world": dist.get_world_size(),
               "mixed_precision": cuda, "cpu_offload": offload}
    if kinds != {"DTensor"}:
        return "FAIL", f"parameters after fully_shard are {sorted(kinds)}, not DTensor shards", figures
    if not all(math.isfinite(v) for v in losses["fsdp2"]) or worst > tol:
        return "FAIL", f"FSDP2 losses {losses['fsdp2']} vs unsharded {losses['unsharded']} (tol {tol})", figures
    return "PASS", f"5 steps within {worst:.1e} of the unsharded model (tolerance {tol})", figures


def check_fsdp2_offload(device: torch.device) -> Result:
    if device.type != "cuda":
        return "SKIP", "CPU offload only means something on a GPU", {}
    return check_fsdp2(device, offload=True)


def check_ddp(device: torch.device) -> Result:
    """NCCL DDP over every visible GPU: 3 bf16 steps on each rank's own batch, then the weights must
    be identical on all ranks (gradients averaged) and differ from where they started."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmforge.model.transformer import Transformer

    cfg = config(device)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device).train()
    start = sum(p.detach().double().sum() for p in model.parameters())
    ddp = DDP(model, device_ids=[device.index])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    rank = dist.get_rank()
    losses = []
    for i in range(3):
        x, y = tokens(cfg, device, 1000 * rank + i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ddp(x, labels=y) / y.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    spread = max((s - gathered[0]).abs().max().item() for s in gathered)
    figures = {"world": dist.get_world_size(), "rank0_losses": losses, "max_weight_spread": spread}
    if not all(math.isfinite(v) for v in losses):
        return "FAIL", "a loss is not finite", figures
    if spread != 0.0:
        return "FAIL", f"weights differ across ranks by {spread:.2e} after 3 steps", figures
    if float(sums.sum()) == float(start):
        return "FAIL", "the weights did not move", figures
    return "PASS", f"{dist.get_world_size()} ranks: weights identical after 3 steps, losses finite", figures


CHECKS: dict[str, Callable[[torch.device], Result]] = {
    "autocast": check_autocast, "fused_adamw": check_fused_adamw, "flash_sdpa": check_flash_sdpa,
    "cp_blocks": check_cp_blocks, "compile": check_compile, "fsdp2": check_fsdp2,
    "fsdp2_offload": check_fsdp2_offload, "ddp": check_ddp, "flex_masks": check_flex_masks,
}
DISTRIBUTED = {"fsdp2", "fsdp2_offload", "ddp"}  # run under torchrun


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(names: list[str], device: torch.device, dir_: Path) -> None:
    """Each check in turn; an exception fails that check and the next one still runs."""
    distributed = bool(DISTRIBUTED & set(names))
    if distributed:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device(f"cuda:{local}")
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main = os.environ.get("RANK", "0") == "0"
    for name in names:
        label = name if device.type == "cuda" else f"cpu_{name}"
        t = time.perf_counter()
        try:
            status, reason, figures = CHECKS[name](device)
        except Exception as e:  # noqa: BLE001 -- a check that raises has failed, the others still run
            status, reason, figures = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", {}
        if main:
            write(dir_, label, status, reason, time.perf_counter() - t, device=str(device), torch=torch.__version__,
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None, **figures)
    if distributed:
        dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run"])
    ap.add_argument("names", nargs="+", help=f"checks: {', '.join(CHECKS)}")
    ap.add_argument("--dir", type=Path, required=True, help="where each check's JSON goes")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args()
    unknown = [n for n in a.names if n not in CHECKS]
    if unknown:
        ap.error(f"unknown check(s) {unknown}; known: {', '.join(CHECKS)}")
    run(a.names, torch.device(a.device), a.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
