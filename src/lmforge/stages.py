"""The pretraining stages as commands: tokenizer, prepare, pretrain, model info, and `run RECIPE`.

Each stage reads artifacts from the run directory and writes its own; `lmforge run` calls them in
the order a recipe lists and skips the ones whose artifacts already exist, so re-running a recipe
after a crash resumes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lmforge.cli import CommandParser, parse_config
from lmforge.config import Config, save_config
from lmforge.console import log
from lmforge.errors import LmforgeError
from lmforge.rundir import RunLock, remembered

# --- tokenizer and data ---------------------------------------------------------------------------

def remember_config(cfg: Config) -> None:
    """RUN/lmforge.yaml, which later stages with run_dir=... read: written once a stage has succeeded (or,
    for pretraining, trained its first step), without one-shot switches such as train.resume=none."""
    has_checkpoint = any((p / "trainer_state.json").is_file() for p in (cfg.run_path / "checkpoints").glob("step_*"))
    save_config(remembered(cfg, has_checkpoint), cfg.run_path / "lmforge.yaml")


def run_tokenizer(cfg: Config) -> dict:
    from lmforge.tokenizer import train_tokenizer

    with RunLock(cfg.run_path, enabled=is_rank0()):  # no pretrain (or second tokenizer) writes RUN meanwhile
        report = train_tokenizer(cfg)
        remember_config(cfg)
    return report


def run_prepare(cfg: Config) -> dict:
    """One `prepare`, one task of many (data.num_tasks, which locks only its own task folder and leaves the
    run's config alone), or the merge of the tasks."""
    from lmforge.data.prepare import prepare
    from lmforge.data.tasks import check_tasks, merge_tasks, prepare_task, task_dir

    check_tasks(cfg)
    d = cfg.data
    if d.num_tasks > 1 and not d.merge:
        folder = task_dir(cfg, d.task_index)
        with RunLock(folder.parent / f".{folder.name}", enabled=is_rank0()):
            return prepare_task(cfg)
    with RunLock(cfg.run_path, enabled=is_rank0()):
        summary = merge_tasks(cfg) if d.merge else prepare(cfg)
        d.merge, d.num_tasks, d.task_index = False, 1, 0  # the run remembers the data, not the job layout
        remember_config(cfg)
    return summary


def is_rank0() -> bool:
    """Under torchrun only rank 0 takes a run's lock."""
    return os.environ.get("RANK", "0") == "0"


def cmd_tokenizer(argv: list[str]) -> int:
    run_tokenizer(parse_config("tokenizer", argv, "Train a byte-level BPE tokenizer into RUN/tokenizer."))
    return 0


def cmd_prepare(argv: list[str]) -> int:
    argv = ["data.merge=true" if a == "--merge" else a for a in argv]  # --merge: data.merge=true
    run_prepare(parse_config("prepare", argv, "Tokenize a corpus into RUN/data/<split> shards "
                             "(--merge: join the data.num_tasks tasks' shards)."))
    return 0


# --- pretraining ----------------------------------------------------------------------------------

def tokenizer_dir(cfg: Config) -> Path:
    d = cfg.run_path / "tokenizer"
    if not (d / "tokenizer.json").is_file():
        raise LmforgeError(f"{d}/tokenizer.json not found: run `lmforge tokenizer` for this run_dir first")
    return d


def build_model(cfg: Config, vocab_size: int, start_id: int = -1):
    """A freshly initialised model (seeded, so every rank builds the same one), or `train.init_from`.

    start_id: the decoder's first input of a t5 model whose model.decoder_start_id is -1 (the tokenizer's
    <|endoftext|>)."""
    import torch

    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.model.spec import build_model
    from lmforge.model.transformer import padded_vocab
    from lmforge.train.lora import load_any

    if cfg.train.init_from:
        model = load_any(resolve_checkpoint(cfg.train.init_from, cfg.run_dir, "train.init_from"))
        if model.cfg.vocab_size < vocab_size:
            raise LmforgeError(f"train.init_from={cfg.train.init_from} has vocab_size {model.cfg.vocab_size}, "
                               f"smaller than the tokenizer's {vocab_size}")
        cfg.model = model.cfg
        return model.train()
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = padded_vocab(vocab_size, cfg.model.pad_vocab_to)
    elif cfg.model.vocab_size < vocab_size:
        raise LmforgeError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                           f"{vocab_size} tokens; set model.vocab_size=0 to size it from the tokenizer")
    if cfg.train.seq_len > cfg.model.max_seq_len:
        preset = f" (the {cfg.model.preset} preset's context)" if cfg.model.preset else ""
        raise LmforgeError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
                           f"{preset}: set train.seq_len={cfg.model.max_seq_len} (or less), or a larger "
                           "model.max_seq_len")
    if cfg.model.arch == "t5" and cfg.model.decoder_start_id < 0:
        cfg.model.decoder_start_id = start_id
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model).train()


