"""The one-token decoding step of a dense decoder, with its weights packed for it.

Generation spends almost all its time in steps that feed one token per row, and there the model's
general forward does more than it must: three q/k/v products and two MLP input products per layer
where one each would do, a (B, 1, T, D) RoPE table gathered per row, GQA keys repeated to the query
heads, a mask built per step, norms as eight small ops, and BLAS products on a handful of rows,
which run well below the speed of oneDNN's packed weights on the same product (the 8192 x 256
output layer on 8 rows: 0.36 ms against 0.78-0.90 ms with the weights coming from memory).

`decode_step(model)` returns the step to call, `step(ids (B, 1), positions (B, 1), cache) -> (B, V)
logits`; `generate_samples` (so generate, chat, eval and GRPO rollouts) and the server's continuous
batch use it, and `prefill_prompts` uses the same step for short prompts (`packed_step`, T tokens):
- a plain dense decoder gets `DenseStep`: q/k/v and gate/up weights fused, each product in whichever
  of two CPU layouts measured faster for its shape and row count (`Linear`), the residual added inside
  the product, one RoPE pass over q and k together, the query heads of each key head laid along the
  query axis so SDPA needs no repeated keys, and no mask unless the cache holds padding. It writes the
  model's own KVCache, so a prefill by the model's forward and `KVCache.select` work unchanged, and
  its logits equal the forward's up to float rounding (tests/test_decode.py holds it to that and to
  the same tokens).
- anything else (MoE, MLA, sliding windows, T5, adapters, quantized or tensor-parallel weights,
  wrapped blocks, training mode) gets the model's own forward.

The packed weights are two more copies on a CPU (one on a GPU), so they are made only when that fits
well within the free memory, and kept until a weight changes: an optimizer steps on it (a global
optimizer hook), or its storage or version counter changes (`load_state_dict`, in-place edits). The
server packs once, GRPO once per policy update.
LMFORGE_FAST_DECODE=0 turns the step off (bench/generate.py measures both).
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lmforge.model import cpu_kernels as kernels
from lmforge.model.transformer import MLP, Attention, Block, RMSNorm, Transformer, attend, cache_mask, signed_sin

Step = Callable[[Tensor, Tensor, object], Tensor]
# prefill_prompts takes the packed step for prompts of up to this many tokens in all: past it the
# forward's products dominate its per-call overhead.
PREFILL_ROWS = 128
# The packed copy may take at most this share of the memory the OS reports free.
MEMORY_SHARE = 0.25
# model -> (the weights' identity and versions, its DenseStep); weak, so a dropped model frees its copy.
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed_step(model: nn.Module) -> DenseStep | None:
    """`model`'s DenseStep (unwrapped, in eval mode), or None where it does not apply or is turned off."""
    if os.environ.get("LMFORGE_FAST_DECODE", "1") != "0" and eligible(model):
        return _packed(model)
    return None


def decode_step(model: nn.Module) -> Step:
    """The one-token step for `model`: packed where it applies, else its forward."""
    packed = packed_step(model)
    if packed is not None:
        return packed.step

    def forward(ids: Tensor, positions: Tensor, cache) -> Tensor:
        return model(ids, positions=positions, cache=cache)[:, -1]

    return forward


