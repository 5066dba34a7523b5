"""Parallelism applied to a model from outside it: the device mesh, then TP, context parallel's ring
attention, activation checkpointing, per-block compile and FSDP2, in that order (torchtitan's order;
each later step wraps what the earlier one produced). DDP, for `parallel.dp_replicate` alone, is
applied by the trainer.

The model file never mentions any of this. What a step needs to know of a family is where its blocks
are (`model.model.layers`), which the spec's parallelize function passes in, and for tensor parallel
how each of its layers is cut, which `apply_tp`'s plan says by the layers' (Hugging Face) names.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from lmforge.config import ModelConfig, ParallelConfig, TrainConfig
from lmforge.console import log
from lmforge.errors import LmforgeError
from lmforge.model.transformer import ffn_dim
from lmforge.train.expert import apply_ep, check_ep, whole_experts

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
    offload_alone: bool = False  # one process, FSDP2 all the same: its CPU offload is what fits the model
    cp_rank: int = 0  # which part of each sequence of its slice this rank holds (context parallel)
    ep: int = 1  # expert parallel: ranks among the dp_shard ones that split each MoE layer's experts
    sparse_mesh: object | None = None  # expert parallel's (efsdp, ep) mesh over the same processes (train/expert.py)

    @property
    def data_parts(self) -> int:
        """How many distinct parts of the global batch the ranks hold: every data-parallel slice cut into
        cp parts of each sequence. Ranks beyond that (tensor parallel) hold the same tokens as others."""
        return self.dp_world * self.cp

    @property
    def fsdp(self) -> bool:
        # Context-parallel ranks compute different gradients of the same weights: FSDP reduces them too.
        return self.dp_shard > 1 or self.cp > 1 or self.offload_alone

    @property
    def ddp(self) -> bool:
        return self.dp_replicate > 1 and not self.fsdp and self.tp == 1 and self.pp == 1

    def describe(self) -> str:
        parts = [f"{k} {getattr(self, k)}" for k in (*MESH_DIMS, "ep") if getattr(self, k) > 1]
        alone = "one process, FSDP2 (parallel.fsdp_cpu_offload)" if self.offload_alone else "one process"
        return ", ".join(parts) or alone


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
    if pc.ep < 1 or (pc.ep > 1 and sizes["dp_shard"] % pc.ep):
        raise LmforgeError(f"parallel.ep={pc.ep} must be a positive divisor of parallel.dp_shard="
                           f"{sizes['dp_shard']}: expert-parallel ranks are data-parallel (FSDP2) ranks that "
                           "also split the experts, as in torchtitan")
    return sizes


def build_layout(pc: ParallelConfig, world: int, rank: int, device: torch.device) -> Layout:
    sizes = resolve_sizes(pc, world)
    layout = Layout(**sizes, dp_world=sizes["dp_replicate"] * sizes["dp_shard"], ep=pc.ep)
    from torch.distributed.device_mesh import init_device_mesh

    if world == 1:
        if pc.fsdp_cpu_offload:  # a model larger than the GPU trains on one with its state in host memory
            import torch.distributed as tdist

            if not tdist.is_initialized():
                tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=tdist.HashStore(),
                                         rank=0, world_size=1)
            layout.mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard",))
            layout.offload_alone = True
        return layout

    dims = [d for d in MESH_DIMS if sizes[d] > 1]
    mesh = init_device_mesh(device.type, tuple(sizes[d] for d in dims), mesh_dim_names=tuple(dims))
    layout.mesh = mesh
    dp_dims = [d for d in ("dp_replicate", "dp_shard") if d in dims]
    if dp_dims:
        coords = {d: mesh[d].get_local_rank() for d in dp_dims}
        layout.dp_rank = coords.get("dp_replicate", 0) * sizes["dp_shard"] + coords.get("dp_shard", 0)
    if "cp" in dims:
        layout.cp_rank = mesh["cp"].get_local_rank()
        if "dp_shard" in dims:  # FSDP shards over both (see apply_fsdp)
            mesh[("dp_shard", "cp")]._flatten("dp_shard_cp")
    if layout.ep > 1:  # check_supported refuses every other dimension beside it
        layout.sparse_mesh = init_device_mesh(device.type, (sizes["dp_shard"] // layout.ep, layout.ep),
                                              mesh_dim_names=("efsdp", "ep"))
    return layout


def check_supported(layout: Layout, objective: str) -> None:
    """Refuse, with the reason, the layouts this version does not train."""
    if layout.ep > 1:
        others = [f"parallel.{k}={getattr(layout, k)}" for k in ("dp_replicate", "cp", "tp", "pp")
                  if getattr(layout, k) > 1]
        if others:
            raise LmforgeError(f"parallel.ep={layout.ep} with {', '.join(others)}: expert parallel is built "
                               "with FSDP2 (parallel.dp_shard) alone; train the others without parallel.ep")
    if layout.cp > 1 and objective != "lm":
        raise LmforgeError(f"parallel.cp={layout.cp}: context parallel trains pretraining only; {objective} needs "
                           "whole sequences on each rank (padded rows, per-sequence scores, generation): use "
                           "parallel.dp_shard (FSDP2) or parallel.tp")
    if layout.cp > 1 and layout.pp > 1:
        raise LmforgeError(f"parallel.cp={layout.cp} with parallel.pp={layout.pp}: context parallel inside "
                           "pipeline stages is not available yet; use one or the other")
    if layout.pp > 1 and layout.tp > 1:
        raise LmforgeError(f"parallel.pp={layout.pp} with parallel.tp={layout.tp}: tensor parallel inside pipeline "
                           "stages is not available yet; use one or the other")
    if layout.pp > 1 and objective != "lm":
        raise LmforgeError(f"parallel.pp={layout.pp}: pipeline parallel trains pretraining only; {objective} needs "
                           "the whole model per rank (per-sequence scores, generation): use parallel.dp_shard (FSDP2)")
    if layout.tp > 1 and layout.dp_replicate > 1 and not layout.fsdp:
        # DDP wraps a whole module of plain tensors; with TP the replicas are FSDP's to reduce.
        raise LmforgeError(f"parallel.tp={layout.tp} with parallel.dp_replicate={layout.dp_replicate} needs "
                           "parallel.dp_shard > 1 as well (HSDP x TP); for data parallelism beside TP use "
                           "parallel.dp_shard")


def parallelize_decoder(model: nn.Module, layout: Layout, pc: ParallelConfig, tc: TrainConfig,
                        device: torch.device, amp: torch.dtype | None) -> nn.Module:
    """The decoder family's parallelize: its blocks are `model.model.layers` (under LoRA, the base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_attention(base.cfg, layout)
    pipe = None
    experts = base.cfg.moe.experts
    if experts and (layout.tp > 1 or layout.pp > 1):
        key, size = ("parallel.tp", layout.tp) if layout.tp > 1 else ("parallel.pp", layout.pp)
        raise LmforgeError(f"{key}={size} with model.moe.experts={experts}: mixture-of-experts layers are not "
                           "split across tensor-parallel ranks or pipeline stages yet; train them with data "
                           "parallel (parallel.dp_shard, FSDP2) or parallel.cp")
    if layout.pp > 1 and layout.dp_world > 1 and base.cfg.tie_embeddings:
        raise LmforgeError(f"model.tie_embeddings=true with parallel.pp={layout.pp} and data parallel: the embedding "
                           "and the head belong to two pipeline stages, which FSDP2 shards as two units, and a "
                           "weight cannot be in both; set model.tie_embeddings=false")
    if layout.pp > 1:  # first: the later steps apply to this rank's stages only
        from lmforge.train.pipeline import build_pipeline

        pipe = build_pipeline(model, layout, pc, tc.micro_batch, tc.loss_chunk, device)
    blocks = list(base.model.layers.values() if isinstance(base.model.layers, nn.ModuleDict) else base.model.layers)
    experts_units: list[nn.Module] = []
    if getattr(layout, "ep", 1) > 1:  # first of all: the later steps wrap the dispatching experts
        check_ep(experts, layout.ep)
        experts_units = apply_ep(blocks, layout.sparse_mesh["ep"])
    if layout.tp > 1:  # check_supported refused it with pipeline stages
        if base is not model:
            raise LmforgeError(f"parallel.tp={layout.tp}: LoRA adapters are not tensor-parallel; train them "
                               "with parallel.dp_shard (FSDP2) or on one process")
        check_tp_sizes(base.cfg, layout.tp)
        apply_tp(model, layout.mesh["tp"])
    if layout.cp > 1:
        apply_cp(blocks, layout, base.cfg, tc.seq_len, device)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if tc.compile:
        apply_compile(blocks)
    if pipe is not None and layout.dp_world > 1:  # the stages are what the schedule calls: each is a root
        apply_fsdp(pipe.stages, blocks, layout, pc, device, amp)
    elif layout.fsdp:
        apply_fsdp([model], blocks, layout, pc, device, amp, experts_units)
    return pipe or model