def sampler(tok, prompt: str, seed: int, max_new_tokens: int = 96) -> Callable:
    """A function model -> generated text, for periodic samples during training."""

    def sample(model) -> str:
        from lmforge.infer.engine import SamplingParams, generate

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, top_p=0.95, seed=seed)
        was = model.training
        model.eval()
        try:
            return prompt + generate(model, tok, [prompt], params)[0]
        finally:
            model.train(was)

    return sample


def data_prompt(tok, data_dir: Path, max_bytes: int = 32) -> str:
    """The first few words of the first validation document (else of the first training one).

    A prompt in the corpus's own language and style, so the sample shows what the model learnt:
    the document's first non-blank line, cut to at most `max_bytes` at a character boundary and,
    where words are separated by spaces, at the end of a word.
    """
    import numpy as np

    from lmforge.data.shards import open_shards

    split = data_dir / ("val" if (data_dir / "val" / "manifest.json").is_file() else "train")
    shards, manifest = open_shards(split)
    ids = np.asarray(shards[0][:256]).tolist()
    eot = int(manifest["eot_id"])
    text = tok.decode(ids[:ids.index(eot)] if eot in ids else ids, skip_special_tokens=True)
    line = next((s.strip() for s in text.splitlines() if s.strip().strip("\ufffd")), "")
    head = line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")  # drops a cut character
    if len(head) < len(line) and not line[len(head)].isspace() and " " in head.strip():
        head = head[:head.rstrip().rfind(" ")]  # do not end inside a word
    return head.rstrip() or line or "\n"


def run_pretrain(cfg: Config):
    from lmforge.data.shards import check_tokenizer, read_manifest
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.loop import train
    from lmforge.train.objectives import LMObjective

    tok_dir = tokenizer_dir(cfg)
    tok = Tokenizer.load(tok_dir)
    data_dir = cfg.run_path / "data"
    manifest = read_manifest(data_dir / "train")
    check_tokenizer(manifest, tok, tokenizer_dir=tok_dir)
    model = build_model(cfg, tok.vocab_size, tok.eot_id)
    check_tokenizer(manifest, vocab_size=model.cfg.vocab_size)
    if model.cfg.arch == "t5":
        return _pretrain_t5(cfg, model, tok, tok_dir, data_dir)
    benchmarks = None
    if cfg.eval.train_tasks:
        from lmforge.eval.suite import benchmark_fn

        benchmarks = benchmark_fn(cfg, tok)
    objective = LMObjective(data_dir, cfg.train.seq_len, cfg.train.micro_batch, cfg.seed,
                            cfg.train.loss_chunk, cfg.train.eval_batches, benchmarks)
    prompt = cfg.train.sample_prompt or data_prompt(tok, data_dir)
    result = train(cfg, model, objective, cfg.run_path, tokenizer_dir=tok_dir,
                   sample_fn=sampler(tok, prompt, cfg.seed), config_path=cfg.run_path / "lmforge.yaml")
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    log(f"[bold green]done[/] step {result.step}: {scores}; checkpoint {result.checkpoint}")
    return result


def _pretrain_t5(cfg: Config, model, tok, tok_dir: Path, data_dir: Path):
    """An encoder-decoder pretrains by span corruption (lmforge.data.spans) on the same shards and loop."""
    from lmforge.data.spans import sentinel_ids
    from lmforge.train.loop import train
    from lmforge.train.seq2seq import SpanObjective

    if cfg.eval.train_tasks:
        raise LmforgeError("eval.train_tasks with model.arch=t5: benchmarks score decoder-only models; unset it")
    sp = cfg.span
    objective = SpanObjective(data_dir, cfg.train.seq_len, cfg.train.micro_batch, cfg.seed, sp.noise_density,
                              sp.mean_span, sentinel_ids(tok, sp.sentinels), tok.eot_id, cfg.train.loss_chunk,
                              cfg.train.eval_batches)
    result = train(cfg, model, objective, cfg.run_path, tokenizer_dir=tok_dir,
                   config_path=cfg.run_path / "lmforge.yaml")
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    log(f"[bold green]done[/] step {result.step}: {scores}; checkpoint {result.checkpoint}")
    return result


def cmd_pretrain(argv: list[str]) -> int:
    run_pretrain(parse_config("pretrain", argv, "Pretrain a model on RUN/data into RUN/checkpoints."))
    return 0


