"""The one training loop. Pretraining, SFT, DPO, reward modelling and GRPO all run through `train`.

Follow one step (train/step.py): the objective hands this rank its micro-batches; the loss of each
is a sum over units (tokens, pairs, ...) divided by the global batch's unit count, so accumulation
and ranks are weighted exactly; then clip, step, schedule. Checkpoints hold everything that decides
the next step — weights, optimizer, step, data position, RNG states — so a resumed run continues bit
for bit.
"""

from __future__ import annotations

import math
import os
import random
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.markup import escape
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge import checkpoint as ckpt
from lmforge.config import Config, to_dict
from lmforge.console import console, log
from lmforge.errors import LmforgeError
from lmforge.model.moe import load_metrics, moe_layers
from lmforge.model.spec import spec_for
from lmforge.model.transformer import ffn_dim
from lmforge.rundir import RunFolder, eval_results_of, remembered
from lmforge.train import dist
from lmforge.train.context import SequenceSplit
from lmforge.train.metrics import MetricsSink
from lmforge.train.mfu import MatmulCeiling, bf16_speedup
from lmforge.train.objectives import Objective
from lmforge.train.optim import build_optimizer, lr_factor, set_lr
from lmforge.train.parallelize import Layout, build_layout, check_supported, gathered, loss_context
from lmforge.train.pipeline import Pipeline, PipelineLM
from lmforge.train.step import Stepper, state_bytes


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    metrics: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0  # real (non-padding) tokens of the training passes per second
    mfu: float = 0.0
    generated_tokens_per_s: float = 0.0  # tokens sampled per second (GRPO's rollouts)


def autocast_dtype(precision: str, device: torch.device, mlp_shape: tuple[int, int, int] = (1024, 1024, 1024)
                   ) -> torch.dtype | None:
    """The autocast dtype of `train.precision` on `device` (None: plain fp32).

    `auto` on a CPU measures: bf16 autocast when the model's MLP product (`mlp_shape`: tokens of a
    micro-batch, width, hidden width) runs faster in bf16 than in fp32 here, fp32 otherwise, and the
    log says which and why. Master weights, optimizer state and the loss stay fp32 either way.
    """
    if device.type != "cuda":
        if precision == "auto":
            speedup = bf16_speedup(*mlp_shape)
            pick = speedup > 1.1  # a margin: at parity bf16 only costs accuracy
            log(f"train.precision=auto: a {mlp_shape[0]}x{mlp_shape[1]} @ {mlp_shape[1]}x{mlp_shape[2]} product "
                f"runs {speedup:.2f}x as fast in bf16 as in fp32 on this CPU, so training uses "
                f"{'bf16 autocast' if pick else 'fp32'} (set train.precision=fp32 or bf16 to choose)")
            return torch.bfloat16 if pick else None
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


_AMP_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _run_autocast(cfg: Config, device: torch.device, saved: dict) -> torch.dtype | None:
    """This run's autocast dtype, the same on every rank and across a resume.

    A measured choice (`auto` on a CPU) can come out differently on another rank or on another day; a
    resumed run keeps the precision it was trained in (a resume is bit-exact only then), and under
    several processes rank 0's measurement decides for all.
    """
    if cfg.train.precision == "auto" and device.type != "cuda" and saved.get("precision") in ("fp32", "bf16"):
        log(f"train.precision=auto: {saved['precision']}, as the run this resumes was trained")
        return torch.bfloat16 if saved["precision"] == "bf16" else None
    amp = autocast_dtype(cfg.train.precision, device, _mlp_shape(cfg))
    if cfg.train.precision == "auto" and device.type != "cuda" and dist.world_size() > 1:
        amp = dist.all_gather_object(amp)[0]
    return amp


def _mlp_shape(cfg: Config) -> tuple[int, int, int]:
    """(tokens, width, hidden width) of one micro-batch's MLP product: the matmul that dominates a step."""
    m = cfg.model
    tokens = min(cfg.train.micro_batch * cfg.train.seq_len, 4096)  # enough rows to time the kernel, not the call
    return tokens, m.n_embd, ffn_dim(m)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


OPTIMIZER = ckpt.OPTIMIZER_SHARDS


def _accumulation(tc, dp_world: int) -> int:
    """Micro-batches per step on each data-parallel rank, from the global batch."""
    tokens_per_micro = tc.micro_batch * tc.seq_len
    global_tokens = tc.batch_tokens or tokens_per_micro * dp_world
    if global_tokens % (tokens_per_micro * dp_world):
        raise LmforgeError(f"train.batch_tokens={global_tokens} is not a multiple of micro_batch * seq_len * "
                           f"data-parallel ranks = {tokens_per_micro * dp_world}")
    return global_tokens // (tokens_per_micro * dp_world)


