"""Decode speed of lmforge's engine against transformers' `generate` on the same model; prints ONE JSON.

    python bench/generate.py [--preset tiny | --n-layer 4 --n-embd 256 ...] [--new-tokens 64] [--repeats 5]

Both sides run the identical random-weight model (lmforge checkpoint -> `lmforge export hf` ->
AutoModelForCausalLM), the same equal-length prompts, greedy, exactly `--new-tokens` new tokens
(no stop token), fp32 on the CPU (bf16 on CUDA). A third side, `lmforge_forward`, is lmforge with
its packed decoding step turned off (LMFORGE_FAST_DECODE=0: every step through the model's
forward), so one run shows what the step gains; `ops_per_step` counts the ATen calls of one step
each way. Runs are interleaved and their order alternates so drifting machine load hits all sides
alike; we report the median and the min/max of several repeats, and whether they produced the same
tokens. Time includes the prompt's prefill (short prompts: decode dominates). The machine's load
average and CPU flags are recorded: on a shared CPU, other processes (and intra-op threads spinning
against them) move the absolute numbers, the interleaving keeps the ratio fair. `quantization` adds
the bf16 (`generate --dtype bf16`) and int8/int4 decode speed and the perplexity change on a
byte-level model trained for a few seconds on standard-library source text.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cpu_flags


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(args, root: Path):
    from transformers import AutoModelForCausalLM

    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import ModelConfig
    from lmforge.export.hf import export_hf
    from lmforge.model.presets import model_config
    from lmforge.model.transformer import Transformer

    shape = dict(vocab_size=args.vocab, max_seq_len=args.ctx)
    if args.preset:
        cfg = model_config(args.preset, **shape)
    else:
        cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_kv_head=args.n_kv_head,
                          **shape)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ckpt = save_checkpoint(root / "ckpt", model)
    hf_dir = export_hf(ckpt, root / "hf")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours = model.to(device=device, dtype=dtype).eval()
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    return cfg, ckpt, ours, theirs, device


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def summary(times: list[float], tokens: int) -> dict:
    rates = sorted(tokens / t for t in times)
    return {"tokens_per_s_median": round(statistics.median(rates), 1), "tokens_per_s_min": round(rates[0], 1),
            "tokens_per_s_max": round(rates[-1], 1), "runs": len(rates)}


def bench_batch(ours, theirs, device, batch: int, args) -> dict:
    from lmforge.infer.engine import generate_ids
    from lmforge.infer.sampling import SamplingParams

    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, args.vocab, (batch, args.prompt_len), generator=gen)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, top_k=0, top_p=1.0)
    ids, mask = prompts.to(device), torch.ones_like(prompts).to(device)

    def run_ours():
        return generate_ids(ours, prompts.tolist(), params)

    def run_forward():  # lmforge without its packed decoding step (infer/decode.py): the model's forward
        os.environ["LMFORGE_FAST_DECODE"] = "0"
        try:
            return generate_ids(ours, prompts.tolist(), params)
        finally:
            del os.environ["LMFORGE_FAST_DECODE"]

    def run_theirs():
        with torch.inference_mode():
            out = theirs.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, pad_token_id=0)
        return out[:, args.prompt_len:].tolist()

    a, b, c = run_ours(), run_theirs(), run_forward()  # warm-up, and the equality check
    times: dict[str, list[float]] = {"lmforge": [], "transformers": [], "lmforge_forward": []}
    for r in range(args.repeats):
        order = [("lmforge", run_ours), ("transformers", run_theirs), ("lmforge_forward", run_forward)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(fn)[0])
    tokens = batch * args.new_tokens
    out = {name: summary(ts, tokens) for name, ts in times.items()}
    rate = {name: s["tokens_per_s_median"] for name, s in out.items()}
    return {**out, "ratio_lmforge_over_transformers": round(rate["lmforge"] / rate["transformers"], 3),
            "ratio_step_over_forward": round(rate["lmforge"] / rate["lmforge_forward"], 3),
            "same_tokens": a == b, "same_tokens_as_forward": a == c, "ops_per_step": ops_per_step(ours, batch)}


def ops_per_step(model, batch: int) -> dict:
    """ATen operator calls of one decoding step (views included), through the packed step and the forward."""
    from torch.profiler import profile

    from lmforge.infer.decode import decode_step
    from lmforge.infer.engine import prefill_prompts

    out = {}
    for name, fast in (("lmforge", "1"), ("lmforge_forward", "0")):
        os.environ["LMFORGE_FAST_DECODE"] = fast
        try:
            with torch.inference_mode():
                cache, logits, _, _ = prefill_prompts(model, [[1, 2, 3]] * batch, 8, False)
                step = decode_step(model)
                ids, pos = logits.argmax(-1, keepdim=True), torch.full((batch, 1), 3, device=logits.device)
                step(ids, pos, cache)  # the first step at a row count times the layouts (Linear)
                with profile() as prof:
                    step(ids, pos + 1, cache)
        finally:
            del os.environ["LMFORGE_FAST_DECODE"]
        out[name] = sum(e.count for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::")))
    return out


def quant_decode(cfg, ckpt, device, args) -> dict:
    from lmforge.checkpoint import load_model
    from lmforge.infer.engine import generate_ids
    from lmforge.infer.quant import quantize_model, weight_bytes
    from lmforge.infer.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, top_k=0, top_p=1.0)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
    out = {}
    for mode in ("fp32", "bf16", "int8", "int4"):
        model = load_model(ckpt)
        if mode in ("int8", "int4"):
            quantize_model(model, mode)
        model = model.to(device, dtype=torch.bfloat16 if mode == "bf16" else None)
        generate_ids(model, prompt, params)
        times = [timed(lambda m=model: generate_ids(m, prompt, params))[0] for _ in range(args.repeats)]
        out[mode] = {**summary(times, args.new_tokens), "weight_mb": round(weight_bytes(model) / 1e6, 2)}
    return out


def quant_perplexity(steps: int) -> dict:
    """Train a small byte-level model on argparse.py's source, measure on textwrap.py's."""
    import importlib

    from lmforge.config import ModelConfig
    from lmforge.infer.quant import quantize_model
    from lmforge.model.transformer import Transformer

    source = lambda name: inspect.getsource(importlib.import_module(name)).encode("utf-8")
    data = torch.tensor(list(source("argparse")))
    held = torch.tensor(list(source("textwrap")[:16_000]))
    cfg = ModelConfig(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, vocab_size=256, max_seq_len=128)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 129, (16,), generator=gen)
        batch = torch.stack([data[s:s + 129] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def ppl(m) -> float:
        n = (len(held) - 1) // 128 * 128
        with torch.no_grad():
            logits = m.eval()(held[:n].view(-1, 128))
        return math.exp(F.cross_entropy(logits.float().flatten(0, 1), held[1:n + 1]).item())

    out = {"fp32": round(ppl(model), 4)}
    for mode in ("bf16", "int8", "int4"):
        m = Transformer(cfg)
        m.load_state_dict(state)
        out[mode] = round(ppl(m.to(torch.bfloat16) if mode == "bf16" else quantize_model(m, mode)), 4)
        out[f"{mode}_change_pct"] = round(100 * (out[mode] / out["fp32"] - 1), 3)
    out["setup"] = f"byte-level 2x128 model, {steps} AdamW steps on argparse.py, measured on textwrap.py"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="", help="a model preset (tiny, small, ...); else the shape flags")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-kv-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for both sides (0: torch's default). 1 by default: at this size "
                         "a second thread gains nothing, and on a busy 2-core machine spinning threads made "
                         "decode 10x slower for both")
    ap.add_argument("--ppl-steps", type=int, default=200, help="0 skips the perplexity part")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        cfg, ckpt, ours, theirs, device = build(args, Path(tmp))
        result = {
            "bench": "generate",
            "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                      "n_kv_head": cfg.n_kv_head or cfg.n_head, "vocab": cfg.vocab_size,
                      "params_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2)},
            "setup": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                      "greedy": True, "device": str(device), "dtype": str(next(ours.parameters()).dtype),
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "python": platform.python_version(),
                      "cpu_flags": cpu_flags(),
                      "load_average_at_start": round(os.getloadavg()[0], 2)},
        }
        for b in (int(x) for x in args.batch_sizes.split(",")):
            log(f"batch {b} ...")
            result[f"batch_{b}"] = bench_batch(ours, theirs, device, b, args)
        log("quantized decode ...")
        quant = {"decode_batch_1": quant_decode(cfg, ckpt, device, args)}
        if args.ppl_steps:
            log("perplexity of a trained byte-level model ...")
            quant["perplexity"] = quant_perplexity(args.ppl_steps)
        result["quantization"] = quant
        result["setup"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
