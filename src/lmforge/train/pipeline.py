"""Pipeline parallel: the decoder split into stages by layers, run by torch.distributed.pipelining schedules.

`parallel.pp=P` cuts the model into P stages (1F1B, GPipe) or 2P (interleaved 1F1B, ZBV, DualPipeV:
two stages per rank; the V schedules place stage 0 and the last stage on the same rank). Each
rank keeps only its stages' layers: the model is pruned in place, its layers held in a ModuleDict
keyed by their original index, so parameter names stay the full model's (`model.layers.5...`) and
checkpoints, optimizer state and resume on another layout work by name as everywhere else.

The last stage's loss is the fused chunked head + cross-entropy of the model, scaled by the global
batch's unit count like every micro-batch loss (the schedule's own gradient scaling is off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmforge.config import ParallelConfig
from lmforge.errors import LmforgeError
from lmforge.model.loss import cross_entropy_sum, repeatable_backward
from lmforge.model.transformer import layer_masks, signed_sin

SCHEDULES = {"1f1b": "1F1B", "gpipe": "GPipe", "interleaved_1f1b": "Interleaved1F1B", "zbv": "ZBVZeroBubble",
             "dualpipev": "DualPipeV"}
TWO_PER_RANK = ("interleaved_1f1b", "zbv", "dualpipev")
V_SHAPED = ("zbv", "dualpipev")


class DecoderStage(nn.Module):
    """A run of consecutive blocks; the first stage also embeds, the last applies the final norm.

    Its forward maps token ids (first stage) or hidden states to hidden states; the head is applied in
    the loss, chunk by chunk, so no stage ever holds full logits.
    """

    def __init__(self, full: nn.Module, layers: list[int], first: bool, last: bool):
        super().__init__()
        self.cfg = full.cfg
        self.first, self.last = first, last
        self.model = nn.Module()
        if first:
            self.model.embed_tokens = full.model.embed_tokens
            if self.cfg.pos == "learned":
                self.model.embed_positions = full.model.embed_positions
        self.model.layers = nn.ModuleDict({str(i): full.model.layers[str(i)] for i in layers})
        if last:
            self.model.norm = full.model.norm
            self.lm_head = full.lm_head
        if self.cfg.pos == "rope":
            self.register_buffer("rope_cos", full.rope_cos, persistent=False)
            self.register_buffer("rope_sin", full.rope_sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.first:
            ids = x
            x = self.model.embed_tokens(ids)
            if self.cfg.pos == "learned":
                x = x + self.model.embed_positions.weight[: ids.shape[1]]
        T = x.shape[1]
        rope = None
        if self.cfg.pos == "rope":
            rope = (self.rope_cos[:T].to(x.dtype), signed_sin(self.rope_sin[:T]).to(x.dtype))
        kind_masks = layer_masks(self.cfg, x.shape[0], T, 0, None, None, x.device)
        for block in self.model.layers.values():
            x = block(x, rope, kind_masks[block.self_attn.kind])
        return self.model.norm(x) if self.last else x


def stage_layers(n_layer: int, n_stages: int) -> list[list[int]]:
    """Layers of each stage, as even as possible (earlier stages take the remainder: they also embed)."""
    if n_layer < n_stages:
        raise LmforgeError(f"model.n_layer={n_layer} cannot be split into {n_stages} pipeline stages "
                           "(each needs at least one layer)")
    base, extra = divmod(n_layer, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def stages_of_rank(rank: int, pp: int, schedule: str) -> list[int]:
    """Stage indices a pipeline rank runs: one; two interleaved (r, r + P); or two in a V (r, 2P - 1 - r)."""
    if schedule in V_SHAPED:
        return [rank, 2 * pp - 1 - rank]
    if schedule in TWO_PER_RANK:
        return [rank, rank + pp]
    return [rank]


def split_decoder(model: nn.Module, stage_ids: list[int], n_stages: int) -> list[DecoderStage]:
    """Prune `model` to this rank's stages (in place) and return their modules."""
    if model.cfg.tie_embeddings and not (0 in stage_ids) == (n_stages - 1 in stage_ids):
        raise LmforgeError("model.tie_embeddings=true: the first and last pipeline stages share the embedding, "
                           "but this schedule puts them on different ranks; set model.tie_embeddings=false, or "
                           "use parallel.pp_schedule=zbv or dualpipev (their V puts both on one rank)")
    plan = stage_layers(model.cfg.n_layer, n_stages)
    keep = sorted(i for s in stage_ids for i in plan[s])
    model.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in keep})
    if 0 not in stage_ids:
        del model.model.embed_tokens
        if model.cfg.pos == "learned":
            del model.model.embed_positions
    if n_stages - 1 not in stage_ids:
        del model.model.norm
        del model.lm_head
    return [DecoderStage(model, plan[s], s == 0, s == n_stages - 1) for s in stage_ids]


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them; `step` trains one micro-batch through it."""

    model: nn.Module  # the pruned model: this rank's parameters under their full names
    stages: list[DecoderStage]
    schedule: object
    group: dist.ProcessGroup
    loss_chunk: int
    stage_ids: list[int]
    n_stages: int
    pp: int
    schedule_name: str
    scale: float | Tensor = 1.0  # set per step: data-parallel ranks / units of the global batch

    @property
    def has_first(self) -> bool:
        return any(s.first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.last for s in self.stages)

    def loss_fn(self, h: Tensor, target: Tensor) -> Tensor:
        last = next(s for s in self.stages if s.last)
        if hasattr(last, "unshard"):  # FSDP2 on the stage: the head is used here, after its forward resharded it
            last.unshard()
        with repeatable_backward():
            return cross_entropy_sum(last, h, target, self.loss_chunk) * self.scale

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward and backward of one micro-batch through every stage; its loss sum on the last stage, else 0."""
        losses: list[Tensor] = []
        args = (x,) if self.has_first else ()
        self.schedule.step(*args, target=y if self.has_last else None, losses=losses)
        if not losses:
            return torch.zeros((), device=x.device)
        return torch.stack([loss.detach() for loss in losses]).sum() / self.scale

    @torch.no_grad()
    def eval_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The loss sum of a batch, forward only, known on every rank of the pipeline.

        The stages run one after the other on the whole batch, each handing its output to the next
        stage's rank. (The schedules' own eval() fails for the V schedules in this torch version, and
        evaluation gains nothing from micro-batching.)
        """
        me = dist.get_rank(self.group)
        owner = {s: r for r in range(self.pp) for s in stages_of_rank(r, self.pp, self.schedule_name)}
        mine = dict(zip(self.stage_ids, self.stages))
        h = x
        for s in range(self.n_stages):
            if s not in mine:
                continue
            if s > 0 and owner[s - 1] != me:
                h = torch.empty(*x.shape, self.stages[0].cfg.n_embd, device=x.device)
                dist.recv(h, src=dist.get_global_rank(self.group, owner[s - 1]), group=self.group)
            h = mine[s](h)
            if s < self.n_stages - 1 and owner[s + 1] != me:
                dist.send(h.float().contiguous(), dst=dist.get_global_rank(self.group, owner[s + 1]), group=self.group)
        total = torch.zeros((), device=x.device)
        if self.has_last:
            total = cross_entropy_sum(next(st for st in self.stages if st.last), h, y, self.loss_chunk).float()
        dist.all_reduce(total, group=self.group)  # only the last stage's rank holds a non-zero sum
        return total


class PipelineLM(nn.Module):
    """What objectives see under pipeline parallel: `model(x, labels=y)` returns the loss sum of the batch
    (forward only; evaluation), as the whole model would."""

    def __init__(self, pipe: Pipeline):
        super().__init__()
        self.pipe = pipe
        self.cfg = pipe.model.cfg

    def train(self, mode: bool = True) -> PipelineLM:
        for s in self.pipe.stages:  # they are not submodules (their parameters belong to the pruned model)
            s.train(mode)
        return super().train(mode)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, **kw) -> Tensor:
        if labels is None:
            raise LmforgeError("under pipeline parallel the model gives losses only (generation needs it whole)")
        return self.pipe.eval_loss(input_ids, labels)


def build_pipeline(model: nn.Module, layout, pc: ParallelConfig, micro_batch: int, loss_chunk: int,
                   device: torch.device) -> Pipeline:
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import get_schedule_class

    mesh = layout.mesh["pp"]
    rank, group = mesh.get_local_rank(), mesh.get_group()
    n_stages = pc.pp * (2 if pc.pp_schedule in TWO_PER_RANK else 1)
    stage_ids = stages_of_rank(rank, pc.pp, pc.pp_schedule)
    stages = split_decoder(model, stage_ids, n_stages)
    n_micro = pc.pp_microbatches or micro_batch
    if micro_batch % n_micro:
        raise LmforgeError(f"parallel.pp_microbatches={n_micro} does not divide train.micro_batch={micro_batch}")
    if pc.pp_schedule in TWO_PER_RANK and n_micro < n_stages:
        raise LmforgeError(f"parallel.pp_schedule={pc.pp_schedule} with {n_stages} stages needs at least "
                           f"{n_stages} micro-batches per step (parallel.pp_microbatches, or train.micro_batch "
                           f"sequences), got {n_micro}")
    pipe = Pipeline(model, stages, None, group, loss_chunk, stage_ids, n_stages, pc.pp, pc.pp_schedule)
    runners = [PipelineStage(s, i, n_stages, device, group=group) for s, i in zip(stages, stage_ids)]
    cls = get_schedule_class(SCHEDULES[pc.pp_schedule])
    if pc.pp_schedule in TWO_PER_RANK:
        pipe.schedule = cls(runners, n_microbatches=n_micro, loss_fn=pipe.loss_fn, scale_grads=False)
    else:
        pipe.schedule = cls(runners[0], n_microbatches=n_micro, loss_fn=pipe.loss_fn, scale_grads=False)
    return pipe