def parallelize_t5(model: nn.Module, layout: Layout, pc: ParallelConfig, tc: TrainConfig,
                   device: torch.device, amp: torch.dtype | None) -> nn.Module:
    """The encoder-decoder's parallelize: data parallel (DDP, FSDP2 with each block of both stacks a unit),
    activation checkpointing and compile per block. Tensor, pipeline and context parallel are refused:
    its cross-attention and two stacks have no plan or split here."""
    for key, size in (("tp", layout.tp), ("pp", layout.pp), ("cp", layout.cp)):
        if size > 1:
            raise LmforgeError(f"parallel.{key}={size} with model.arch=t5: the encoder-decoder trains with data "
                               "parallel only (parallel.dp_replicate for DDP, parallel.dp_shard for FSDP2)")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = base.blocks()
    if tc.activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if tc.compile:
        apply_compile(blocks)
    if layout.fsdp:
        apply_fsdp([model], blocks, layout, pc, device, amp)
    return model


def check_attention(cfg: ModelConfig, layout: Layout) -> None:
    """Multi-head latent attention has no tensor- or context-parallel form yet.

    Under tensor parallel each rank's heads would read the one RoPE key and latent that every head
    shares, and their gradients would have to be summed over the ranks before reaching
    kv_a_proj_with_mqa; the ring attention of context parallel passes per-head keys and values, not
    latents. Neither is written, so both are refused rather than trained wrong.
    """
    if cfg.attention != "mla":
        return
    for key, size in (("tp", layout.tp), ("cp", layout.cp)):
        if size > 1:
            raise LmforgeError(f"parallel.{key}={size} with model.attention=mla: multi-head latent attention has no "
                               f"{'tensor' if key == 'tp' else 'context'}-parallel plan yet; use parallel.dp_shard "
                               "(FSDP2) or model.attention=mha")