def eligible(model: nn.Module) -> bool:
    """A plain dense decoder whose every weight is a whole, ordinary tensor: what DenseStep computes."""
    if type(model) is not Transformer or model.training:
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return False  # whoever hooked a module expects it to run
    cfg = model.cfg
    if cfg.attention != "mha" or cfg.moe.experts or cfg.sliding_window or cfg.sparse_block or cfg.norm != "rmsnorm":
        return False
    if cfg.pos != "rope" or model.rope_dim != model.head_dim:
        return False
    n_kv = cfg.n_kv_head or cfg.n_head
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if type(block) is not Block or type(attn) is not Attention or type(mlp) is not MLP:
            return False  # wrapped (activation checkpointing, compile) or another family
        if type(block.input_layernorm) is not RMSNorm or type(block.post_attention_layernorm) is not RMSNorm:
            return False
        linears = [*attn.qkv, attn.o_proj, mlp.up_proj, mlp.down_proj]
        linears += [mlp.gate_proj] if mlp.kind == "swiglu" else []
        if not all(type(m) is nn.Linear and type(m.weight) is nn.Parameter for m in linears):
            return False  # LoRA, quantized or sharded weights
        if attn.q_proj.weight.shape[0] != cfg.n_head * model.head_dim or \
                attn.k_proj.weight.shape[0] != n_kv * model.head_dim:
            return False  # a rank's share of the heads
    return type(model.lm_head) is nn.Linear and type(model.lm_head.weight) is nn.Parameter


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: do not risk a second copy


