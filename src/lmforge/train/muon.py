"""Muon for the blocks' weight matrices, AdamW for everything else, in one torch.optim.Optimizer.

Muon (Keller Jordan, 2024; used by modded-nanogpt and nanochat) keeps SGD momentum per matrix and
replaces the update by its nearest semi-orthogonal matrix, found with five Newton–Schulz steps. An
orthogonal update moves every direction of the matrix by the same amount, so rare directions
learn as fast as common ones: at equal tokens it reaches a lower loss than AdamW, with one buffer
per matrix instead of two. It is defined for hidden matrices only; embeddings, the head, norms'
gains and biases stay with AdamW (as in Muon's reference and nanochat).

One optimizer, not two, because the loop saves `optimizer.state_dict()`, schedules with `set_lr`
(each group's own `initial_lr`, so Muon groups carry `lr = muon_lr`) and hands the optimizer to a
GradScaler. Every group says its rule in `group["kind"]`; the state holds only tensors and ints,
so it loads with `torch.load(weights_only=True)` and a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.adamw import adamw

from lmforge.config import TrainConfig
from lmforge.train.optim import fused_adamw

# Quintic Newton–Schulz coefficients from Muon's reference: chosen to maximise the slope at zero, so
# five steps push every singular value into about [0.7, 1.2], which is orthogonal enough to train.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """Approximate U V^T of g = U S V^T for a batch of matrices (..., rows, cols).

    Runs in bf16 on GPUs (tensor cores; the iteration tolerates it) and fp32 elsewhere, since CPUs
    without native bf16 matmuls are many times slower in it.
    """
    a, b, c = NS_COEFFS
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    return (x.mT if tall else x).to(g.dtype)


def whole(t: Tensor) -> Tensor:
    """The whole matrix of a sharded one (FSDP / tensor parallel DTensor): Newton-Schulz needs all of it.

    Every rank gathers and orthogonalises every matrix; that repeats the (small) Newton-Schulz work on
    each rank but needs no more than one all-gather per matrix, the same traffic FSDP's forward makes.
    """
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(update: Tensor, param: Tensor) -> Tensor:
    """A whole update laid out as `param` is: a replicated DTensor cut to this rank's shard (no communication)."""
    if not isinstance(param, DTensor):
        return update
    mesh = param.device_mesh
    full = DTensor.from_local(update, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return full.redistribute(mesh, param.placements)


class Muon(torch.optim.Optimizer):
    """Groups with kind="muon" (2-D parameters) follow Muon; groups with kind="adamw" follow AdamW.

    Muon group keys: lr, momentum, nesterov, ns_steps, weight_decay. AdamW group keys: lr, betas,
    eps, weight_decay, fused (torch's fused kernel). Weight decay is decoupled (scaled by lr) in both.
    """

    def __init__(self, groups: list[dict]):
        for g in groups:
            if g.get("kind") not in ("muon", "adamw"):
                raise ValueError("every Muon parameter group needs kind='muon' or kind='adamw'")
            if g["kind"] == "muon" and any(p.dim() not in (2, 3) for p in g["params"]):
                raise ValueError("Muon groups take weight matrices (2-D) or stacks of them (3-D: MoE experts)")
        super().__init__(groups, {"lr": 0.02, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        mu = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        # Nesterov: step along g + mu * (buf - g), the look-ahead of the momentum buffer.
        updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        # Matrices of one shape are orthogonalised together: one batched matmul instead of many small ones.
        # A 3-D parameter (an MoE layer's experts) is that many matrices, each orthogonalised on its own.
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            by_shape[tuple(p.shape)].append(i)
        for shape, idx in by_shape.items():
            rows, cols = shape[-2:]
            ortho = orthogonalize(torch.stack([whole(updates[i]) for i in idx]), group["ns_steps"])
            # Shape-aware scale (Muon's reference): a tall matrix's update has smaller entries after
            # orthogonalisation; sqrt(rows / cols) restores the per-entry size of a square one.
            scale = max(1.0, rows / cols) ** 0.5
            torch._foreach_add_([params[i] for i in idx], [like(o, params[i]) for o, i in zip(ortho.unbind(0), idx)],
                                alpha=-lr * scale)

    def _adamw_step(self, group: dict) -> None:
        """torch's own AdamW arithmetic (fused kernel where available), on this optimizer's state."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:  # step on the parameter's device for the fused kernel, as torch.optim.AdamW does
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [], [s["step"] for s in states], foreach=None if group["fused"] else True, fused=group["fused"] or None,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False)


def muon_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Hidden matrices (the blocks' linear weights) to Muon; embeddings, head, gains, biases to AdamW."""
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() in (2, 3) and ".layers." in f".{name}":  # 3-D: an MoE layer's stacked experts
            muon.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    fused = fused_adamw(next(model.parameters()).device)
    adam = {"kind": "adamw", "lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "fused": fused}
    groups = [{"kind": "muon", "params": muon, "lr": cfg.muon_lr, "momentum": cfg.muon_momentum,
               "nesterov": True, "ns_steps": 5, "weight_decay": 0.0},
              {**adam, "params": decay, "weight_decay": cfg.weight_decay},
              {**adam, "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_muon(model: nn.Module, cfg: TrainConfig) -> Muon:
    return Muon(muon_groups(model, cfg))
