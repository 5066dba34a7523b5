"""Language-modelling evaluation: loss, perplexity and bits per byte.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the text rather than by
tokens, so models with different tokenizers can be compared on the same text.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lmforge.cli import parse_config
from lmforge.console import log, progress
from lmforge.errors import LmforgeError
from lmforge.infer.loading import load_for_inference
from lmforge.io import atomic_write_json


def open_checkpoint(cfg):
    """(model, tokenizer, folder) of `eval.checkpoint` (any checkpoint, LoRA adapters merged; int8/int4 with
    eval.quantize), in fp32 so the figures do not depend on the device's preferred dtype."""
    target, key = (cfg.eval.checkpoint, "eval.checkpoint") if cfg.eval.checkpoint else (cfg.run_dir, "")
    return load_for_inference(target, cfg.device, "fp32", cfg.eval.quantize or None, run_dir=cfg.run_dir, key=key)


def stage_label(ckpt: Path, run_path: Path) -> str:
    """The name an evaluation file starts with: pretrain for RUN/checkpoints/step_N, sft for RUN/sft/..."""
    if ckpt.parent.name != "checkpoints":
        return "model"
    if ckpt.parent.parent.resolve() == run_path.resolve():
        return "pretrain"
    return ckpt.parent.parent.name


@torch.no_grad()
def evaluate_tokens(model, tokens: np.ndarray, seq_len: int, batch_size: int, n_bytes: int,
                    max_batches: int = 0) -> dict:
    """Loss over consecutive windows of `tokens` (every token after the first predicted once)."""
    device = next(model.parameters()).device
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise LmforgeError(f"{len(tokens)} tokens is less than one window of {seq_len + 1}; use more text "
                           "or a smaller eval.seq_len")
    starts = list(range(0, n_windows, batch_size))
    if max_batches:
        starts = starts[:max_batches]
    total, count = 0.0, 0
    with progress("eval", len(starts)) as advance:
        for b in starts:
            rows = [tokens[i * seq_len:(i + 1) * seq_len + 1] for i in range(b, min(b + batch_size, n_windows))]
            w = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            total += model(w[:, :-1], labels=w[:, 1:]).item()
            count += w[:, 1:].numel()
            advance(1)
    loss = total / count
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    if n_bytes:
        # Bytes of the evaluated windows, pro rata when only part of the text was evaluated.
        bytes_per_token = n_bytes / max(len(tokens) - 1, 1)
        out["bits_per_byte"] = total / math.log(2) / (count * bytes_per_token)
    return out


def evaluate(cfg) -> dict:
    from lmforge.data.shards import check_tokenizer, open_shards

    if cfg.eval.tasks:  # benchmarks: lmforge.eval.suite
        from lmforge.eval.suite import run_suite

        return run_suite(cfg)
    if cfg.eval.task:  # generative task: exact-match accuracy (lmforge.eval.tasks)
        from lmforge.eval.tasks.arith import evaluate_task

        return evaluate_task(cfg)
    ec = cfg.eval
    model, tok, ckpt = open_checkpoint(cfg)
    if getattr(model, "is_encoder_decoder", False):
        from lmforge.eval.seq2seq import evaluate_seq2seq

        return evaluate_seq2seq(cfg, model, tok, ckpt, cfg.run_path / "eval" /
                                f"{stage_label(ckpt, cfg.run_path)}-{ckpt.name}-seq2seq.json")
    seq_len = ec.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise LmforgeError(f"eval.seq_len={seq_len} exceeds the model's context {model.cfg.max_seq_len}")
    if ec.files:
        from lmforge.data.sources import iter_documents

        ids: list[int] = []
        n_bytes = 0
        for doc in iter_documents(ec.files, cfg.data.text_field):
            ids.extend(tok.doc_prefix + tok.encode(doc.text))  # as prepare lays documents out
            ids.append(tok.eot_id)
            n_bytes += len(doc.text.encode("utf-8"))
        tokens = np.asarray(ids, dtype=np.int64)
        name = "files"
    else:
        split_dir = cfg.run_path / "data" / ec.split
        shards, manifest = open_shards(split_dir)
        check_tokenizer(manifest, tok)
        check_tokenizer(manifest, vocab_size=model.cfg.vocab_size)
        tokens = np.concatenate([np.asarray(s) for s in shards]) if len(shards) > 1 else np.asarray(shards[0])
        n_bytes = int(manifest.get("bytes", 0))
        name = ec.split
    result = evaluate_tokens(model, tokens, seq_len, ec.batch_size, n_bytes, ec.max_batches)
    result.update({"checkpoint": str(ckpt), "data": name, "seq_len": seq_len})
    out = cfg.run_path / "eval" / f"{stage_label(ckpt, cfg.run_path)}-{ckpt.name}-{name}.json"
    atomic_write_json(out, result)
    log(f"{name}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}"
        + (f"  bits/byte {result['bits_per_byte']:.4f}" if "bits_per_byte" in result else "")
        + f"  ({result['tokens']} tokens) -> {out}")
    return result


def cmd_eval(argv: list[str]) -> int:
    if argv[:1] == ["compare"]:
        from lmforge.eval.suite import cmd_compare

        return cmd_compare(argv[1:])
    if argv[:1] == ["harness"]:
        from lmforge.eval.harness import cmd_harness

        return cmd_harness(argv[1:])
    if argv[:1] == ["contamination"]:
        from lmforge.eval.contamination import report

        report(parse_config("eval", argv[1:], "The share of each benchmark's examples (eval.tasks) whose "
                            "eval.ngram-token windows occur in the run's training shards, with the flagged examples."))
        return 0
    evaluate(parse_config("eval", argv, "Loss, perplexity and bits-per-byte of a checkpoint on a prepared "
                          "split (eval.split=val) or text files (eval.files=...); benchmarks with "
                          "eval.tasks=[family:path, ...]; `eval compare A B` sets two benchmark results side by "
                          "side; `eval contamination eval.tasks=[...]` measures how much of each benchmark the "
                          "training data holds; `eval harness TASKS` runs lm-evaluation-harness on the checkpoint."))
    return 0
