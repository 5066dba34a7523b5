"""One optimizer step: forward and backward over this rank's micro-batches, clip, step.

The loss of each micro-batch is a sum over units (tokens, pairs, ...) divided by the unit count of
the whole global batch, so accumulation and ranks are weighted exactly. Data-parallel gradient
reduction (DDP's all-reduce, FSDP's reduce-scatter) averages over the ranks that hold distinct parts
of the batch: the data-parallel ranks and, under context parallel, the ranks holding parts of the same
sequences; hence the `* data_parts`. Ranks that hold the same tokens (tensor parallel) count their
units once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from lmforge.model.moe import moe_layers, update_after_step
from lmforge.train import dist
from lmforge.train.objectives import Objective
from lmforge.train.parallelize import Layout, loss_context, set_gradient_sync
from lmforge.train.pipeline import Pipeline


@dataclass
class StepResult:
    metrics: dict[str, Tensor]  # summed over this rank's units
    grad_norm: Tensor  # the global norm before clipping
    units: Tensor  # the loss's divisor: units of the whole global batch
    tokens: int  # real tokens of the forward passes, all ranks
    generated: int  # tokens sampled for this step (GRPO), all ranks
    expert_load: Tensor | None = None  # MoE: tokens per expert of each MoE layer (layers, experts), all ranks


@dataclass
class Stepper:
    """What a step needs beside its batches; built once by the trainer."""

    model: nn.Module  # as trained: DDP-wrapped, or FSDP-sharded in place
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    objective: Objective
    layout: Layout
    device: torch.device
    amp: torch.dtype | None
    grad_clip: float
    pipe: Pipeline | None = None  # pipeline parallel: the schedule runs forward and backward
    has_experts: bool | None = None  # MoE layers to update after each step; looked up at the first step

    def step(self) -> StepResult:
        metrics: dict[str, Tensor] = {}
        with loss_context(self.layout):  # vocab-parallel losses: their forward and backward inside
            batches = self.objective.next_batches(self.model)  # GRPO's rollouts score log-probs too
            counts = self._counts(batches)
            n_units = counts[0].float()
            scale = self.layout.data_parts / n_units
            if self.pipe is not None:
                self.pipe.scale = scale
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    loss = sum(self.pipe.step(x, y) for x, y in batches)
                metrics["loss"] = loss.float()
                batches = []
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                with self._sync(last), torch.autocast(self.device.type, dtype=self.amp,
                                                      enabled=self.amp is not None):
                    loss_sum, m = self.objective.loss(self.model, batch)
                    loss = loss_sum * scale
                self.scaler.scale(loss).backward()
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + v.detach().float()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.params, self.grad_clip, self.pipe.group if self.pipe else None)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.has_experts is None:
            self.has_experts = bool(moe_layers(self.model))
        # MoE: aux-free biases move after the step, from its load (a dense model skips this)
        load = update_after_step(self.model) if self.has_experts else None
        return StepResult(metrics, grad_norm, n_units, round(counts[1].item()), round(counts[2].item()), load)

    def _counts(self, batches: list) -> Tensor:
        """Units, real tokens and generated tokens of the global batch: one all-reduce.

        Every rank adds its own; ranks that hold the same tokens (tensor parallel) would count them
        several times, so the sum is divided by how many share them.
        """
        ob = self.objective
        counts = torch.tensor([sum(ob.count(b) for b in batches), sum(ob.tokens(b) for b in batches),
                               ob.generated_tokens()], dtype=torch.float64, device=self.device)
        return dist.all_reduce_slices(counts, self.layout.data_parts)

    def _sync(self, last: bool):
        """Reduce gradients only after the last micro-batch of the step (DDP's no_sync, FSDP's equivalent)."""
        if self.layout.ddp and not last:
            return self.model.no_sync()
        if self.layout.fsdp:
            set_gradient_sync(self.model, last)
        return contextlib.nullcontext()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, stages: tdist.ProcessGroup | None = None) -> Tensor:
    """Clip to `max_norm` (0: measure only); returns the global norm before clipping.

    Sharded gradients (DTensors, under FSDP or tensor parallel) give their norm over every shard:
    DTensor's norm reduces across the mesh, so each parameter counts once whatever its layout. A
    replicated weight under tensor parallel (a norm's gain) has the same gradient on every tp rank,
    counted once; where sequence parallel leaves it a per-rank partial sum (Partial), the norm sums the
    parts first. Under TP x FSDP every parameter is a DTensor on the same 2-D mesh, so the norms stack.
    Under pipeline parallel each rank holds other parameters: the squares are summed over the stages' group.
    Under expert parallel the experts are DTensors on another mesh than the dense weights: each mesh's
    norm is taken on its own and the parts combined (as torchtitan does), then applied as a plain number.
    """
    with_grad = [p for p in params if p.grad is not None]
    grads = [p.grad for p in with_grad]
    by_mesh: dict = {}
    for g in grads:
        by_mesh.setdefault(getattr(g, "device_mesh", None), []).append(g)
    if len(by_mesh) > 1:  # expert parallel: the experts' DTensors live on a mesh of their own
        parts = [torch.nn.utils.get_total_norm(gs, norm_type=2.0, foreach=True) for gs in by_mesh.values()]
        total = torch.stack([(n.full_tensor() if hasattr(n, "full_tensor") else n).float() for n in parts]).norm()
    else:
        total = (torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True) if grads
                 else torch.zeros((), device=params[0].device if params else "cpu"))
    if stages is not None or len(by_mesh) > 1:
        if stages is not None:
            sq = (total.full_tensor() if hasattr(total, "full_tensor") else total).float() ** 2
            tdist.all_reduce(sq, group=stages)
            total = sq.sqrt()
        if max_norm > 0 and grads:  # a plain norm (summed over stages) scales gradients of any kind as a number
            coef = min(1.0, max_norm / (total.item() + 1e-6))
            if coef < 1.0:
                for gs in by_mesh.values():  # one foreach per mesh: DTensor ops do not mix meshes
                    torch._foreach_mul_(gs, coef)
        return total
    if max_norm > 0 and grads:  # a DTensor norm scales DTensor gradients on its own mesh
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total, foreach=True)  # parameters, not grads
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """This rank's bytes of parameters, their gradients and the optimizer state (local shards only).

    Gradients are counted at the size of the trainable parameters, whether or not they are allocated
    at the moment of asking (between steps they are freed).
    """
    def nbytes(t: Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    n = sum(nbytes(p) for p in params) + sum(nbytes(p) for p in params if p.requires_grad)
    for s in optimizer.state.values():
        n += sum(nbytes(v) for v in s.values() if isinstance(v, Tensor) and v.dim() > 0)
    return n
