"""Evaluation of an encoder-decoder (model.arch=t5) on {"source","target"} examples: the loss of the targets
given their sources, and exact match of greedy outputs; `lmforge eval eval.files=[x.jsonl]` on a t5 checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lmforge.console import log
from lmforge.data.chat import read_records
from lmforge.data.spans import collate_seq2seq, encode_seq2seq, seq2seq_fields, source_ids
from lmforge.errors import LmforgeError
from lmforge.infer.engine import generate_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.io import atomic_write_json
from lmforge.model.loss import IGNORE
from lmforge.train.dist import all_reduce_slices


def target_loss(model, examples, pad_id: int, batch: int, device, rank: int = 0, world: int = 1,
                loss_chunk: int = 0) -> torch.Tensor:
    """(summed target-token loss, target tokens) over `examples`, every rank its share, reduced."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(rank * batch, len(examples), world * batch):
        b = {k: v.to(device) for k, v in collate_seq2seq(examples, range(i, min(i + batch, len(examples))),
                                                         pad_id).items()}
        total[0] += model(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"],
                          loss_chunk=loss_chunk).double()
        total[1] += (b["labels"] != IGNORE).sum()
    all_reduce_slices(total, world)
    return total


def exact_match(model, tok, records, source_len: int, max_new_tokens: int, batch: int = 32) -> float:
    """Fraction of records whose greedy output, special tokens dropped and stripped, equals the target."""
    was = model.training
    model.eval()
    hits = 0
    try:
        for i in range(0, len(records), batch):
            chunk = records[i:i + batch]
            pairs = [seq2seq_fields(r) for r in chunk]
            prompts = [source_ids(tok, s, source_len) for s, _ in pairs]
            outs = generate_ids(model, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                                stop_ids={tok.eot_id}, vocab_limit=tok.vocab_size)
            hits += sum(tok.decode(o, skip_special_tokens=True).strip() == t.strip()
                        for o, (_, t) in zip(outs, pairs))
    finally:
        model.train(was)
    return hits / max(len(records), 1)


def evaluate_seq2seq(cfg, model, tok, ckpt: Path, out: Path) -> dict:
    """eval.files of seq2seq examples -> target loss, perplexity and exact match, written to `out`."""
    ec = cfg.eval
    if not ec.files:
        raise LmforgeError(f"{ckpt} is an encoder-decoder (model.arch=t5): evaluate it on seq2seq examples, "
                           "eval.files=[examples.jsonl] of {\"source\", \"target\"} records (a prepared split "
                           "holds no sources and targets)")
    records = read_records(ec.files, "seq2seq examples")
    length = ec.seq_len or model.cfg.max_seq_len
    if ec.max_batches:
        records = records[:ec.max_batches * ec.batch_size]
    device = next(model.parameters()).device
    total = target_loss(model, encode_seq2seq(tok, records, length, length), tok.eot_id, ec.batch_size, device)
    loss = (total[0] / total[1].clamp_min(1)).item()
    em = exact_match(model, tok, records, length, cfg.generate.max_new_tokens, ec.batch_size)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "exact_match": em,
              "examples": len(records), "tokens": int(total[1]), "checkpoint": str(ckpt), "data": "files"}
    atomic_write_json(out, result)
    log(f"seq2seq: target loss {loss:.4f}  perplexity {result['perplexity']:.2f}  exact match {em:.4f} "
        f"({len(records)} examples) -> {out}")
    return result