def check_tp_sizes(cfg: ModelConfig, tp: int) -> None:
    """Every dimension tensor parallel cuts must split evenly into `tp` parts."""
    sizes = {"model.n_head": cfg.n_head, "model.n_kv_head": cfg.n_kv_head or cfg.n_head,
             "model.ffn_dim": ffn_dim(cfg), "model.vocab_size": cfg.vocab_size}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % tp]
    if bad:
        raise LmforgeError(f"parallel.tp={tp} must divide {', '.join(bad)}: each rank holds 1/{tp} of the "
                           "heads, the MLP's hidden units and the vocabulary (pad the vocabulary with "
                           "model.pad_vocab_to)")


def apply_tp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Tensor parallel (Megatron-style) with sequence parallel, on the 1-D `tp` mesh, in place.

    Between blocks the residual stream is cut along the sequence (Shard(1)): norms run on each rank's
    tokens. Attention and the MLP gather the whole sequence, then q/k/v and gate/up are split by output
    rows (each rank its own heads, its own hidden units) and o/down by input columns, whose partial sums
    are reduce-scattered back to sequence shards. The residual stream is kept a DTensor (torchtitan hands
    local tensors between modules), so a length tp does not divide (SFT's padded rows, one token at a
    time when sampling) is cut unevenly and still works. The final norm's output is gathered, so
    the loss chunks over whole tokens, and the head is split by vocabulary: logits stay vocab-sharded
    and the loss is vocab-parallel (`loss_parallel`, entered by the step and evaluation), never whole.
    A tied head and embedding are both cut by vocabulary rows (Shard(0)), so they stay one parameter.
    """
    cfg = model.cfg
    learned = cfg.pos == "learned"
    plan: dict = {
        # Learned positions are added to the whole embedded sequence, which block 0 then cuts.
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate() if learned
                                              else Shard(1), use_local_output=False),
        "model.norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False),
    }
    if learned:
        plan["model.embed_positions"] = Replicated(local_output=False)
        plan["model.layers.0"] = PrepareModuleInput(input_layouts=(Replicate(), None, None, None),
                                                    desired_input_layouts=(Shard(1), None, None, None))
    if isinstance(getattr(model, "score", None), nn.Linear):  # the reward model's head reads whole states
        plan["score"] = Replicated()
    parallelize_module(model, mesh, plan)
    # SequenceParallel leaves the final norm's output cut by sequence; the head wants it whole.
    parallelize_module(model.model.norm, mesh, PrepareModuleOutput(output_layouts=Shard(1),
                                                                   desired_output_layouts=Replicate()))
    seq_in = PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                desired_input_layouts=(Replicate(), None, None, None))
    for block in model.model.layers:
        layer = {
            "input_layernorm": SequenceParallel(),
            "self_attn": seq_in,
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        }
        if cfg.mlp == "swiglu":
            layer["mlp.gate_proj"] = ColwiseParallel()
        if cfg.qk_norm:
            # Qwen3's per-head norms see (B, local heads, T, D): a rank's own heads, cut along dim 1,
            # so their gains' gradients are summed over the ranks like any replicated weight's.
            layer["self_attn.q_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
            layer["self_attn.k_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        parallelize_module(block, mesh, layer)
    if cfg.tie_embeddings:  # each style registered its own copy of the shared weight
        model.lm_head.weight = model.model.embed_tokens.weight
    plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:  # a weight the plan missed would train on each rank's share of the gradient only
        raise LmforgeError(f"parallel.tp: the tensor-parallel plan (train/parallelize.py apply_tp) has no place "
                           f"for {', '.join(plain)}; train this model with parallel.dp_shard instead")
    model.register_forward_hook(_whole_output)


def _whole_output(module: nn.Module, args: tuple, output: object) -> object:
    """Logits for generation come out whole: samplers and scorers index the vocabulary freely.

    Training never asks for them (it asks for the loss, whose vocab-parallel value is already whole)."""
    return output.full_tensor() if isinstance(output, DTensor) else output


class Replicated(ParallelStyle):
    """A module whose weights are whole on every tensor-parallel rank and which sees the same inputs on each.

    Its parameters become Replicate DTensors (so that clipping and the optimizer see one mesh and no plain
    tensor among DTensors), its plain tensor inputs are marked Replicate, and its output is handed back as
    a local tensor (or kept a DTensor, to be added to one).
    """

    def __init__(self, local_output: bool = True):
        super().__init__()
        self.local_output = local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def inputs(mod: nn.Module, args: tuple, mesh: DeviceMesh) -> tuple:
            return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                         if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a for a in args)

        def output(mod: nn.Module, out: DTensor, mesh: DeviceMesh) -> torch.Tensor:
            return out.to_local() if self.local_output else out

        return distribute_module(module, device_mesh, None, inputs, output)


def apply_cp(blocks: list[nn.Module], layout: Layout, cfg: ModelConfig, seq_len: int, device: torch.device) -> None:
    """Context parallel: every block's attention becomes the ring over the `cp` ranks (train/context.py).

    The objective hands each rank its part of every sequence, with the tokens' global positions. On a
    CPU the ring's blocks run the flash kernel; on CUDA, PyTorch's own ops (each block pair's scores are
    held at once, so a rank's attention memory grows with (seq_len / cp)^2, not linearly as flash's)."""
    from lmforge.train.context import RingAttention

    cp = layout.cp
    if device.type != "cpu":
        log(f"parallel.cp={cp} on {device.type}: the ring attention computes its blocks with PyTorch ops "
            "(no flash kernel yet), so attention memory grows with the square of seq_len / cp")
    if seq_len % (2 * cp):
        raise LmforgeError(f"train.seq_len={seq_len} must be a multiple of 2 x parallel.cp = {2 * cp}: each rank "
                           "holds two equal chunks of every sequence (one early, one late, so the causal work "
                           "is the same on every rank)")
    if cfg.dropout > 0:
        raise LmforgeError(f"parallel.cp={cp} with model.dropout={cfg.dropout}: the ring attention has no "
                           "attention dropout; set model.dropout=0")
    if cfg.sliding_window:
        raise LmforgeError(f"parallel.cp={cp} with model.sliding_window={cfg.sliding_window}: the ring attention "
                           "has no sliding-window masks; train local layers with parallel.dp_shard or parallel.tp")
    if cfg.sparse_block:
        raise LmforgeError(f"parallel.cp={cp} with model.sparse_block={cfg.sparse_block}: the ring attention has no "
                           "block-sparse masks; train block-sparse layers with parallel.dp_shard or parallel.tp")
    ring = RingAttention(layout.mesh["cp"].get_group())
    for block in blocks:
        block.self_attn.attend = ring


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


def apply_fsdp(roots: list[nn.Module], blocks: list[nn.Module], layout: Layout, pc: ParallelConfig,
               device: torch.device, amp: torch.dtype | None, experts: list[nn.Module] = ()) -> None:
    """FSDP2 (ZeRO-3): each block one unit, then each root (embeddings, final norm, head): the model, or
    under pipeline parallel each of this rank's stages (torch's pipeline schedules drive FSDP's gradient
    sync per micro-batch when a stage's module is an FSDP unit).

    With dp_replicate > 1 as well, the mesh is 2-D and FSDP2 shards within a replica and replicates
    across them (HSDP); under pipeline parallel, dp_replicate alone shards too (data parallel across
    pipelines is always FSDP2 there). Context-parallel ranks are shards of the same replica (as torchtitan
    has it): the weights are sharded over dp_shard x cp and the gradient reduction averages over them
    (hence the loss scale of train/step.py). The last block is not resharded after forward: backward
    needs it at once.
    Under expert parallel each layer's experts are a unit of their own on the sparse mesh's efsdp
    dimension (their weights are already cut by expert along ep), dividing their gradients by the
    whole data-parallel size (train/expert.py says why).
    Mixed precision (CUDA, bf16): parameters gathered in bf16, gradients reduced in fp32, master
    weights and optimizer state kept in fp32.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if layout.cp > 1:
        shard = "dp_shard_cp" if layout.dp_shard > 1 else "cp"
        dims = ("dp_replicate", shard) if layout.dp_replicate > 1 else (shard,)
    else:
        dims = tuple(d for d in ("dp_replicate", "dp_shard") if getattr(layout, d) > 1) or ("dp_shard",)
    mesh = layout.mesh[dims]
    kw: dict = {"mesh": mesh}
    if pc.mixed_precision and device.type == "cuda" and amp is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    if pc.fsdp_cpu_offload and device.type == "cpu":  # FSDP2's offload needs an accelerator to offload from
        log("parallel.fsdp_cpu_offload: training on the CPU, the state is in host memory already; nothing to offload")
    elif pc.fsdp_cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for unit in experts:
        fully_shard(unit, **{**kw, "mesh": layout.sparse_mesh["efsdp"]},
                    reshard_after_forward=pc.fsdp_reshard_after_forward)
        unit.set_gradient_divide_factor(float(layout.dp_world))
        _RESHARD[unit] = pc.fsdp_reshard_after_forward
    for i, block in enumerate(blocks):
        reshard = pc.fsdp_reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **kw)
        _RESHARD[block] = reshard
    for root in roots:
        fully_shard(root, reshard_after_forward=pc.fsdp_reshard_after_forward, **kw)
        _RESHARD[root] = False  # FSDP2 keeps the root gathered after forward: backward needs it first