def _load_weights(path: Path, model: nn.Module, device: torch.device) -> tuple[dict, dict]:
    """Load a checkpoint's trained weights into the (not yet sharded) model; (trainer state, RNG states)."""
    saved, rng = ckpt.load_training_state(path)
    if to_dict(ckpt.read_model_config(path)) != to_dict(ckpt.unwrap(model).cfg):
        raise LmforgeError(f"cannot resume from {path}: its model config differs from this run's "
                           "(use a new run_dir, or train.resume=none)")
    load_weights = getattr(ckpt.unwrap(model), "load_weights", None)
    if load_weights is not None:  # a model with its own weight files: LoRA adapters, a reward head
        load_weights(path)
    else:
        loaded = ckpt.load_model(path, device=device)
        ckpt.unwrap(model).load_state_dict(loaded.state_dict())
        del loaded
    return saved, rng


def _fault(step: int) -> None:
    """LMFORGE_FAULT=step:N kills this process right after step N (crash-safety tests)."""
    if os.environ.get("LMFORGE_FAULT") == f"step:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: Config, model: nn.Module, objective: Objective, out_dir: str | Path,
          tokenizer_dir: str | Path | None = None, sample_fn=None,
          config_path: str | Path | None = None) -> TrainResult:
    """Train `model` on `objective`, writing checkpoints and metrics under `out_dir`.

    sample_fn(model) -> str, if given, is called at sample_every steps and at the end, and its
    text is printed and logged. config_path (RUN/lmforge.yaml, for pretraining) receives the run's
    config once the first step has trained, so a command that fails before changes nothing there.
    `out_dir` is locked while the run lasts (rank 0 holds the lock; every rank stops if it cannot).
    """
    d = dist.setup(cfg.device)
    folder = RunFolder(out_dir, cfg, config_path, enabled=d.is_main)
    error = dist.all_gather_object(folder.lock())[0]
    if error:
        raise LmforgeError(error)
    try:
        return _train(cfg, d, folder, model, objective, Path(out_dir), tokenizer_dir, sample_fn)
    except BaseException:
        folder.failed()  # a run that trained no step puts back what it moved aside
        raise
    finally:
        folder.release()