# --- model info -----------------------------------------------------------------------------------

def _ffn_width(model) -> str:
    """The MLP's hidden width, of the dense layers and of each expert (MoE)."""
    widths = []
    for block in model.model.layers:
        mlp = block.mlp
        w = f"{mlp.experts.down_proj.shape[-1]} per expert" if hasattr(mlp, "experts") \
            else str(mlp.up_proj.out_features)
        if w not in widths:
            widths.append(w)
    return ", ".join(widths)


def cmd_model(argv: list[str]) -> int:
    import torch

    from lmforge.config import load_config
    from lmforge.model.fit import Layout, parse_memory, plan, training_memory
    from lmforge.model.mla import mla_dims
    from lmforge.model.presets import DEFAULT_INFO_VOCAB, PRESETS
    from lmforge.model.transformer import Transformer

    p = CommandParser("model", "Model arithmetic for a preset; with --gpus N --gpu-mem 24GB, the memory per GPU "
                      "of every parallel layout and the one to train with.")
    p.add_argument("action", choices=["info"])
    p.add_argument("preset", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--vocab", type=int, default=DEFAULT_INFO_VOCAB)
    p.add_argument("--batch", type=int, default=8, help="sequences per GPU (train.micro_batch)")
    p.add_argument("--seq-len", type=int, default=0, help="default: the preset's context")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--activation-checkpointing", action="store_true", help="without --gpus")
    p.add_argument("--loss-chunk", type=int, default=0, help="train.loss_chunk (0: 1024 tokens)")
    p.add_argument("--gpus", type=int, default=0, help="plan a layout for this many GPUs")
    p.add_argument("--gpu-mem", default="", help="memory of one GPU: 24GB, 24GiB, 80G, 16 (GiB)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node; HSDP shards one")
    p.add_argument("overrides", nargs="*", help="model.key=value")
    a = p.parse_args(argv)
    if a.gpus < 0 or (a.gpus and not a.gpu_mem):
        raise LmforgeError("--gpus N needs --gpu-mem, the memory of one GPU (e.g. --gpus 8 --gpu-mem 80GB)")
    gpu_bytes = parse_memory(a.gpu_mem) if a.gpu_mem else 0
    cfg = load_config(overrides=[f"model.preset={a.preset}", f"model.vocab_size={a.vocab}", *a.overrides])
    seq = a.seq_len or cfg.model.max_seq_len
    if cfg.model.arch == "t5":
        return _t5_info(a.preset, cfg.model, seq, a.gpus)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    n = model.num_params()
    m = cfg.model
    kv = f"latent attention, latent {mla_dims(m).kv_lora}" if m.attention == "mla" else f"{m.n_kv_head or m.n_head} kv"
    print(f"preset {a.preset}: {m.arch}, {m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads "
          f"({kv}), ffn {_ffn_width(model)}, "
          f"context {m.max_seq_len}, vocab {m.vocab_size}")
    print(f"parameters        {n / 1e6:10.1f} M  ({model.num_params(exclude_embeddings=True) / 1e6:.1f} M "
          "without embeddings)")
    if m.moe.experts:
        print(f"active parameters {model.num_params(active=True) / 1e6:10.1f} M  ({m.moe.experts} experts, top "
              f"{m.moe.top_k}, {m.moe.shared_experts} shared, from layer {m.moe.first_dense_layers})")
    print(f"FLOPs per token   {model.flops_per_token(seq) / 1e9:10.3f} G  (training, at sequence length {seq})")
    print_window(m, 2 if a.precision != "fp32" else 4)
    if gpu_bytes:
        result = plan(m, a.gpus or 1, gpu_bytes, a.batch, seq, a.precision, a.optimizer, a.loss_chunk,
                      a.gpus_per_node)
        print_plan(result, seq, a.precision, a.optimizer, a.gpus_per_node)
        return 0
    layout = Layout(activation_checkpointing=a.activation_checkpointing)
    mem = training_memory(m, a.batch, seq, a.precision, a.optimizer, layout, a.loss_chunk)
    print(f"training memory at batch {a.batch} x {seq}, {a.precision}, {a.optimizer}"
          f"{', activation checkpointing' if a.activation_checkpointing else ''}:")
    for k, v in mem.items():
        if k != "host":
            print(f"  {k:<15} {v / 2**30:10.2f} GiB")
    return 0


def _t5_info(preset: str, m, seq: int, gpus: int) -> int:
    """model info of an encoder-decoder: its two stacks, parameters per stack, FLOPs and the decoding caches."""
    from dataclasses import replace

    import torch

    from lmforge.model.t5 import T5, decoder_layers, t5_ffn_dim, t5_head_dim

    if gpus:
        raise LmforgeError("--gpus with model.arch=t5: the memory planner (model/fit.py) models decoder-only layouts; "
                           "an encoder-decoder trains data parallel only (parallel.dp_replicate / dp_shard)")
    with torch.device("meta"):
        model = T5(replace(m, decoder_start_id=max(m.decoder_start_id, 0)))  # the start id changes no count
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    inner = m.n_head * t5_head_dim(m)
    print(f"preset {preset}: t5, {m.n_layer} encoder + {decoder_layers(m)} decoder blocks x {m.n_embd} wide, "
          f"{m.n_head} heads of {t5_head_dim(m)}, gated-GELU ffn {t5_ffn_dim(m)}, "
          f"{m.relative_buckets} relative-position buckets (to distance {m.relative_max_distance}), "
          f"vocab {m.vocab_size}, {'tied' if m.tie_embeddings else 'untied'} head")
    n = model.num_params()
    print(f"parameters        {n / 1e6:10.1f} M  ({model.num_params(exclude_embeddings=True) / 1e6:.1f} M "
          f"without embeddings; encoder {count(model.encoder) / 1e6:.1f} M, "
          f"decoder {count(model.decoder) / 1e6:.1f} M)")
    print(f"FLOPs per token   {model.flops_per_token(seq) / 1e9:10.3f} G  (training, source and target tokens at "
          f"length {seq})")
    kib = 2**10
    print(f"KV cache / token  {decoder_layers(m) * 2 * inner * 2 / kib:10.1f} KiB  (decoder self-attention, 2-byte "
          "values; cross-attention keeps the same per source token, computed once)")
    return 0


def print_window(m, bytes_per_value: int) -> None:
    """The attention layers (local windows) and the KV cache they need per token of context."""
    from lmforge.model.window import kv_cache_bytes, layer_pattern

    pattern = layer_pattern(m)
    if m.sliding_window or m.sparse_block:
        what = [f"window {m.sliding_window}"] if m.sliding_window else []
        if m.sparse_block:
            what.append(f"block-sparse {m.sparse_block}-token blocks (local {m.sparse_local}, global "
                        f"{m.sparse_global}, stride {m.sparse_stride})")
        counts = [f"{pattern.count(k)} {name}" for k, name in (("S", "local"), ("B", "block-sparse"), ("L", "global"))
                  if k in pattern]
        print(f"attention         {', '.join(what)}, pattern {m.window_pattern or pattern[0]}: {pattern} "
              f"({', '.join(counts)} layers)")
    else:
        print(f"attention         full causal in all {m.n_layer} layers")
    ctx, kib = m.max_seq_len, 2**10
    full = kv_cache_bytes(m, ctx, bytes_per_value)
    print(f"KV cache / token  {full / ctx / kib:10.1f} KiB  (at the full context of {ctx}; {full / 2**20:.1f} MiB "
          f"a sequence, {bytes_per_value}-byte values" + (f"; {kv_cache_bytes(m, 1, bytes_per_value) / kib:.1f} KiB "
                                                          "per token before the window fills)" if m.sliding_window
                                                          else ")"))


PLAN_COLUMNS = (("weights", "weights"), ("grads", "grads"), ("optimizer", "optim"), ("copies", "copies"),
                ("activations", "activ."), ("loss_chunk", "loss"), ("total", "total"), ("host", "host"))


def print_plan(result, seq: int, precision: str, optimizer: str, gpus_per_node: int) -> None:
    """The planner's table (GiB per GPU, the worst pipeline stage) and its suggestion as keys to paste."""
    from lmforge.model.fit import HEADROOM, PREFERENCE

    gib = 2**30
    print(f"memory per GPU on {result.n_gpus} x {result.gpu_bytes / gib:.1f} GiB "
          f"({result.usable / gib:.1f} GiB usable, {1 - HEADROOM:.0%} headroom), micro-batch {result.batch} x {seq} "
          f"per GPU, {precision}, {optimizer}; GiB (host: RAM for offloaded state):")
    width = max(len(r.layout.name) for r in result.rows)
    print(f"  {'layout':<{width}}" + "".join(f"{h:>8}" for _, h in PLAN_COLUMNS) + "  fits")
    for r in result.rows:
        cells = "".join(f"{r.memory[k] / gib:8.2f}" for k, _ in PLAN_COLUMNS)
        print(f"  {r.layout.name:<{width}}{cells}  {'yes' if r.fits else 'no'}")
    print("copies: 16-bit and all-gathered weight copies; loss: one chunk of the fused head + cross-entropy")
    print(f"preference, least communication first: {PREFERENCE}")
    best = result.best
    if best is None:
        print("nothing fits, not even at micro-batch 1: more or larger GPUs, or a smaller preset")
        return
    keys = best.layout.keys()
    if result.best_batch != result.batch:
        dp = best.layout.dp_replicate * best.layout.dp_shard
        keys += [f"train.micro_batch={result.best_batch}", f"train.batch_tokens={result.batch * seq * dp}"]
    nodes = result.n_gpus // gpus_per_node if result.n_gpus > gpus_per_node else 1
    at = f" at micro-batch {result.best_batch}" if result.best_batch != result.batch else ""
    print(f"suggested: {best.layout.name} ({best.memory['total'] / gib:.2f} GiB per GPU{at}), the first in that "
          "order that fits; the keys to paste:")
    print(f"  {' '.join(keys) or '(none: the defaults train on one GPU)'}")
    launch = "lmforge" if result.n_gpus == 1 else f"torchrun --nproc_per_node={result.n_gpus} -m lmforge" \
        if nodes == 1 else f"torchrun --nnodes={nodes} --nproc_per_node={result.n_gpus // nodes} -m lmforge"
    print(f"  {launch} pretrain RECIPE {' '.join(keys)}".rstrip())


# --- recipes --------------------------------------------------------------------------------------

def _done_tokenizer(cfg: Config) -> bool:
    return (cfg.run_path / "tokenizer" / "tokenizer.json").is_file()


def _done_prepare(cfg: Config) -> bool:
    return (cfg.run_path / "data" / "train" / "manifest.json").is_file()


# name -> (run function, "already done" check). Post-training stages register here too.
STAGES: dict[str, tuple[Callable[[Config], object], Callable[[Config], bool] | None]] = {
    "tokenizer": (run_tokenizer, _done_tokenizer),
    "prepare": (run_prepare, _done_prepare),
    "pretrain": (run_pretrain, None),  # resumes from its latest checkpoint by itself
}


def _lazy(target: str, *args) -> Callable[[Config], object]:
    """`module:function` called as function(cfg, *args), imported only when the stage runs."""

    def call(cfg: Config):
        import importlib

        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(cfg, *args)

    return call


# Post-training: the demo task, each training stage (done once it reached its step count), and
# eval-<stage>, the demo's held-out accuracy of that stage's latest checkpoint.
STAGES["bench"] = (_lazy("lmforge.eval.suite:run_suite"), _lazy("lmforge.eval.suite:suite_done"))  # eval.tasks
STAGES["demo"] = (_lazy("lmforge.data.demo:run_demo"), _lazy("lmforge.data.demo:done_demo"))
STAGES["reverse"] = (_lazy("lmforge.data.wordlists:run_reverse"), _lazy("lmforge.data.wordlists:done_reverse"))
STAGES["sort"] = (_lazy("lmforge.data.wordlists:run_sort"), _lazy("lmforge.data.wordlists:done_sort"))
for _name, _module in (("sft", "sft"), ("dpo", "dpo"), ("rm", "reward"), ("grpo", "grpo"), ("seq2seq", "seq2seq")):
    STAGES[_name] = (_lazy(f"lmforge.train.{_module}:run_{_name}"), _lazy("lmforge.train.sft:stage_done", _name))
# grpo-rm: a second GRPO run, rewarded by the trained reward model, in RUN/grpo-rm.
STAGES["grpo-rm"] = (_lazy("lmforge.train.grpo:run_grpo_rm"), _lazy("lmforge.train.sft:stage_done", "grpo", "grpo-rm"))
for _name in ("pretrain", "sft", "dpo", "grpo", "grpo-rm"):
    STAGES[f"eval-{_name}"] = (_lazy("lmforge.eval.tasks.arith:run_stage_eval", _name),
                               _lazy("lmforge.eval.tasks.arith:stage_eval_done", _name))


def cmd_run(argv: list[str]) -> int:
    cfg = parse_config("run", argv, "Run the stages a recipe lists (its `stages:` key), in order, resumably.")
    if not cfg.stages:
        raise LmforgeError(f"the recipe lists no stages; add e.g. `stages: [tokenizer, prepare, pretrain]` "
                           f"(known: {', '.join(STAGES)})")
    for name in cfg.stages:
        if name not in STAGES:
            raise LmforgeError(f"stages: unknown stage '{name}' (known: {', '.join(STAGES)})")
    for name in cfg.stages:
        run, done = STAGES[name]
        if done is not None and done(cfg):
            log(f"[dim]stage {name}: already done, skipped[/]")
            continue
        log(f"[bold]stage {name}[/]")
        run(cfg)
    return 0