# Each FSDP unit's reshard_after_forward, to put back after `gathered`.
_RESHARD: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Whole parameters on every rank while inside: forward passes then need no collectives.

    Evaluation, sampling and GRPO's rollouts run a different number of forward passes on each rank
    (rank 0 alone samples; generation stops when a rank's sequences end). Under FSDP each forward
    would all-gather, and ranks that call it a different number of times wait on each other forever.
    Gathering once on every rank (the same collective everywhere) and keeping the weights until the
    end avoids that, at the memory of one whole copy of the parameters (under expert parallel, every
    expert as well: train/expert.py whole_experts). Outside FSDP it does nothing.
    Every rank must enter it together.
    """
    from torch.distributed.fsdp import FSDPModule

    roots = model.pipe.stages if hasattr(model, "pipe") else [model]  # PipelineLM: the stages hold the units
    units = list({id(m): m for r in roots for m in r.modules() if isinstance(m, FSDPModule)}.values())
    if not units:
        yield
        return
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        with whole_experts(model):  # expert parallel: each rank all experts, no all-to-all
            yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(_RESHARD.get(m, True), recurse=False)


def loss_context(layout: Layout) -> contextlib.AbstractContextManager:
    """Where losses are formed and differentiated: under tensor parallel, cross-entropy of vocab-sharded
    logits computed in parallel (each rank its slice of the softmax). Forward and backward must both be
    inside; outside tensor parallel it does nothing."""
    return loss_parallel() if layout.tp > 1 else contextlib.nullcontext()


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's no_sync: skip the reduce-scatter for all but the last micro-batch of a step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