def _train(cfg: Config, d: dist.Dist, folder: RunFolder, model: nn.Module, objective: Objective, out_dir: Path,
           tokenizer_dir: str | Path | None, sample_fn) -> TrainResult:
    tc = cfg.train
    ckpt_dir = out_dir / "checkpoints"
    device = d.device
    if tc.precision == "fp16" and device.type != "cuda":
        raise LmforgeError("train.precision=fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    layout = build_layout(cfg.parallel, d.world, d.rank, device)
    check_supported(layout, objective.name)
    model.to(device)
    accum = _accumulation(tc, layout.dp_world)
    if layout.cp > 1:  # the cp ranks of a data-parallel rank read the same batches, each its part of them
        objective.split = SequenceSplit(layout.cp_rank, layout.cp)
    objective.setup(model, device, layout.dp_rank, layout.dp_world, accum)
    state = {"step": 0, "tokens": 0, "generated_tokens": 0, "total_steps": tc.max_steps if tc.max_minutes <= 0 else 0,
             "elapsed": 0.0, "eval_every": tc.eval_every}

    # Trained weights load into the plain model, before anything shards it: the same on every layout.
    resume_from = ckpt.resume_target(tc.resume, ckpt_dir)
    saved, rng = _load_weights(resume_from, model, device) if resume_from is not None else ({}, {})
    amp = _run_autocast(cfg, device, saved)
    inner = ckpt.unwrap(model)
    flops_tok = inner.flops_per_token(tc.seq_len)
    n_params = inner.num_params()  # the whole model's, before a pipeline stage keeps only its layers
    # Measured before compiling, while nothing else of ours runs (inductor starts worker processes).
    ceiling = MatmulCeiling(device, amp) if d.is_main else None

    # Parallelism from outside the model (TP, activation checkpointing, compile, FSDP2), then DDP.
    parallel = spec_for(inner.cfg).fn("parallelize")(inner, layout, cfg.parallel, tc, device, amp)
    pipe = parallel if isinstance(parallel, Pipeline) else None
    train_model: nn.Module = PipelineLM(pipe) if pipe else model  # under PP, model(x, labels=y) runs the stages
    if pipe and sample_fn is not None:
        log("samples during training are off under pipeline parallel (generation needs the whole model per rank)")
        sample_fn = None
    if layout.ddp:
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          broadcast_buffers=False)
    optimizer = build_optimizer(model, tc)  # after sharding: it holds the shards
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    if resume_from is not None:
        ckpt.load_optimizer(model, optimizer, resume_from)
        if "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        objective.load_state_dict(saved["objective"])
        state.update({k: saved[k] for k in state if k in saved})
        if tc.max_minutes <= 0:  # an explicit step count (e.g. to train a finished run longer) wins
            state["total_steps"], state["eval_every"] = tc.max_steps, tc.eval_every
        ranks = rng.get("ranks", [])
        if len(ranks) == d.world:
            set_rng_state(ranks[d.rank])
        log(f"[green]resumed[/] from {resume_from} at step {state['step']}"
            + (f" (written by {saved['world']} processes)" if saved.get("world", d.world) != d.world else ""))
    stepper = Stepper(train_model, [p for p in model.parameters() if p.requires_grad], optimizer, scaler,
                      objective, layout, device, amp, tc.grad_clip, pipe)

    folder.set_aside(*_earlier_run(folder.root, out_dir, ckpt_dir, tc.resume, resume_from))
    sink = MetricsSink(out_dir, d.is_main, state["step"], tc.tensorboard, tc.wandb, tc.swanlab,
                       run_name=out_dir.name, config=to_dict(cfg))
    config_yaml = _config_yaml(remembered(cfg, has_checkpoint=True))  # what restarting from a checkpoint means

    def save(step: int) -> Path | None:
        """Every rank takes part: the RNG states and weights are gathered, each rank writes its optimizer shard."""
        rngs = dist.all_gather_object(rng_state())
        weights = ckpt.full_model_state(model, stages=pipe.group if pipe else None)
        trainer_state = {**state, "objective": objective.state_dict(), "world": d.world, "accum": accum,
                         "layout": layout.describe(), "precision": _AMP_NAMES[amp]}
        if scaler.is_enabled():
            trainer_state["scaler"] = scaler.state_dict()
        path = ckpt.save_checkpoint(ckpt_dir / f"step_{step:06d}", inner, tokenizer_dir=tokenizer_dir,
                                    config_yaml=config_yaml, trainer_state=trainer_state,
                                    rng_state={"ranks": rngs}, state=weights,
                                    shards=lambda tmp: ckpt.save_optimizer(model, optimizer, tmp / OPTIMIZER))
        if d.is_main:
            ckpt.prune_checkpoints(ckpt_dir, tc.keep_last)
            folder.saved()
        dist.barrier()
        return path if d.is_main else None

    # --- the loop -------------------------------------------------------------------------------
    step = first_step = state["step"]
    clock = _Budget(tc, accum, state)
    meter = _Meter(state, flops_tok, ceiling, device, layout.tp, [m.layer for m in moe_layers(inner)])
    last_eval: dict = {}
    last_path = None
    log(f"training {objective.name}: {n_params / 1e6:.2f}M parameters, {d.world} process(es) "
        f"({layout.describe()}), "
        f"micro-batches of {tc.micro_batch} x {tc.seq_len} ({accum} accumulated), precision {amp or torch.float32}, "
        f"device {device}"
        + (f"; {ceiling.describe()}" if ceiling else ""))

    progress = _Progress(enabled=d.is_main and tc.progress)
    try:
        while True:
            total = state["total_steps"]
            if total and step >= total:
                break
            set_lr(optimizer, lr_factor(step, total or max(step + 1, tc.max_steps), tc))
            t_step = time.perf_counter()
            result = stepper.step()
            step += 1
            state["step"] = step
            clock.stepped(step, time.perf_counter() - t_step)
            meter.add(result)
            if step - first_step == 1:
                folder.started(has_checkpoint=ckpt.latest_checkpoint(ckpt_dir, resumable=True) is not None)
                # What sharding saves, measured: this rank's weights, gradients and optimizer state.
                meter.once = {"state_mb": round(state_bytes(model, optimizer) / 2**20, 2)}
                log(f"weights, gradients and optimizer state: {meter.once['state_mb']:,.1f} MB per process")

            total = state["total_steps"] or tc.max_steps
            if step % tc.log_every == 0 or step == total:
                row = meter.row(step, total, optimizer.param_groups[0]["lr"], clock.eta_s(step, total))
                sink.log(step, row)
                progress.update(step, total, row, row["eta_s"])
            if state["eval_every"] and (step % state["eval_every"] == 0 or step == total):
                last_eval = _evaluate(objective, train_model, layout)
                if last_eval:
                    sink.log(step, last_eval)
                    progress.note(step, last_eval)
            if sample_fn is not None and tc.sample_every and step % tc.sample_every == 0:
                text = _sample(sample_fn, model, d.is_main, layout)
                if d.is_main:
                    sink.log(step, {"sample": text})
                    progress.note(step, {"sample": text})
            state["elapsed"] = clock.elapsed()
            if step == total or (tc.save_every and step % tc.save_every == 0):
                last_path = save(step)
            _fault(step)
    finally:
        progress.close()
        sink.close()

    if not last_eval and state["eval_every"]:
        last_eval = _evaluate(objective, train_model, layout)
    if sample_fn is not None and (not tc.sample_every or step % tc.sample_every):
        text = _sample(sample_fn, model, d.is_main, layout)  # every rank takes part
        if d.is_main:
            last_eval = {**last_eval, "sample": text}
            console.print(f"[cyan]sample at step {step}:[/]\n{escape(text)}")  # generated text is not markup
    if last_path is None:
        last_path = ckpt.latest_checkpoint(ckpt_dir, resumable=True)
    tps, gps = meter.rates_since_start(clock.elapsed() - clock.elapsed0)
    mfu = ceiling.mfu(_model_flops(flops_tok, tps, gps)) if ceiling else 0.0
    return TrainResult(step, last_path, last_eval, tps, mfu, gps)


