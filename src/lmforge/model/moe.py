"""Mixture-of-experts MLP (Qwen3-MoE layout, DeepSeek-V3 options), used for layers >= moe.first_dense_layers.

Names equal transformers' Qwen3MoeSparseMoeBlock: `mlp.gate.weight` (experts, C) is the router and
`mlp.experts.gate_up_proj` (experts, 2 * expert_dim, C) / `mlp.experts.down_proj` (experts, C, expert_dim)
hold every expert's SwiGLU weights as 3-D tensors, gate rows before up rows. So a Qwen3-MoE export is a
config.json. Shared experts (DeepSeek) are one SwiGLU MLP `mlp.shared_experts` every token passes through.

Routing is dropless: each token's top-k (expert, weight) pairs are sorted by expert and every expert runs
one matmul over its tokens, by `torch._grouped_mm` where it works for the device and dtype, else a loop
over the experts (the same arithmetic; tests hold them equal).

Balancing. aux_loss: the Switch / Qwen loss E * sum_i f_i P_i per layer (f_i: fraction of the token-slots
sent to expert i, summing to top_k; P_i: its mean router probability), averaged over the MoE layers.
aux_free: a per-expert bias (`mlp.gate.e_score_correction_bias`, a saved buffer, so resume is exact) is
added to the scores for choosing experts only, and after each optimizer step moves by bias_update_rate
towards the under-loaded experts (sign of mean load - load, as DeepSeek-V3). z_loss: mean logsumexp of
the router logits, squared.

How the router losses reach the optimizer: forward(labels) returns a loss *sum* over tokens that the loop
divides by the global batch's token count. The router losses are per-token means of their micro-batch, so
the model adds them multiplied by the micro-batch's counted tokens (`router_loss_sum`): after the loop's
division the step's loss is CE mean + coef * (token-weighted mean of the micro-batches' router losses),
whatever the accumulation and data-parallel sizes, not coef times the token count. The balancing loss
is a product of two means (f_i P_i), so it is measured per micro-batch (per rank's part of it under
context parallel), as transformers measures it per forward; the z-loss is a plain mean and sums exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lmforge.config import ModelConfig

_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def expert_dim(cfg: ModelConfig, dense: int) -> int:
    """Each expert's hidden width: moe.expert_dim, or the dense width `dense` / top_k rounded up to a multiple
    of 32 (so the active parameters stay near the dense model's)."""
    if cfg.moe.expert_dim:
        return cfg.moe.expert_dim
    return max(32, -(-dense // cfg.moe.top_k // 32) * 32)


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    return cfg.moe.experts > 0 and layer >= cfg.moe.first_dense_layers


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs (and is right) here: probed once per device type and dtype."""
    key = (device.type, dtype)
    if key not in _GROUPED_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                x = torch.randn(24, 16, device=device).to(dtype)
                w = torch.randn(3, 32, 16, device=device).to(dtype)  # stored as the experts are: (E, out, in)
                offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
                y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
                ref = torch.cat([x[:8] @ w[0].T, x[8:] @ w[2].T])
                ok = bool(torch.allclose(y.float(), ref.float(), atol=1e-2, rtol=1e-2))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


def _local(p: Tensor) -> Tensor:
    """This rank's experts under expert parallel (train/expert.py holds them as a DTensor cut by expert and
    sends each rank the tokens of its own); the whole parameter otherwise."""
    return p.to_local() if isinstance(p, DTensor) else p


class Experts(nn.Module):
    """Every expert's SwiGLU weights as 3-D tensors (transformers' Qwen3MoeExperts layout)."""

    def __init__(self, n: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n, dim, hidden))
        self.grouped: bool | None = None  # None: grouped matmul where it works; False: the loop (tests)

    def forward(self, xs: Tensor, counts: Tensor) -> Tensor:
        """xs: (tokens sorted by expert, C); counts: (E,) tokens per expert. Returns (tokens, C)."""
        gu, down = _local(self.gate_up_proj), _local(self.down_proj)
        if torch.is_autocast_enabled(xs.device.type):  # grouped_mm is not on autocast's lists
            dt = torch.get_autocast_dtype(xs.device.type)
            xs, gu, down = xs.to(dt), gu.to(dt), down.to(dt)
        if self.grouped is not False and grouped_mm_works(xs.device, xs.dtype):
            offs = counts.cumsum(0).to(torch.int32)
            g, u = torch._grouped_mm(xs, gu.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)
        outs = []
        for e, part in enumerate(xs.split(counts.tolist())):
            if part.shape[0]:
                g, u = F.linear(part, gu[e]).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(g) * u, down[e]))
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[1])


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.moe.experts, cfg.n_embd))
        if cfg.moe.balance == "aux_free":  # saved with the weights: routing depends on it
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.moe.experts, dtype=torch.float32))


class SharedExperts(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """The sparse MLP of one block. While training it keeps the router loss of its last forward
    (`router_loss`, a per-token mean) and adds its tokens per expert to `load` (read by update_after_step)."""

    def __init__(self, cfg: ModelConfig, layer: int, hidden: int):
        super().__init__()
        m = cfg.moe
        self.n, self.k, self.cfg, self.layer = m.experts, m.top_k, m, layer
        self.gate = Router(cfg)
        self.experts = Experts(m.experts, cfg.n_embd, hidden)
        if m.shared_experts:
            self.shared_experts = SharedExperts(cfg.n_embd, m.shared_experts * hidden)
        # Tokens per expert since the last optimizer step: a plain tensor made at first use, not a buffer,
        # so that building on the meta device and loading a checkpoint never leave it uninitialised.
        self.load: Tensor | None = None
        self.router_loss: Tensor | None = None

    def route(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(router logits (N, E), chosen experts (N, k), their weights (N, k) in fp32), as transformers."""
        logits = F.linear(h, self.gate.weight)
        scores = logits.float().softmax(-1) if self.cfg.router == "softmax" else logits.float().sigmoid()
        bias = getattr(self.gate, "e_score_correction_bias", None)
        choose = scores if bias is None else scores + bias  # the bias picks experts, never weighs them
        idx = choose.topk(self.k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.cfg.norm_topk_prob or self.cfg.router == "sigmoid":
            w = w / w.sum(-1, keepdim=True)
        return logits, idx, w

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        h = x.reshape(-1, C)
        logits, idx, w = self.route(h)
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n)
        ys = self.experts(h[order // self.k], counts)
        # Back to (token, slot) order and a weighted sum over the k slots: deterministic, unlike index_add_.
        out = torch.empty_like(ys).index_put_((order,), ys).view(-1, self.k, C)
        out = (out.float() * w.unsqueeze(-1)).sum(1).to(x.dtype)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(h)
        if self.training:
            if self.load is None or self.load.device != counts.device:
                self.load = torch.zeros(self.n, dtype=torch.float32, device=counts.device)
            self.load += counts.detach().float()
            self.router_loss = self._router_loss(logits, counts)
        return out.view(B, T, C)

    def _router_loss(self, logits: Tensor, counts: Tensor) -> Tensor | None:
        m, loss = self.cfg, None
        if m.balance == "aux_loss" and m.aux_coef > 0:
            scores = logits.float().softmax(-1) if m.router == "softmax" else logits.float().sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
            f = counts.float() / logits.shape[0]  # sums to top_k, as transformers' load_balancing_loss_func
            loss = m.aux_coef * self.n * (f * probs.mean(0)).sum()
        if m.z_loss > 0:
            z = m.z_loss * torch.logsumexp(logits.float(), dim=-1).square().mean()
            loss = z if loss is None else loss + z
        return loss


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def router_loss_sum(model: nn.Module, labels: Tensor) -> Tensor | None:
    """The router losses of the last forward, as a sum over its counted tokens (see the module's docstring)."""
    losses = [m.router_loss for m in moe_layers(model) if m.router_loss is not None]
    for m in moe_layers(model):
        m.router_loss = None
    if not losses:
        return None
    return torch.stack(losses).mean() * (labels != -100).sum()


@torch.no_grad()
def update_after_step(model: nn.Module) -> Tensor | None:
    """After an optimizer step: sum the load over ranks, move aux_free biases, reset the counters.

    Returns the step's (layers, E) tokens per expert, for the metrics. Activation checkpointing
    counts each token twice (forward again in backward): the sign update and the imbalance are ratios,
    so they do not change.
    """
    layers = moe_layers(model)
    if not layers or layers[0].load is None:
        return None
    load = torch.stack([m.load for m in layers])
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(load)  # every rank moves its biases alike
    for m, row in zip(layers, load):
        bias = getattr(m.gate, "e_score_correction_bias", None)
        if bias is not None and m.cfg.bias_update_rate > 0:
            bias += m.cfg.bias_update_rate * torch.sign(row.mean() - row)
        m.load.zero_()
    return load


def load_metrics(layers: list[int], load: Tensor) -> dict:
    """The metrics row's expert load: max/mean tokens per expert of each MoE layer (`layers`: their block
    indices) and of the worst one, and the tokens per expert themselves (metrics.jsonl only: a list is no
    scalar for TensorBoard)."""
    imb = load.max(1).values / load.mean(1).clamp_min(1e-9)
    out = {f"moe_imbalance_{i}": float(v) for i, v in zip(layers, imb.tolist())}
    out["moe_imbalance_max"] = float(imb.max())
    out["moe_tokens_per_expert"] = [[round(v) for v in row] for row in load.tolist()]
    return out


def inactive_params(model: nn.Module) -> int:
    """Expert weights a token does not pass through (all but top_k of each layer's experts): total minus
    active parameters, which is what FLOPs and MFU count."""
    n = 0
    for m in moe_layers(model):
        per_expert = (m.experts.gate_up_proj.numel() + m.experts.down_proj.numel()) // m.n
        n += (m.n - m.k) * per_expert
    return n


def hf_problems(cfg: ModelConfig) -> list[str]:
    """What transformers' Qwen3MoeForCausalLM cannot represent of an MoE config, each naming the key."""
    m, out = cfg.moe, []
    if not cfg.qk_norm:
        out.append("model.qk_norm=false with model.moe.experts: Qwen3-MoE always norms queries and keys "
                   "(set model.qk_norm=true)")
    if m.router != "softmax":
        out.append(f"model.moe.router={m.router}: Qwen3-MoE routes by softmax only")
    if m.shared_experts:
        out.append(f"model.moe.shared_experts={m.shared_experts}: Qwen3-MoE has no shared experts (and Qwen2-MoE's "
                   "shared expert has a sigmoid gate these do not)")
    if m.balance == "aux_free":
        out.append("model.moe.balance=aux_free: the per-expert routing bias has no place in Qwen3-MoE")
    if cfg.sliding_window:
        out.append(f"model.sliding_window={cfg.sliding_window} with model.moe.experts: the Qwen3-MoE export writes "
                   "full attention only")
    if cfg.sparse_block:
        out.append(f"model.sparse_block={cfg.sparse_block}: Qwen3-MoE has no block-sparse attention")
    return out


def hf_fields(cfg: ModelConfig, dense: int) -> dict:
    """The Qwen3MoeConfig keys of an MoE model (`dense`: the dense layers' ffn width)."""
    m = cfg.moe
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "intermediate_size": dense,
            "moe_intermediate_size": expert_dim(cfg, dense), "num_experts": m.experts, "num_local_experts": m.experts,
            "num_experts_per_tok": m.top_k,
            "norm_topk_prob": m.norm_topk_prob, "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(m.first_dense_layers)), "router_aux_loss_coef": m.aux_coef,
            "output_router_logits": False, "use_sliding_window": False, "sliding_window": None}
