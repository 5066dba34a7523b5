"""Training memory per GPU under a parallel layout, and the planner that picks the layout for a machine.

`training_memory` is arithmetic, not a measurement: it counts what one process holds at the peak
of a training step, for the worst pipeline stage. `plan` runs it for every layout N GPUs allow and
suggests the first that fits in the order of `rank`. `lmforge model info PRESET --gpus N --gpu-mem
24GB` prints the table; `lmforge doctor` checks the configured layout with the same function.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from lmforge.config import ModelConfig, ParallelConfig
from lmforge.errors import LmforgeError

GiB = 2**30
HEADROOM = 0.9  # usable fraction of a GPU: the rest is the CUDA context, NCCL buffers, fragmentation
AUTO_CHUNK = 1024  # train.loss_chunk=0 (model/loss.py); a copy, so this arithmetic imports no torch


@dataclass(frozen=True)
class Layout:
    """How one training run is spread over GPUs: the sizes of `parallel.*` and the memory switches."""

    dp_replicate: int = 1  # whole copies (DDP); with dp_shard > 1, HSDP
    dp_shard: int = 1  # FSDP2 shards
    tp: int = 1  # tensor parallel, with sequence parallel
    pp: int = 1  # pipeline stages
    cp: int = 1  # context parallel: each sequence split this many ways
    activation_checkpointing: bool = False
    cpu_offload: bool = False  # FSDP keeps its sharded state in host memory
    mixed_precision: bool = True  # FSDP gathers 16-bit parameters when training in bf16/fp16
    pp_microbatches: int = 0  # 0: the micro-batch split into single sequences
    pp_schedule: str = "1f1b"

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp

    @property
    def sizes(self) -> tuple[int, ...]:
        """What decides where the state lives: the mesh sizes and offload."""
        return self.dp_replicate, self.dp_shard, self.tp, self.pp, self.cp, int(self.cpu_offload)

    @property
    def fsdp(self) -> bool:
        return self.dp_shard > 1 or self.cp > 1 or self.cpu_offload  # the trainer shards over dp_shard x cp

    @property
    def name(self) -> str:
        parts = []
        if self.tp > 1:
            parts.append(f"TP {self.tp}")
        if self.pp > 1:
            parts.append(f"PP {self.pp}")
        if self.cp > 1:
            parts.append(f"CP {self.cp}")
        if self.dp_shard > 1:
            parts.append(f"HSDP {self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 else
                         f"FSDP {self.dp_shard}")
        elif self.dp_replicate > 1:
            parts.append(f"DDP {self.dp_replicate}")
        name = " + ".join(parts) or "1 GPU"
        if self.cpu_offload:
            name += " + offload"
        return name + (" + AC" if self.activation_checkpointing else "")

    def keys(self) -> list[str]:
        """The config keys that select this layout, to paste after a recipe (none for one plain GPU)."""
        out = [f"parallel.dp_replicate={self.dp_replicate}", f"parallel.dp_shard={self.dp_shard}"] \
            if self.world > 1 else []
        out += [f"parallel.{k}={getattr(self, k)}" for k in ("tp", "pp", "cp") if getattr(self, k) > 1]
        if self.pp > 1:  # the embedding and the head sit in different stages (FSDP2 shards each stage alone)
            out.append("model.tie_embeddings=false")
        if self.cpu_offload:
            out.append("parallel.fsdp_cpu_offload=true")
        if self.activation_checkpointing:
            out.append("train.activation_checkpointing=true")
        return out

    @classmethod
    def from_config(cls, p: ParallelConfig, activation_checkpointing: bool, world: int = 0) -> Layout:
        """The layout a config trains with on `world` processes (0: the product of its explicit sizes).

        dp_shard=-1 takes the processes the other sizes leave over, as the trainer does.
        """
        fixed = p.dp_replicate * p.tp * p.pp * p.cp
        world = world or fixed * max(p.dp_shard, 1)
        shard = world // fixed if p.dp_shard == -1 else p.dp_shard
        if shard < 1 or fixed * shard != world:
            raise LmforgeError(f"parallel sizes dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} x tp={p.tp} "
                               f"x pp={p.pp} x cp={p.cp} do not multiply to the {world} processes (WORLD_SIZE)")
        return cls(p.dp_replicate, shard, p.tp, p.pp, p.cp, activation_checkpointing, p.fsdp_cpu_offload,
                   p.mixed_precision, p.pp_microbatches, p.pp_schedule)


@dataclass(frozen=True)
class Params:
    """Parameter counts by where they live, which is what sharding and pipeline stages divide."""

    block: int  # one transformer block
    block_matrices: int  # its 2-D weights: Muon's parameters, and the ones autocast copies to 16 bit
    qkv: int  # its q, k, v weights, concatenated into one product each training step
    embed: int  # token (+ learned position) embeddings
    head: int  # lm_head (vocab x C), counted even when tied: a pipeline's last stage holds its own
    final_norm: int
    n_layer: int
    tied: bool

    @property
    def total(self) -> int:
        return self.n_layer * self.block + self.embed + (0 if self.tied else self.head) + self.final_norm


_params_cache: dict[str, Params] = {}


def param_counts(cfg: ModelConfig) -> Params:
    """Counted on a meta-device model, so the split always matches the model that would train."""
    key = repr(cfg)
    if key not in _params_cache:
        import torch

        from lmforge.model.transformer import Transformer

        with torch.device("meta"):
            model = Transformer(cfg)
        layer = model.model.layers[0]
        size = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        embed = [model.model.embed_tokens.weight] + ([model.model.embed_positions.weight]
                                                     if cfg.pos == "learned" else [])
        blocks = list(model.model.layers)  # MoE: dense first layers differ, so a block is their mean
        _params_cache[key] = Params(
            block=sum(size(b.parameters()) for b in blocks) // len(blocks),
            block_matrices=sum(size(p for p in b.parameters() if p.dim() >= 2) for b in blocks) // len(blocks),
            qkv=size(m.weight for m in getattr(layer.self_attn, "qkv", ())),
            embed=size(embed), head=model.lm_head.weight.numel(), final_norm=size(model.model.norm.parameters()),
            n_layer=cfg.n_layer, tied=cfg.tie_embeddings)
    return _params_cache[key]


def block_activation_bytes(cfg: ModelConfig, precision: str) -> float:
    """Bytes one block saves for backward per token: Korthikanti et al. (2022)'s count, on lmforge's block.

    Their method (every tensor autograd keeps, with a flash attention that keeps no T x T scores)
    applied to this block on the eager CUDA path, where the residual stream stays fp32 under
    autocast: each RMSNorm keeps its fp32 input and normalised output (8C; LayerNorm 4C); attention
    keeps the q/k/v projection's input and output, q and k after RoPE, and the attention output;
    SwiGLU keeps its input (cast to 16 bit once per projection), gate, up, silu(gate) and the down
    projection's input. For GPT-2's block this gives 36C at 16 bit, near their 34C (which has
    dropout masks and no fp32 norms); for the Llama block 55C. tests/test_memory.py holds it to
    what autograd really saves. Dropout and qk_norm are not counted.
    """
    a = 2 if precision in ("bf16", "fp16") else 4
    c, d = cfg.n_embd, cfg.head_dim or cfg.n_embd // cfg.n_head
    cq, ckv = cfg.n_head * d, (cfg.n_kv_head or cfg.n_head) * d
    from lmforge.model.transformer import ffn_dim

    f = ffn_dim(cfg)
    if cfg.moe.experts:  # a token's activations in an MoE layer: its top_k experts' and the shared experts'
        from lmforge.model.moe import expert_dim

        f = expert_dim(cfg, f) * (cfg.moe.top_k + cfg.moe.shared_experts)
    norms = 2 * (8 * c if cfg.norm == "rmsnorm" else 4 * c)
    rope = cq + ckv if cfg.pos == "rope" else 0
    attention = a * (c + (cq + 2 * ckv) + rope + cq)
    casts = 2 if a == 2 else 1  # under autocast each projection casts the shared input itself
    mlp = a * (casts * c + 4 * f) if cfg.mlp == "swiglu" else a * (c + 2 * f)
    return norms + attention + mlp


def _stage(params: Params, layout: Layout, first: bool, last: bool) -> tuple[int, int]:
    """(layers, parameters outside the blocks) that one pipeline stage holds; the worst split of layers."""
    layers = math.ceil(params.n_layer / layout.pp)
    extra = params.embed if first else 0
    if last:
        extra += params.final_norm + (0 if first and params.tied else params.head)
    return layers, extra


def _state(params: Params, layers: int, extra: int, optimizer: str, shards: int) -> dict[str, float]:
    """fp32 master weights, fp32 gradients and optimizer state of one stage, sharded `shards` ways.

    AdamW keeps two fp32 moments (8 B). Muon keeps one momentum buffer (4 B) for the blocks'
    matrices, which it orthogonalises, and AdamW's two for the rest (embeddings, head, gains).
    """
    n = layers * params.block + extra
    muon_n = layers * params.block_matrices
    opt = 8 * n if optimizer == "adamw" else 4 * muon_n + 8 * (n - muon_n)
    return {"weights": 4 * n / shards, "grads": 4 * n / shards, "optimizer": opt / shards}


def _copies(params: Params, layout: Layout, layers: int, extra: int, precision: str) -> float:
    """Full-size weight copies a step holds beside the master weights (divided by tp only).

    FSDP: the current and the prefetched block all-gathered, the root's parameters (embedding, head,
    final norm; FSDP2 keeps the root gathered from forward into backward) and one block's unsharded
    fp32 gradient before its reduce-scatter. Under bf16 without FSDP's 16-bit gather, autocast's
    16-bit casts of the blocks' matrices are saved for backward; in every case the q/k/v weights
    concatenated for the fused projection are. Activation checkpointing keeps none of those saved
    copies: they are made again for the one block being recomputed.
    """
    half = precision in ("bf16", "fp16")
    gathered_bytes = 2 if half and layout.mixed_precision else 4
    saved = 1 if layout.activation_checkpointing else layers
    out = 0.0
    if layout.fsdp:
        out += gathered_bytes * (min(2, layers) * params.block + extra) + 4 * params.block
    if half and not (layout.fsdp and layout.mixed_precision):
        out += 2 * saved * params.block_matrices
    else:
        out += gathered_bytes * saved * params.qkv
    return out / layout.tp


def _in_flight(layout: Layout, batch: int, first: bool) -> tuple[int, float]:
    """(micro-batches whose activations a stage holds at once, sequences in each).

    1F1B-style schedules keep up to pp micro-batches in flight on the first stage and one on the
    last; GPipe keeps them all. Without a pipeline, the whole micro-batch is one.
    """
    if layout.pp == 1:
        return 1, batch
    n = layout.pp_microbatches or batch
    held = n if layout.pp_schedule == "gpipe" else min(layout.pp, n) if first else 1
    return held, batch / n


def _activations(cfg: ModelConfig, layout: Layout, layers: int, tokens: float, held: int, last: bool,
                 precision: str) -> float:
    """Activations of `held` micro-batches of `tokens` tokens through `layers` blocks (divided by tp, cp).

    Sequence parallel splits every saved tensor across the TP ranks (Korthikanti et al.); context
    parallel splits the tokens. With activation checkpointing each block keeps only its fp32 input,
    and one block at a time is recomputed in full during backward. The last stage also keeps the
    final norm's tensors and the fp32 gradient of the hidden states the fused loss forms in forward.
    """
    per_token = block_activation_bytes(cfg, precision)
    tokens = tokens / layout.cp
    if layout.activation_checkpointing:
        stored = held * tokens * layers * 4 * cfg.n_embd + tokens * per_token
    else:
        stored = held * tokens * layers * per_token
    if last:
        stored += tokens * ((8 if cfg.norm == "rmsnorm" else 4) + 4) * cfg.n_embd
    return stored / layout.tp


def _loss_chunk(cfg: ModelConfig, layout: Layout, tokens: float, loss_chunk: int, precision: str) -> float:
    """The fused chunked head + cross-entropy (model/loss.py): never all logits, one chunk of them.

    Per chunk of train.loss_chunk tokens: the fp32 logits and their log-softmax (8 B x vocab);
    for the whole step: the head's fp32 gradient, formed in forward (4 B x vocab x C), and under
    16-bit autocast the head cast to 16 bit (2 B x vocab x C) unless FSDP gathered it so. Under TP
    the vocabulary is split. Beyond one chunk this does not grow with batch x sequence.
    """
    chunk = min(loss_chunk or AUTO_CHUNK, tokens / layout.cp)
    head = cfg.vocab_size * cfg.n_embd
    cast = 2 * head if precision in ("bf16", "fp16") and not (layout.fsdp and layout.mixed_precision) else 0
    return (8 * chunk * cfg.vocab_size + 4 * head + cast) / layout.tp


def training_memory(cfg: ModelConfig, batch: int, seq_len: int, precision: str = "bf16", optimizer: str = "adamw",
                    layout: Layout | None = None, loss_chunk: int = 0) -> dict[str, int]:
    """Bytes one GPU needs to train `cfg` at `batch` x `seq_len` per process under `layout`.

    weights / grads / optimizer: the fp32 master state, sharded over dp_shard x cp x tp (DDP also keeps
    gradient buckets as large as the gradients, which it all-reduces from). copies: the 16-bit and
    all-gathered weight copies a step holds (`_copies`). activations: `_activations`. loss_chunk:
    `_loss_chunk`. With a pipeline, the worse of the first stage (embedding, pp micro-batches in
    flight) and the last (head and loss). With CPU offload FSDP's sharded state lives in host
    memory: `host` counts it and `total`, the GPU's bytes, does not.
    """
    layout = layout or Layout()
    params = param_counts(cfg)
    stages = [(True, True)] if layout.pp == 1 else [(True, False), (False, True)]
    worst: dict[str, int] = {}
    for first, last in stages:
        mem = _stage_memory(cfg, params, layout, first, last, batch, seq_len, precision, optimizer, loss_chunk)
        if not worst or mem["total"] > worst["total"]:
            worst = mem
    return worst


def _stage_memory(cfg: ModelConfig, params: Params, layout: Layout, first: bool, last: bool, batch: int,
                  seq_len: int, precision: str, optimizer: str, loss_chunk: int) -> dict[str, int]:
    layers, extra = _stage(params, layout, first, last)
    state = _state(params, layers, extra, optimizer, layout.dp_shard * layout.cp * layout.tp)
    if layout.dp_replicate > 1 and not layout.fsdp:
        state["grads"] *= 2  # DDP's buckets (gradient_as_bucket_view=False, PyTorch's default)
    held, seqs = _in_flight(layout, batch, first)
    tokens = seqs * seq_len
    mem = {**state, "copies": _copies(params, layout, layers, extra, precision),
           "activations": _activations(cfg, layout, layers, tokens, held, last, precision),
           "loss_chunk": _loss_chunk(cfg, layout, tokens, loss_chunk, precision) if last else 0.0}
    host = 0.0
    if layout.cpu_offload:
        host = sum(state.values())
        mem.update(weights=0.0, grads=0.0, optimizer=0.0)
    out = {k: int(v) for k, v in mem.items()}
    out["total"] = sum(out.values())
    out["host"] = int(host)
    return out


# --- the planner ----------------------------------------------------------------------------------

def parse_memory(text: str) -> int:
    """Bytes from `24GB`, `24GiB`, `80G`, `16` (GiB), `512MB`.

    GB, G and GiB all mean 2**30 here, because GPUs are sold that way: a "24 GB" RTX 4090 and an
    "80 GB" A100 hold 24 and 80 GiB. A bare number is GiB.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m or (m.group(3) and not m.group(2)):
        raise LmforgeError(f"--gpu-mem {text!r}: give a size such as 24GB, 24GiB, 80G or 16 (GiB)")
    scale = {"": GiB, "k": 2**10, "m": 2**20, "g": GiB, "t": 2**40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def candidate_layouts(n_gpus: int, cfg: ModelConfig, batch: int, gpus_per_node: int = 8) -> list[Layout]:
    """Every layout worth considering on n_gpus, each with and without activation checkpointing.

    DDP; FSDP; HSDP (one node's GPUs shard, nodes replicate; on one node of 8, 2 x 4); TP within a
    node (heads, KV heads and the FFN must split evenly); TP + FSDP; PP (at most one stage per layer
    and one micro-batch per stage); PP + FSDP; and FSDP with CPU offload as the last resort.
    """
    base: list[Layout] = [Layout(dp_replicate=n_gpus)]
    if n_gpus > 1:
        base.append(Layout(dp_shard=n_gpus))
    node = min(gpus_per_node, n_gpus)
    if n_gpus > gpus_per_node and n_gpus % gpus_per_node == 0:
        base.append(Layout(dp_replicate=n_gpus // gpus_per_node, dp_shard=gpus_per_node))
    elif n_gpus == gpus_per_node == 8:
        base.append(Layout(dp_replicate=2, dp_shard=4))
    from lmforge.model.transformer import ffn_dim

    splits = (cfg.n_head, cfg.n_kv_head or cfg.n_head, ffn_dim(cfg), cfg.vocab_size)
    model_parallel = not cfg.moe.experts  # MoE layers are not split by TP or PP (train/parallelize.py refuses)
    # MLA has no tensor-parallel plan (train/parallelize.py check_attention)
    for tp in (2, 4, 8) if model_parallel and cfg.attention != "mla" else ():
        if tp <= node and n_gpus % tp == 0 and all(s % tp == 0 for s in splits):
            base.append(Layout(tp=tp, dp_shard=n_gpus // tp))
    for pp in sorted({2, 4, n_gpus}) if model_parallel else ():
        if 1 < pp <= min(cfg.n_layer, batch) and n_gpus % pp == 0:
            base.append(Layout(pp=pp, dp_shard=n_gpus // pp))
    base.append(Layout(dp_shard=n_gpus, cpu_offload=True))
    return [replace(lay, activation_checkpointing=ac) for lay in base for ac in (False, True)]


PREFERENCE = ("DDP < FSDP < HSDP (HSDP before FSDP across nodes) < the same with activation checkpointing "
              "< TP (+ FSDP) < PP (+ FSDP) < CPU offload")


def rank(layout: Layout, multi_node: bool) -> tuple:
    """Sort key: layouts that communicate (and recompute) less come first, in the order of PREFERENCE.

    DDP all-reduces the gradients once per step, overlapped with
    backward. FSDP moves about 1.5x that (all-gather forward and backward, reduce-scatter), also
    overlapped. HSDP adds an all-reduce across replicas; across nodes it comes before FSDP, because
    it keeps the all-gathers on a node's fast links. Activation checkpointing costs no
    communication but a second forward (~1/3 more compute), about what FSDP's overlapped traffic
    costs, so it comes after the plain data-parallel layouts and before TP. TP all-reduces
    activations inside every block, on the critical path, so fast only within a node (smaller TP
    first). PP's bubble idles (pp - 1) / (micro-batches + pp - 1) of each step. CPU offload crosses
    PCIe with every parameter and gradient each step and runs the optimizer on the CPU: the slowest.
    """
    family = 3 if layout.cpu_offload else 2 if layout.pp > 1 else 1 if layout.tp > 1 else 0
    sub = 0 if not layout.fsdp else 1 if layout.dp_replicate == 1 else 2
    if multi_node and sub:
        sub = 3 - sub  # HSDP before FSDP across nodes
    return family, layout.activation_checkpointing, sub, layout.tp, layout.pp


@dataclass
class PlanRow:
    layout: Layout
    memory: dict[str, int]
    fits: bool


@dataclass
class Plan:
    """The rows `model info --gpus` prints, in preference order, and the layout it suggests."""

    n_gpus: int
    gpu_bytes: int
    batch: int
    rows: list[PlanRow] = field(default_factory=list)
    best: PlanRow | None = None
    best_batch: int = 0  # the micro-batch the suggestion trains at (smaller than `batch` if none fit at it)

    @property
    def usable(self) -> float:
        return HEADROOM * self.gpu_bytes


def plan(cfg: ModelConfig, n_gpus: int, gpu_bytes: int, batch: int, seq_len: int, precision: str = "bf16",
         optimizer: str = "adamw", loss_chunk: int = 0, gpus_per_node: int = 8) -> Plan:
    """Memory per GPU of every candidate layout, and the first (in `rank` order) that fits.

    When none fits at `batch`, the micro-batch is halved until one does (the global batch kept by
    gradient accumulation), so the answer is still a setting to paste, or nothing at batch 1.
    """
    out = Plan(n_gpus, gpu_bytes, batch)
    layouts = sorted(candidate_layouts(n_gpus, cfg, batch, gpus_per_node),
                     key=lambda lay: rank(lay, n_gpus > gpus_per_node))

    def rows(b: int) -> list[PlanRow]:
        mems = [training_memory(cfg, b, seq_len, precision, optimizer, lay, loss_chunk) for lay in layouts]
        return [PlanRow(lay, m, m["total"] <= out.usable) for lay, m in zip(layouts, mems)]

    out.rows = rows(batch)
    b, candidates = batch, out.rows
    while True:
        fit = next((r for r in candidates if r.fits), None)
        if fit or b == 1:
            out.best, out.best_batch = fit, b if fit else 0
            return out
        b //= 2
        candidates = [r for r in rows(b) if r.layout.pp <= b]