def _drop_stepped(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimizer step: drop the packs of the models whose weights it updated.

    The version counter alone does not see every update: fused AdamW's in-place kernel leaves it as
    it was, and GRPO then sampled its rollouts from the policy before the update.
    """
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in [m for m in _PACKS if any(id(p) in stepped for p in m.parameters())]:
        _PACKS.pop(model, None)


_hook = None


def _packed(model: nn.Module) -> DenseStep | None:
    """The model's DenseStep, reused while its weights are unchanged; None when the copy does not fit."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_drop_stepped)
    params = list(model.parameters()) + [model.rope_cos, model.rope_sin]
    # An inference tensor (a model built under inference_mode) has no version counter; it cannot be
    # trained, so only its storage identifies it.
    key = tuple((p.data_ptr(), -1 if p.is_inference() else p._version, p.dtype, p.device) for p in params)
    held = _PACKS.get(model)
    if held is not None and held[0] == key:
        return held[1]
    _PACKS.pop(model, None)  # free the old copy before making a new one
    embed = model.model.embed_tokens.weight
    copied = [p for p in model.parameters() if p.dim() == 2 and p is not embed]
    if model.lm_head.weight is embed:  # tied: the head is copied too
        copied.append(embed)
    size = 2 * sum(p.numel() * p.element_size() for p in copied)  # a CPU keeps two layouts (Linear)
    packed = DenseStep(model) if size <= MEMORY_SHARE * _free_bytes(embed.device) else None
    # Kept either way: a model that did not fit is not measured again every step, until a weight changes.
    _PACKS[model] = (key, packed)
    return packed


# Row counts the two CPU layouts are timed at; a step uses the choice made at the nearest (in log scale).
ROW_CLASSES = (1, 2, 4, 8, 16, 32, 64)
TRIALS, MAX_TRIALS, CALIBRATE_S = 3, 50, 0.03


def row_class(rows: int) -> int:
    return min(range(len(ROW_CLASSES)), key=lambda i: abs(math.log2(rows / ROW_CLASSES[i])))


def _dnn_pack(w: Tensor) -> Tensor | None:
    """w in oneDNN's blocked layout for small-row products, or None where this build has none that works."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        probe = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.dtype)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    return packed if torch.allclose(got, F.linear(probe, w), rtol=tol, atol=tol * w.shape[1] ** 0.5) else None


class Linear:
    """x W^T + b (+ a residual added in the same call), from weights packed for a few rows at a time.

    On a CPU two layouts are kept: W^T contiguous for BLAS (`addmm`), and oneDNN's blocked layout
    (`mkldnn._linear_pointwise`), which runs products of 2-16 rows 1.5-3x faster than BLAS in this build
    but costs about 15 us a call, which loses on one row and small matrices. Which is faster depends
    on the machine, the shape and the row count, so both are timed (`calibrate`) before the first
    product of each shape and row class, and every such product then uses the faster one.
    The two differ only in float rounding (their sums run in different orders).
    """

    def __init__(self, w: Tensor, b: Tensor | None, cpu: bool):
        self.b, self.cpu = b, cpu
        self.w = w.t().contiguous() if cpu else w.contiguous()
        self.dnn = _dnn_pack(w) if cpu else None
        self.use: dict[int, bool] = {}  # row class -> oneDNN, read from _LAYOUT at its first use

    def run(self, x: Tensor, residual: Tensor | None, dnn: bool) -> Tensor:
        if dnn:
            if residual is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.dnn, self.b, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.dnn, self.b, "add")
        if not self.cpu:
            y = F.linear(x, self.w, self.b)
            return y if residual is None else residual + y
        y = torch.mm(x, self.w) if residual is None else torch.addmm(residual, x, self.w)
        return y if self.b is None else y + self.b

    def key(self, cls: int) -> tuple[int, int, int, torch.dtype]:
        return (self.w.shape[0], self.w.shape[1], cls, self.w.dtype)

    def __call__(self, x: Tensor, residual: Tensor | None = None, cls: int = 0) -> Tensor:
        dnn = self.use.get(cls)
        if dnn is None:  # once per row class: a step makes 17 or more of these calls
            dnn = self.use[cls] = self.dnn is not None and _LAYOUT[self.key(cls)]
        return self.run(x, residual, dnn)


# (in, out, row class, dtype) -> oneDNN was the faster layout; decided once per process, before the
# first product of that kind, so a repacked model (GRPO's next policy) reuses it and every result of
# one kind comes from one layout.
_LAYOUT: dict[tuple[int, int, int, torch.dtype], bool] = {}


def calibrate(linears: list[Linear], cls: int) -> None:
    """Set each Linear's layout for row class `cls`: time both on inputs of that many rows, the products
    run in the model's order after an untimed pass of the same layout, so each weight is where a real
    step finds it, in cache only if the whole model's weights fit there (timed alone, a weight just
    used sits in cache and favours BLAS wrongly). The best of several rounds, layouts interleaved."""
    timed = [lin for lin in linears if lin.dnn is not None and lin.key(cls) not in _LAYOUT]
    # Inputs from a generator of their own: packing or timing must not move the global RNG a training run
    # draws from (a mid-run sample would otherwise change the run).
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(ROW_CLASSES[cls], lin.w.shape[0], generator=gen).to(lin.w.dtype) for lin in timed]
    best = [[math.inf, math.inf] for _ in timed]
    start, trial = time.perf_counter(), 0
    # At least TRIALS rounds, and more while they are cheap: one row's products take microseconds,
    # and their best of three still moved with the machine's noise.
    while trial < TRIALS or (trial < MAX_TRIALS and time.perf_counter() - start < CALIBRATE_S):
        trial += 1
        for dnn in ((False, True) if trial % 2 == 0 else (True, False)):
            for lin, x in zip(timed, inputs):  # a step of this layout first: the cache as its next step finds it
                lin.run(x, None, dnn)
            for lin, x, b in zip(timed, inputs, best):
                t = time.perf_counter()
                lin.run(x, None, dnn)
                b[dnn] = min(b[dnn], time.perf_counter() - t)
    total: dict[tuple, list[float]] = {}  # a shape met in every layer is decided by the sum over layers
    for lin, b in zip(timed, best):
        t = total.setdefault(lin.key(cls), [0.0, 0.0])
        t[0], t[1] = t[0] + b[0], t[1] + b[1]
    for key, (blas, dnn) in total.items():
        _LAYOUT[key] = dnn < blas


class DenseStep:
    """One decoding step of a dense Transformer from packed weights (see the module docstring)."""

    def __init__(self, model: nn.Module):
        cfg = model.cfg
        # Tensors only, never the model: _PACKS holds this weakly keyed by the model, and a reference
        # back to it would keep every model ever packed alive.
        self.cfg, self.embed = cfg, model.model.embed_tokens.weight
        self.cpu = model.lm_head.weight.device.type == "cpu"
        self.n_head, self.n_kv = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.d = model.head_dim
        self.eps = cfg.norm_eps
        self.layers = []
        with torch.no_grad():
            for block in model.model.layers:
                attn, mlp = block.self_attn, block.mlp
                qkv_b = None if attn.q_proj.bias is None else torch.cat([m.bias for m in attn.qkv])
                ins = [mlp.gate_proj, mlp.up_proj] if mlp.kind == "swiglu" else [mlp.up_proj]
                in_b = None if ins[0].bias is None else torch.cat([m.bias for m in ins])
                self.layers.append(dict(
                    norm1=block.input_layernorm.weight, norm2=block.post_attention_layernorm.weight,
                    qkv=self._pack(torch.cat([m.weight for m in attn.qkv]), qkv_b),
                    q_norm=attn.q_norm.weight if attn.qk_norm else None,
                    k_norm=attn.k_norm.weight if attn.qk_norm else None,
                    o=self._pack(attn.o_proj.weight, attn.o_proj.bias),
                    mlp_in=self._pack(torch.cat([m.weight for m in ins]), in_b),
                    down=self._pack(mlp.down_proj.weight, mlp.down_proj.bias), kind=mlp.kind))
            self.norm = model.model.norm.weight
            self.head = self._pack(model.lm_head.weight, None)
            dtype = model.model.embed_tokens.weight.dtype  # the tables in the activations' dtype, cast once
            self.cos, self.sin = model.rope_cos.to(dtype), signed_sin(model.rope_sin).to(dtype)
        self.linears = [p[k] for p in self.layers for k in ("qkv", "o", "mlp_in", "down")] + [self.head]
        # fp32 on a CPU with the kernels built: the few-row kernels apply to every step, checked here once.
        w = model.lm_head.weight
        self.fast = self.cpu and w.dtype == torch.float32 and kernels.usable_small(w)
        self.calibrated: set[int] = set()  # row classes whose layouts are chosen
        self.classes: dict[int, int] = {}  # rows -> row class

    def _pack(self, w: Tensor, b: Tensor | None) -> Linear:
        return Linear(w, b, cpu=self.cpu)

    def _norm(self, x: Tensor, w: Tensor, rows: bool = False) -> Tensor:
        """RMSNorm as model.transformer.RMSNorm computes it (fp32 statistics under bf16). rows=True: x is
        the contiguous (B, C) residual stream, which the kernel takes unchecked when `fast`."""
        if self.fast and rows:
            return kernels.rows_rms_norm(x, w, self.eps, checked=False)
        if x.dtype == w.dtype == torch.float32:
            y = kernels.rows_rms_norm(x, w, self.eps)
            return F.rms_norm(x, (x.shape[-1],), w, self.eps) if y is None else y
        return w * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate-half RoPE on (B, heads, D), row b at its own position (cos / sin: (B, D), sin signed)."""
        y = kernels.rows_rope(x, cos, sin, checked=not self.fast)
        return kernels.rope_reference(x, cos[:, None], sin[:, None]) if y is None else y

    def step(self, ids: Tensor, positions: Tensor, cache, scores: list | None = None) -> Tensor:
        """Logits (B, V) at the last of T new tokens per row: ids and positions (B, T); writes the cache.

        T = 1 is a decoding step. T > 1 is a short prompt's prefill (prefill_prompts, up to
        PREFILL_ROWS tokens in all), where the model's forward spends more in its 960 small calls than
        in its products; only the last position goes through the output layer, unless `scores` (a
        list) is given: the other positions' logits (B, T - 1, V) are appended to it, computed apart
        from the last position's so that scoring a prompt does not change what follows it.
        """
        (B, T), H, Hk, D = ids.shape, self.n_head, self.n_kv, self.d
        n, t = B * T, cache.length
        if t + T > cache.max_len:
            raise ValueError(f"KV cache full: {t + T} positions > max_len {cache.max_len}")
        cls = self._row_class(n)
        pos = positions.reshape(n)
        x = F.embedding(ids.reshape(n), self.embed)
        cos, sin = self.cos[pos], self.sin[pos]  # (n, D): one row per token
        if T == 1:  # one token sees every cached position: only padding needs masking
            mask = cache.key_mask[:, None, None, :t + 1] if cache.has_padding else None
        else:
            mask = cache_mask(T, t, cache, ids.device)
        for i, p in enumerate(self.layers):
            h = self._norm(x, p["norm1"], rows=True)
            qkv = p["qkv"](h, cls=cls)
            qk = qkv[:, :(H + Hk) * D].view(n, H + Hk, D)
            if p["q_norm"] is not None:
                qk = torch.cat((self._norm(qk[:, :H], p["q_norm"]), self._norm(qk[:, H:], p["k_norm"])), dim=1)
            qk = self._rope(qk, cos, sin)
            v = qkv[:, (H + Hk) * D:].view(n, Hk, D)
            if cache.k[i] is None:  # a cache no prefill has written yet
                shape = (B, Hk, cache.max_len, D)
                cache.k[i], cache.v[i] = x.new_zeros(shape, dtype=cache.dtype), x.new_zeros(shape, dtype=cache.dtype)
            if T == 1:
                cache.k[i][:, :, t] = qk[:, H:]
                cache.v[i][:, :, t] = v
                # The H // Hk query heads of each key head as its query axis: one token attends to every
                # cached position, so no causal mask is needed and the keys need not be repeated.
                q = qk[:, :H].reshape(B, Hk, H // Hk, D)
                y = F.scaled_dot_product_attention(q, cache.k[i][:, :, :t + 1], cache.v[i][:, :, :t + 1],
                                                   attn_mask=mask)
            else:
                qk = qk.view(B, T, H + Hk, D)
                cache.k[i][:, :, t:t + T] = qk[:, :, H:].transpose(1, 2)
                cache.v[i][:, :, t:t + T] = v.view(B, T, Hk, D).transpose(1, 2)
                y = attend(qk[:, :, :H].transpose(1, 2), cache.k[i][:, :, :t + T], cache.v[i][:, :, :t + T],
                           mask).transpose(1, 2)
            x = p["o"](y.reshape(n, H * D), residual=x, cls=cls)
            h = self._norm(x, p["norm2"], rows=True)
            a = p["mlp_in"](h, cls=cls)
            if p["kind"] == "swiglu":
                h = kernels.rows_swiglu(a, checked=False) if self.fast else None
                if h is None:
                    gate, up = a.chunk(2, dim=-1)
                    h = F.silu(gate) * up
                a = h
            elif p["kind"] == "relu2":
                a = F.relu(a).square()
            else:
                a = F.gelu(a, approximate="tanh")
            x = p["down"](a, residual=x, cls=cls)
        cache.length = t + T
        if T > 1:
            x = x.view(B, T, -1)
            if scores is not None:
                rest = x[:, :-1].reshape(B * (T - 1), -1)
                scores.append(self._logits(rest, self._row_class(rest.shape[0])).view(B, T - 1, -1))
            x = x[:, -1].contiguous()
        return self._logits(x, cls)

    def _row_class(self, rows: int) -> int:
        """The row class of a product of `rows` rows, its layouts chosen (calibrate) before its first use."""
        cls = self.classes.get(rows)
        if cls is None:
            cls = self.classes[rows] = row_class(rows)
        if cls not in self.calibrated:
            calibrate(self.linears, cls)
            self.calibrated.add(cls)
        return cls

    def _logits(self, x: Tensor, cls: int) -> Tensor:
        logits = self.head(self._norm(x, self.norm, rows=True), cls=cls)
        if self.cfg.logit_softcap > 0:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits

