"""Training speed of lmforge against a `transformers` model of identical shape; prints ONE JSON object.

    python bench/train.py [--config tiny|nanogpt] [--arch llama|gpt2] [--batch 16] [--repeats 7]
                          [--precision fp32|bf16 [--with-fp32]] [--threads N] [--no-memory] [--profile]
                          [key=value ...]

lmforge side: the step `train/loop.py` runs per optimizer step with one micro-batch, through the
same functions: `set_lr(lr_factor(...))`, `LMObjective.loss` (the model's hidden states, then the
fused chunked head + cross-entropy), GradScaler, `clip_grad_norm_`, the optimizer from
`build_optimizer` (foreach/fused AdamW, or Muon), `zero_grad`. key=value overrides go to lmforge's
config (e.g. train.optimizer=muon, train.compile=true, model.qk_norm=true).

Peer: LlamaForCausalLM (GPT2LMHeadModel for --arch gpt2) built from the same config with the same
weights, trained by the plain PyTorch loop nanoGPT and most scripts use: logits = model(x).logits,
F.cross_entropy, backward, clip_grad_norm_, torch.optim.AdamW (fused on CUDA as nanoGPT does,
PyTorch's default elsewhere), same batch, tokens, learning rate and precision.

Steps are interleaved in pairs whose order alternates (ABBA), so load from other processes on a
shared machine hits both alike; the ratio is the median of per-pair ratios. MFU is the model's
training FLOPs (6 per weight + attention, as `lmforge pretrain` logs it) per second over the
matmul rate measured in the same run between pairs, in the training precision: at bench/matmul.py's
reference size on a CPU (so bf16 MFU is against the CPU's bf16 rate), at 8192^2 on a GPU.
`--precision bf16 --with-fp32` adds lmforge in fp32 as a third side (MFU against the fp32 rate).

Memory: the peak one training step allocates above what it starts with (CUDA: the allocator's
peak; CPU: the profiler's allocation events replayed in order), and the bytes of activations saved
for backward (saved_tensors_hooks; exact, load-independent). lmforge is also measured with the
unfused loss and with activation checkpointing, to show what each saves.

Configs: tiny = the `tiny` preset at quickstart's shapes (4 x 256, vocab 4096, 16 x 256 tokens);
nanogpt = nanoGPT's 6 x 384, context 256, vocab 50304 (4 x 256 tokens per step on a CPU);
small = the `small` preset (124M, 12 x 768, vocab 50304, 8 x 1024 tokens), for a GPU
(`bench/gpu.sh` runs it in bf16). On CUDA the MFU ceiling is a bf16 (training precision) product of
8192^2, the size at which a GPU reaches its peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types

import torch
import torch.nn.functional as F
from common import hf_twin, log, machine, matmul_rate, spread, sync

CONFIGS = {
    "tiny": dict(preset="tiny", vocab=4096, seq_len=256, batch=16),
    "nanogpt": dict(preset="", n_layer=6, n_embd=384, n_head=6, vocab=50304, seq_len=256, batch=4),
    "small": dict(preset="small", vocab=50304, seq_len=1024, batch=8),  # GPT-2 small's shape, for GPUs
}
REFERENCE_N = 1024  # square matmul size of the MFU ceiling on a CPU (bench/matmul.py --reference)
CUDA_REFERENCE_N = 8192  # a GPU reaches its peak only on large products (H200 bf16: ~790 TFLOP/s at 8192)


def ceiling_shape(device: torch.device, amp: torch.dtype | None) -> tuple[int, torch.dtype]:
    """(size, dtype) of the matmuls MFU is measured against: in the training precision, since bf16
    tensor cores (GPU) or AVX512-BF16 / AMX units (CPU) are the ceiling a bf16 run can reach."""
    if device.type == "cuda":
        return CUDA_REFERENCE_N, amp or torch.float32
    return REFERENCE_N, amp or torch.float32


def lmforge_config(args):
    from lmforge.config import load_config

    c = CONFIGS[args.config]
    over = [f"model.vocab_size={args.vocab or c['vocab']}", f"train.seq_len={args.seq_len or c['seq_len']}",
            f"train.micro_batch={args.batch or c['batch']}", "train.warmup_steps=10", "train.max_steps=1000"]
    if c["preset"]:
        over.append(f"model.preset={c['preset']}")
    if args.arch == "gpt2":
        over += ["model.arch=gpt2"]
    for k in ("n_layer", "n_embd", "n_head"):
        if k in c:
            over.append(f"model.{k}={c[k]}")
    if args.arch == "gpt2" and not c["preset"]:
        over.append(f"model.n_kv_head={c['n_head']}")
    over.append(f"model.max_seq_len={max(args.seq_len or c['seq_len'], 256)}")
    return load_config(overrides=over + args.overrides)


class Side:
    """One implementation: a model, its optimizer and its `step(x, y)`."""

    def __init__(self, name: str, cfg, device: torch.device, amp: torch.dtype | None, variant: str = ""):
        from lmforge.model.transformer import Transformer

        self.name, self.cfg, self.device, self.amp, self.variant = name, cfg, device, amp, variant
        torch.manual_seed(cfg.seed)
        model = Transformer(cfg.model).train()
        if name == "lmforge":
            self._setup_lmforge(model)
        else:
            self._setup_peer(model)

    def _setup_lmforge(self, model) -> None:
        from lmforge.train.objectives import LMObjective
        from lmforge.train.optim import build_optimizer
        from lmforge.train.parallelize import apply_activation_checkpointing, apply_compile

        tc = self.cfg.train
        self.model = model.to(self.device)
        if tc.activation_checkpointing or self.variant == "activation_checkpointing":
            apply_activation_checkpointing(list(self.model.model.layers))
        if tc.compile:
            apply_compile(list(self.model.model.layers))  # per block, as the trainer does
        self.train_model = self.model
        self.opt = build_optimizer(self.model, tc)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        # LMObjective.loss reads only loss_chunk from the objective; the data side is not timed here.
        self.objective = types.SimpleNamespace(loss_chunk=tc.loss_chunk)
        self.loss_fn = LMObjective.loss
        if self.variant == "unfused_loss":  # the plain head + F.cross_entropy path, for the memory figure
            from lmforge.model.loss import _ce_sum

            self.loss_fn = lambda obj, m, b: (_ce_sum(self.model, m(b[0], return_hidden=True), b[1]), {})
        self.step_no = 0

    def _setup_peer(self, model) -> None:
        self.model = hf_twin(model).to(self.device).train()
        tc = self.cfg.train
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                                     fused=True if self.device.type == "cuda" else None)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step; the loss, detached (reading it is left to the caller: a GPU sync)."""
        if self.name == "lmforge":
            return self._lmforge_step(x, y)
        return self._peer_step(x, y)

    def _lmforge_step(self, x, y) -> torch.Tensor:
        from lmforge.train.optim import lr_factor, set_lr

        tc = self.cfg.train
        set_lr(self.opt, lr_factor(self.step_no, tc.max_steps, tc))
        n_units = torch.tensor(float(y.numel()), device=self.device)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss_sum, _ = self.loss_fn(self.objective, self.train_model, (x, y))
            loss = loss_sum * (1 / n_units)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        return loss.detach()

    def _peer_step(self, x, y) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.model(input_ids=x).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def saved_bytes(self, x, y) -> int:
        """Bytes of activations autograd keeps for backward in one forward + loss (parameters excluded)."""
        from lmforge.train.memory import saved_tensor_bytes

        def forward():
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                if self.name == "lmforge":
                    return self.loss_fn(self.objective, self.train_model, (x, y))[0]
                logits = self.model(input_ids=x).logits
                return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

        return saved_tensor_bytes(self.model, forward)[1]


def batch(cfg, device: torch.device, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    w = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len + 1), generator=g)
    return w[:, :-1].to(device), w[:, 1:].to(device)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def step_peak_mb(side: Side, x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak memory allocated during one training step above what the step started with (MiB).

    What was there before (weights, optimizer state) is left out; what the step adds (activations,
    gradients, the loss's temporaries) is counted. CUDA: the allocator's peak. CPU: the profiler's
    allocation events replayed in order, the same quantity without a caching allocator to ask.
    """
    side.step(x, y)  # optimizer state exists from here on
    if side.device.type == "cuda":
        torch.cuda.synchronize(side.device)
        before = torch.cuda.memory_allocated(side.device)
        torch.cuda.reset_peak_memory_stats(side.device)
        side.step(x, y)
        torch.cuda.synchronize(side.device)
        return (torch.cuda.max_memory_allocated(side.device) - before) / 2**20
    from lmforge.model.loss import free_cpu_logits_buffer
    from lmforge.train.memory import peak_allocated_bytes

    free_cpu_logits_buffer()  # lmforge keeps its loss's logits buffer between steps: count it in the step
    return peak_allocated_bytes(lambda: side.step(x, y)) / 2**20


def step_breakdown(sides: dict[str, Side], x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> dict:
    """Milliseconds per step in matrix products, in attention kernels and in everything else (profiler).

    Both sides run the same GEMMs and the same SDPA kernels; only the rest is theirs to shrink, so
    this bounds the speed-up any implementation can reach on the machine. Steps are profiled one at
    a time, alternating sides, so a change in the machine's speed hits both alike.
    """
    from torch.profiler import ProfilerActivity, profile

    totals = {name: {"step": 0.0, "matmul": 0.0, "attention": 0.0} for name in sides}
    for _ in range(steps):
        for name, side in sides.items():
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                side.step(x, y)
                sync(side.device)
            kind = "device" if side.device.type == "cuda" else "cpu"
            for e in prof.key_averages():
                t = getattr(e, f"self_{kind}_time_total") / 1e3 / steps  # microseconds -> ms per step
                totals[name]["step"] += t
                if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"):
                    totals[name]["matmul"] += t
                elif "scaled_dot_product" in e.key:
                    totals[name]["attention"] += t
    return {name: {"step_ms": round(t["step"], 1), "matmul_ms": round(t["matmul"], 1),
                   "attention_ms": round(t["attention"], 1),
                   "rest_ms": round(t["step"] - t["matmul"] - t["attention"], 1)} for name, t in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=list(CONFIGS))
    ap.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    ap.add_argument("--vocab", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=0)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory figures")
    ap.add_argument("--with-fp32", action="store_true",
                    help="with --precision bf16: also time lmforge in fp32 in the same run (speedup_vs_lmforge_fp32)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile 3 steps per side: time in matmuls, attention and the rest")
    ap.add_argument("overrides", nargs="*", help="lmforge config key=value")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    amp = amp_dtype(args.precision, device)
    cfg = lmforge_config(args)
    info = machine(device)
    sides = {"lmforge": Side("lmforge", cfg, device, amp), "transformers": Side("transformers", cfg, device, amp)}
    if args.with_fp32 and amp is not None:  # lmforge in fp32 too, interleaved in the same run
        sides["lmforge_fp32"] = Side("lmforge", cfg, device, None)
    amps = {name: (None if name == "lmforge_fp32" else amp) for name in sides}
    tokens = cfg.train.micro_batch * cfg.train.seq_len
    flops_tok = sides["lmforge"].model.flops_per_token(cfg.train.seq_len)
    log(f"{args.config} ({cfg.model.arch}): {sides['lmforge'].model.num_params() / 1e6:.2f}M params, "
        f"{tokens} tokens/step, {flops_tok * tokens / 1e9:.1f} GFLOP/step, {args.precision}, {device}")

    t0 = time.perf_counter()
    for i in range(args.warmup):
        for side in sides.values():
            side.step(*batch(cfg, device, i))
    sync(device)
    warmup_s = time.perf_counter() - t0
    times = {name: [] for name in sides}
    ceiling: dict[torch.dtype | None, list[float]] = {a: [] for a in set(amps.values())}
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        x, y = batch(cfg, device, 100 + r)
        for name in order:
            sync(device)
            t = time.perf_counter()
            sides[name].step(x, y)
            sync(device)
            times[name].append(time.perf_counter() - t)
        for a, rates in ceiling.items():
            rates.append(statistics.median(matmul_rate(*ceiling_shape(device, a), device, 0.3)))
        log(f"pair {r + 1}/{args.repeats}: " + "  ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in sides)
            + "  matmul " + "  ".join(f"{ceiling_shape(device, a)[1]} {v[-1]:.1f}" for a, v in ceiling.items())
            + " GFLOP/s")

    peak = {a: statistics.median(v) * 1e9 for a, v in ceiling.items()}
    result = {"bench": "train", "config": args.config, "arch": cfg.model.arch, "machine": info,
              "precision": args.precision,
              "shape": {k: getattr(cfg.model, k) for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size",
                                                            "mlp", "norm", "pos", "tie_embeddings")},
              "batch": cfg.train.micro_batch, "seq_len": cfg.train.seq_len, "tokens_per_step": tokens,
              "params_m": round(sides["lmforge"].model.num_params() / 1e6, 2),
              "gflop_per_step": round(flops_tok * tokens / 1e9, 2),
              "lmforge_train": {k: getattr(cfg.train, k) for k in ("optimizer", "loss_chunk", "compile",
                                                                    "activation_checkpointing")},
              "warmup_s": round(warmup_s, 1), "matmul_ceiling_gflops": spread(ceiling[amp], 1),
              "matmul_ceiling_shape": f"{ceiling_shape(device, amp)[0]}^2 {ceiling_shape(device, amp)[1]}"}
    if None in ceiling and amp is not None:
        result["matmul_ceiling_fp32_gflops"] = spread(ceiling[None], 1)
    for name, ts in times.items():
        tps = [tokens / t for t in ts]
        result[name] = {"tokens_per_s": spread(tps, 1), "step_ms": spread([t * 1e3 for t in ts], 1),
                        "mfu": round(flops_tok * statistics.median(tps) / peak[amps[name]], 3)}
    ratios = [p / m for m, p in zip(times["lmforge"], times["transformers"])]
    result["speedup_vs_transformers"] = spread(ratios)
    if "lmforge_fp32" in times:  # per pair, as the ratio above
        result["speedup_vs_lmforge_fp32"] = spread([f / m for m, f in zip(times["lmforge"], times["lmforge_fp32"])])

    if args.profile:
        x, y = batch(cfg, device, 0)
        result["profile"] = step_breakdown(sides, x, y)

    if not args.no_memory:
        x, y = batch(cfg, device, 0)
        mem = {"step_peak_mb": {}, "saved_activations_mb": {}}
        variants = {name: side for name, side in sides.items()}
        for variant in ("unfused_loss", "activation_checkpointing"):
            variants[f"lmforge_{variant}"] = Side("lmforge", cfg, device, amp, variant)
        for name, side in variants.items():
            mem["step_peak_mb"][name] = round(step_peak_mb(side, x, y), 1)
            mem["saved_activations_mb"][name] = round(side.saved_bytes(x, y) / 2**20, 1)
        mem["what"] = ("step_peak_mb: peak memory one training step allocates above what it starts with (weights "
                       "and optimizer state excluded); saved_activations_mb: tensors autograd keeps between forward "
                       "and backward, parameters excluded. lmforge_unfused_loss: lmforge with the plain head + "
                       "F.cross_entropy instead of the fused chunked loss; lmforge_activation_checkpointing: "
                       "with train.activation_checkpointing=true")
        result["memory"] = mem
    result["machine"]["load_avg_1min_end"] = machine(device).get("load_avg_1min")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