def _model_flops(flops_tok: float, tokens_per_s: float, generated_per_s: float) -> float:
    """Model FLOP/s: training tokens at flops_per_token (forward + backward), generated tokens at a
    third of it (a forward pass only)."""
    return flops_tok * (tokens_per_s + generated_per_s / 3)


def _throughput(state: dict, window: dict, dt: float, flops_tok: float, ceiling: MatmulCeiling | None,
                device: torch.device) -> dict:
    """The metrics row's token counts, rates, MFU and memory, from the tokens the objective really processed."""
    tps, gps = window["tokens"] / dt, window["generated"] / dt
    row = {"tokens": state["tokens"], "tokens_per_s": tps}
    if state["generated_tokens"]:
        row.update({"generated_tokens": state["generated_tokens"], "generated_tokens_per_s": gps})
    row["mfu"] = ceiling.mfu(_model_flops(flops_tok, tps, gps)) if ceiling else 0.0
    if ceiling:
        row["mfu_peak_flops"] = ceiling.flops
    row["memory_gb"] = memory_gb(device)
    return row


def _earlier_run(root: Path, out_dir: Path, ckpt_dir: Path, resume: str,
                 resume_from: Path | None) -> tuple[list, list, str]:
    """What of an earlier run this one would mix with: (paths to move aside, paths to copy aside, why).

    A fresh start (train.resume=none) or a resume from another run's checkpoint: every checkpoint and
    its RUN/eval results, metrics.jsonl and the TensorBoard events. A resume from an earlier checkpoint
    of this run: the later checkpoints and their results (and a copy of metrics.jsonl, whose later rows
    the sink drops). Plain auto-resume: nothing.
    """
    later = ckpt.superseded(ckpt_dir, resume_from)
    results = eval_results_of(root, later)
    own = resume_from is not None and resume_from.resolve().parent == ckpt_dir.resolve()
    if resume_from is None and resume not in ("none", ""):
        return [], [], ""  # auto with nothing to resume from: this run's own first start
    if own:
        return later + results, [out_dir / "metrics.jsonl"] if later else [], f"resuming from {resume_from.name}"
    why = "train.resume=none (a fresh start)" if resume_from is None else f"train.resume={resume_from}"
    return [*later, *results, out_dir / "metrics.jsonl", out_dir / "tensorboard"], [], why


