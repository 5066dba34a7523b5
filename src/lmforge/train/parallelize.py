"""Parallelism applied to a model from outside it: the device mesh, then TP, activation checkpointing,
per-block compile and FSDP2, in that order (torchtitan's order; each later step wraps what the
earlier one produced). DDP, for `parallel.dp_replicate` alone, is applied by the trainer.

The model file never mentions any of this. What a step needs to know of a family is only where its
blocks are (`model.model.layers`), which the spec's parallelize function passes in.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import ParallelConfig, TrainConfig
from lmforge.errors import LmforgeError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # outermost first: tp ranks talk the most


@dataclass
class Layout:
    """The sizes of each parallel dimension, the mesh over them, and this rank's data-parallel place."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    mesh: object | None = None  # torch.distributed.DeviceMesh over the dims of size > 1; None on one process
    dp_rank: int = 0  # which slice of the global batch this rank reads
    dp_world: int = 1  # how many slices the global batch is cut into (dp_replicate * dp_shard)

    @property
    def fsdp(self) -> bool:
        return self.dp_shard > 1

    @property
    def ddp(self) -> bool:
        return self.dp_replicate > 1 and not self.fsdp and self.tp == 1 and self.pp == 1

    def describe(self) -> str:
        parts = [f"{k} {getattr(self, k)}" for k in MESH_DIMS if getattr(self, k) > 1]
        return ", ".join(parts) or "one process"


def resolve_sizes(pc: ParallelConfig, world: int) -> dict[str, int]:
    """Each dimension's size; dp_shard=-1 takes what the others leave. Their product must be the world."""
    sizes = {"pp": pc.pp, "dp_replicate": pc.dp_replicate, "dp_shard": pc.dp_shard, "cp": pc.cp, "tp": pc.tp}
    fixed = pc.pp * pc.dp_replicate * pc.cp * pc.tp
    if pc.dp_shard == -1:
        if world % fixed:
            raise LmforgeError(f"{world} process(es) cannot be split into parallel.pp={pc.pp} x dp_replicate="
                               f"{pc.dp_replicate} x cp={pc.cp} x tp={pc.tp} = {fixed}: the world size must be a "
                               "multiple of their product")
        sizes["dp_shard"] = world // fixed
    product = fixed * sizes["dp_shard"]
    if product != world:
        raise LmforgeError(f"parallel sizes multiply to {product} (pp {pc.pp} x dp_replicate {pc.dp_replicate} x "
                           f"dp_shard {sizes['dp_shard']} x cp {pc.cp} x tp {pc.tp}) but {world} process(es) run; "
                           "set parallel.dp_shard=-1 to take the rest, or change the sizes")
    return sizes


def build_layout(pc: ParallelConfig, world: int, rank: int, device: torch.device) -> Layout:
    sizes = resolve_sizes(pc, world)
    layout = Layout(**sizes, dp_world=sizes["dp_replicate"] * sizes["dp_shard"])
    if world == 1:
        return layout
    from torch.distributed.device_mesh import init_device_mesh

    dims = [d for d in MESH_DIMS if sizes[d] > 1]
    mesh = init_device_mesh(device.type, tuple(sizes[d] for d in dims), mesh_dim_names=tuple(dims))
    layout.mesh = mesh
    dp_dims = [d for d in ("dp_replicate", "dp_shard") if d in dims]
    if dp_dims:
        coords = {d: mesh[d].get_local_rank() for d in dp_dims}
        layout.dp_rank = coords.get("dp_replicate", 0) * sizes["dp_shard"] + coords.get("dp_shard", 0)
    return layout


def check_supported(layout: Layout, objective: str) -> None:
    """Refuse, with the reason, the layouts this version does not train."""
    unsupported = [(k, getattr(layout, k)) for k in ("tp", "cp") if getattr(layout, k) > 1]
    if unsupported:
        k, v = unsupported[0]
        raise LmforgeError(f"parallel.{k}={v}: not available yet; parallel.dp_shard (FSDP2), parallel.dp_replicate "
                           "(DDP, or HSDP with dp_shard) and parallel.pp (pretraining) are")
    if layout.pp > 1 and objective != "lm":
        raise LmforgeError(f"parallel.pp={layout.pp}: pipeline parallel trains pretraining only; {objective} needs "
                           "the whole model per rank (per-sequence scores, generation): use parallel.dp_shard (FSDP2)")
    if layout.pp > 1 and layout.dp_world > 1:
        raise LmforgeError(f"parallel.pp={layout.pp} with data parallel (dp_replicate x dp_shard = {layout.dp_world}): "
                           "data parallel across pipelines is not available yet; give every process to the pipeline")


def parallelize_decoder(model: nn.Module, layout: Layout, pc: ParallelConfig, tc: TrainConfig,
                        device: torch.device, amp: torch.dtype | None) -> nn.Module:
    """The decoder family's parallelize: its blocks are `model.model.layers` (under LoRA, the base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    pipe = None
    if layout.pp > 1:  # first: the later steps apply to this rank's stages only
        from lmforge.train.pipeline import build_pipeline

        pipe = build_pipeline(model, layout, pc, tc.micro_batch, tc.loss_chunk, device)
    blocks = list(base.model.layers.values() if isinstance(base.model.layers, nn.ModuleDict) else base.model.layers)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if tc.compile:
        apply_compile(blocks)
    if layout.fsdp:
        apply_fsdp(model, blocks, layout, pc, device, amp)
    return pipe or model


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block in backward, keeping only its input.

    The composable `checkpoint` works through hooks on the module itself, so parameter names (the
    Hugging Face names checkpoints are written with) stay as they are and FSDP can wrap it after.
    """
    from torch.distributed._composable import checkpoint

    for block in blocks:
        checkpoint(block)


def apply_compile(blocks: list[nn.Module]) -> None:
    """Compile each block in place (its names unchanged). Blocks share one graph, so the first compile
    serves them all; where compiling cannot work (no C++ compiler, no Triton), dynamo says why and runs
    those frames eagerly instead of stopping the run."""
    torch._dynamo.config.suppress_errors = True
    for block in blocks:
        block.compile()


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], layout: Layout, pc: ParallelConfig,
               device: torch.device, amp: torch.dtype | None) -> None:
    """FSDP2 (ZeRO-3): each block one unit, then the root (embeddings, final norm, head).

    With dp_replicate > 1 as well, the mesh is 2-D and FSDP2 shards within a replica and replicates
    across them (HSDP). The last block is not resharded after forward: backward needs it at once.
    Mixed precision (CUDA, bf16): parameters gathered in bf16, gradients reduced in fp32, master
    weights and optimizer state kept in fp32.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    dims = tuple(d for d in ("dp_replicate", "dp_shard") if getattr(layout, d) > 1)
    mesh = layout.mesh[dims]
    kw: dict = {"mesh": mesh}
    if pc.mixed_precision and device.type == "cuda" and amp is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    if pc.fsdp_cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for i, block in enumerate(blocks):
        reshard = pc.fsdp_reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **kw)
        _RESHARD[block] = reshard
    fully_shard(model, reshard_after_forward=pc.fsdp_reshard_after_forward, **kw)
    _RESHARD[model] = False  # FSDP2 keeps the root gathered after forward: backward needs it first


# Each FSDP unit's reshard_after_forward, to put back after `gathered`.
_RESHARD: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Whole parameters on every rank while inside: forward passes then need no collectives.

    Evaluation, sampling and GRPO's rollouts run a different number of forward passes on each rank
    (rank 0 alone samples; generation stops when a rank's sequences end). Under FSDP each forward
    would all-gather, and ranks that call it a different number of times wait on each other forever.
    Gathering once on every rank (the same collective everywhere) and keeping the weights until the
    end avoids that, at the memory of one whole copy of the parameters. Outside FSDP it does nothing.
    Every rank must enter it together.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(_RESHARD.get(m, True), recurse=False)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's no_sync: skip the reduce-scatter for all but the last micro-batch of a step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