def _fit_budget(tc, train_step_s: float, accum: int, step: int, left_s: float,
                eval_every: int | None = None) -> tuple[int, int, float]:
    """(total steps, eval interval, seconds per step) that fill `left_s` seconds of a time budget.

    Periodic evaluation runs forward passes only, about a third of a training step's work per batch,
    and is counted in. A budget too short for the configured interval still gets about four
    validation points during training (a user watching a 1-minute run wants a curve, not one point),
    unless `eval_every` fixes the interval (a re-fit keeps the one the first fit chose).
    """
    def fit(eval_every: int) -> tuple[int, float]:
        per_step = train_step_s * ((1 + tc.eval_batches / (3 * accum * eval_every)) if eval_every else 1)
        return max(step + 1, step + int(left_s / per_step)), per_step

    if eval_every is not None:
        total, per_step = fit(eval_every)
        return total, eval_every, per_step
    total, per_step = fit(tc.eval_every)
    eval_every = min(tc.eval_every, max(1, total // 4)) if tc.eval_every else 0
    if eval_every != tc.eval_every:
        total, per_step = fit(eval_every)
    return total, eval_every, per_step


class _Budget:
    """The run's clock, and `train.max_minutes`: a time budget fixes the step count once the step time is
    known, in `state["total_steps"]` (saved, so a resumed run agrees).

    The first step is left out (allocator and kernel warm-up) and ten are timed: over five, one slow
    step on a shared machine left a quarter of the budget unused. Steps keep getting faster for a while
    after that (a 5-minute quickstart ended 40-60 s early), so the count is fitted again a quarter and
    half-way into the budget, from the steps since the last fit.
    """

    def __init__(self, tc, accum: int, state: dict):
        self.tc, self.accum, self.state = tc, accum, state
        self.t_start = time.perf_counter()
        self.elapsed0 = state["elapsed"]  # seconds trained before this launch (a resumed run)
        self.first_step = state["step"]
        self.budget_s = tc.max_minutes * 60
        self.train_s = 0.0  # seconds spent in training steps since the warm-up step
        self.fit_times: list[float] = []  # seconds into the budget at which the step count is fitted again
        self.last_fit = (0.0, 0)  # train_s and step at the last fit

    def elapsed(self) -> float:
        """Seconds trained in all, this launch and the ones before it."""
        return self.elapsed0 + time.perf_counter() - self.t_start

    def eta_s(self, step: int, total: int) -> float:
        return round((total - step) * (self.elapsed() - self.elapsed0) / max(step - self.first_step, 1), 1)

    def stepped(self, step: int, step_s: float) -> None:
        """After each step, which took `step_s` seconds: fit the step count to the budget when it is time."""
        tc, state = self.tc, self.state
        self.train_s += step_s
        if step - self.first_step == 1:
            self.train_s, self.last_fit = 0.0, (0.0, step)
        since = time.perf_counter() - self.t_start
        first_fit = self.budget_s and not state["total_steps"] and step - self.first_step >= 11
        if first_fit or (self.fit_times and since >= self.fit_times[0]):
            state["total_steps"], state["eval_every"], per_step = _fit_budget(
                tc, (self.train_s - self.last_fit[0]) / (step - self.last_fit[1]), self.accum, step,
                self.budget_s - since, None if first_fit else state["eval_every"])
            log(f"time budget {tc.max_minutes:g} min -> {state['total_steps']} steps ({per_step:.2f}s/step"
                + (")" if first_fit else ", re-measured)")
                + (f"; validation every {state['eval_every']} steps"
                   if first_fit and state["eval_every"] != tc.eval_every else ""))
            self.fit_times = [self.budget_s / 4, self.budget_s / 2] if first_fit else self.fit_times[1:]
            self.last_fit = (self.train_s, step)
        elif self.budget_s and state["total_steps"] > step and self.elapsed() >= self.budget_s:
            state["total_steps"] = step  # the machine slowed down after the last fit: the budget is a limit
            log(f"time budget {tc.max_minutes:g} min spent at step {step}; finishing here")


class _Meter:
    """What the metrics rows report: the steps' summed metrics since the last row, token counts (kept in
    `state`, saved with it) and rates, MFU and memory."""

    def __init__(self, state: dict, flops_tok: float, ceiling: MatmulCeiling | None, device: torch.device,
                 sharing: int, moe_layers: list[int] | None = None):
        self.state, self.flops_tok, self.ceiling, self.device, self.sharing = state, flops_tok, ceiling, device, sharing
        self.moe_layers = moe_layers or []  # block indices of the MoE layers, whose expert load is logged
        self.tokens0 = state["tokens"], state["generated_tokens"]
        self.acc: dict = {}
        self.window = {"t": time.perf_counter(), "tokens": 0.0, "generated": 0.0}
        self.once: dict = {}  # figures logged with the next row only

    def add(self, result) -> None:
        self.state["tokens"] += result.tokens
        self.state["generated_tokens"] += result.generated
        self.window["tokens"] += result.tokens
        self.window["generated"] += result.generated
        acc = self.acc
        for k, v in result.metrics.items():
            acc[k] = acc.get(k, 0.0) + v
        acc["_units"] = acc.get("_units", 0.0) + result.units
        acc["_gnorm"] = acc.get("_gnorm", 0.0) + result.grad_norm.float()
        acc["_steps"] = acc.get("_steps", 0) + 1
        if result.expert_load is not None:
            acc["_load"] = acc.get("_load", 0.0) + result.expert_load

    def row(self, step: int, total: int, lr: float, eta_s: float) -> dict:
        row = _reduce_metrics(self.acc, self.sharing)
        if "_load" in self.acc:  # already summed over the ranks
            row.update(load_metrics(self.moe_layers, self.acc["_load"]))
        dt = max(time.perf_counter() - self.window["t"], 1e-9)
        row.update({"lr": lr, **_throughput(self.state, self.window, dt, self.flops_tok, self.ceiling, self.device),
                    "total_steps": total, "eta_s": eta_s, **self.once})
        self.acc, self.once = {}, {}
        self.window = {"t": time.perf_counter(), "tokens": 0.0, "generated": 0.0}
        return row

    def rates_since_start(self, seconds: float) -> tuple[float, float]:
        """Trained and generated tokens per second over this launch."""
        seconds = max(seconds, 1e-9)
        return ((self.state["tokens"] - self.tokens0[0]) / seconds,
                (self.state["generated_tokens"] - self.tokens0[1]) / seconds)


def _evaluate(objective: Objective, model: nn.Module, layout: Layout) -> dict:
    """Every rank evaluates its share, with whole weights (see parallelize.gathered)."""
    was = model.training
    model.eval()
    try:
        with gathered(ckpt.unwrap(model)), loss_context(layout):
            return objective.evaluate(model)
    finally:
        model.train(was)


def _sample(sample_fn, model: nn.Module, is_main: bool, layout: Layout) -> str:
    """The main rank samples; under FSDP every rank gathers the weights with it first.

    Under tensor parallel every forward is a collective of the tp group, so every rank samples along
    (the samplers are seeded or greedy, and the logits are whole on every rank: the same tokens
    everywhere) and the main rank's text is kept.

    Compiled blocks run eagerly here: a sample is a few dozen tokens without gradients through a
    growing cache, and compiling for it cost three recompilations (grad mode, the mask, its length),
    more than the rest of a short compiled run.
    """
    inner = ckpt.unwrap(model)
    with gathered(inner), torch.compiler.set_stance("force_eager"):
        return sample_fn(inner) if is_main or layout.tp > 1 else ""


def _reduce_metrics(acc: dict, sharing: int = 1) -> dict:
    """Average summed metrics over the units of every rank (one all-reduce at log time only).

    sharing: ranks that read the same data (tensor parallel) and so add the same sums."""
    keys = sorted(k for k in acc if not k.startswith("_"))
    if not keys:
        return {}
    t = torch.stack([torch.as_tensor(acc[k]).float() for k in keys])
    dist.all_reduce_sum(t)
    t = t / sharing
    units = torch.as_tensor(acc["_units"]).float().clamp_min(1e-9)  # already the global count
    out = {k: (t[i] / units).item() for i, k in enumerate(keys)}
    out["grad_norm"] = float(acc["_gnorm"]) / acc["_steps"]
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in out.items()}


def _config_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


class _Progress:
    """One live line: step, loss, lr, tokens/s (GRPO: generated and trained), MFU, memory, ETA; evaluations
    print above it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), console=console)
            self.task = self.bar.add_task("train", total=None, info="")
            self.bar.start()

    def update(self, step: int, total: int, row: dict, eta_s: float) -> None:
        if not self.enabled:
            return
        rate = f"{row['tokens_per_s']:,.0f} tok/s"
        if "generated_tokens_per_s" in row:  # GRPO: sampling and training are two different rates
            rate = f"gen {row['generated_tokens_per_s']:,.0f} tok/s  train {rate}"
        info = (f"loss {row.get('loss', float('nan')):.4f}  lr {row['lr']:.2e}  {rate}  "
                f"MFU {100 * row['mfu']:.1f}%  mem {row['memory_gb']:.2f}GB  ETA {_hms(eta_s)}")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, total=total, info=info)
        else:  # CI logs and pipes: a plain line per log step
            console.print(f"step {step}/{total}  {info}")

    def note(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k}: {v!r}" for k, v in metrics.items()]
        console.print(f"[cyan]step {step}[/]  " + escape("  ".join(parts)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _hms(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
