"""Encoder-decoder objectives on the one training loop: T5 span corruption (pretraining a t5 model on
prepared shards) and sequence-to-sequence fine-tuning (`lmforge seq2seq`, {"source","target"} JSONL).

Both losses are sums over target tokens (the unit), computed by the model's forward, so the loop's
accumulation, DDP / FSDP, clipping, checkpoints and exact resume are the decoder's. Tokens/s counts
source and target tokens, padding left out.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lmforge.config import Config
from lmforge.console import log
from lmforge.data.loader import TokenWindows
from lmforge.data.spans import Seq2SeqBatches, SpanBatches, corrupted_lengths, encode_seq2seq
from lmforge.errors import LmforgeError
from lmforge.eval.seq2seq import exact_match, target_loss
from lmforge.model.loss import IGNORE
from lmforge.train.dist import all_reduce_slices
from lmforge.train.objectives import Objective, _inner
from lmforge.train.sft import finish, load_split, prepare_stage


class SpanObjective(Objective):
    """T5 span corruption of the prepared token windows (lmforge.data.spans); the unit is a target token."""

    name = "span"

    def __init__(self, data_dir: str | Path, seq_len: int, micro_batch: int, seed: int, noise_density: float,
                 mean_span: float, sentinels: list[int], eos: int, loss_chunk: int = 0, eval_batches: int = 20):
        self.data_dir = Path(data_dir)
        self.micro_batch, self.seed, self.loss_chunk, self.eval_batches = micro_batch, seed, loss_chunk, eval_batches
        self.args = (noise_density, mean_span, sentinels, eos)
        self.train = TokenWindows(self.data_dir / "train", seq_len)
        val_dir = self.data_dir / "val"
        self.val = TokenWindows(val_dir, seq_len) if (val_dir / "manifest.json").is_file() else None
        src, tgt = corrupted_lengths(seq_len, noise_density, mean_span)
        log(f"span corruption: windows of {seq_len} tokens -> {src} encoder and {tgt} decoder tokens")

    def setup(self, model, device, rank, world, accum):
        self.device, self.rank, self.world = device, rank, world
        self.use_stream(SpanBatches(self.train, *self.args, self.micro_batch, accum, rank, world, self.seed))

    def next_batches(self, model):
        return [(x.to(self.device), y.to(self.device)) for x, y in self.stream.next_step()]

    def count(self, batch) -> float:
        return float(batch[1].numel())

    def tokens(self, batch) -> float:
        return float(batch[0].numel() + batch[1].numel())

    def loss(self, model, batch):
        loss = model(batch[0], labels=batch[1], loss_chunk=self.loss_chunk)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model):
        if self.val is None:
            return {}
        m = _inner(model)
        # A fixed corruption of the first windows (epoch 0 of the validation seed), the same at every pass.
        stream = SpanBatches(self.val, *self.args, self.micro_batch, 1, 0, 1, self.seed)
        n = min(len(self.val), self.eval_batches * self.micro_batch)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(self.rank * self.micro_batch, n, self.world * self.micro_batch):
            x, y = stream.collate(range(i, min(i + self.micro_batch, n)), 0)
            total[0] += m(x.to(self.device), labels=y.to(self.device), loss_chunk=self.loss_chunk).double()
            total[1] += y.numel()
        all_reduce_slices(total, self.world)
        loss = (total[0] / total[1].clamp_min(1)).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


class Seq2SeqObjective(Objective):
    """Cross-entropy of the target given the source; the unit is a target token."""

    name = "seq2seq"

    def __init__(self, examples, val_examples, pad_id: int, micro_batch: int, seed: int, loss_chunk: int = 0,
                 exact_match=None):
        self.examples, self.val_examples, self.pad_id = examples, val_examples, pad_id
        self.micro_batch, self.seed, self.loss_chunk = micro_batch, seed, loss_chunk
        self.exact_match = exact_match  # model -> held-out exact match, beside the validation loss

    def setup(self, model, device, rank, world, accum):
        self.device, self.rank, self.world = device, rank, world
        self.use_stream(Seq2SeqBatches(self.examples, self.pad_id, self.micro_batch, accum, rank, world, self.seed))

    def next_batches(self, model):
        return [{k: v.to(self.device) for k, v in b.items()} for b in self.stream.next_step()]

    def count(self, batch) -> float:
        return float((batch["labels"] != IGNORE).sum())

    def tokens(self, batch) -> float:
        return float(batch["attention_mask"].sum() + (batch["labels"] != IGNORE).sum())

    def loss(self, model, batch):
        loss = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                     loss_chunk=self.loss_chunk)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model):
        if not self.val_examples:
            return {}
        m = _inner(model)
        total = target_loss(m, self.val_examples, self.pad_id, self.micro_batch, self.device,
                            self.rank, self.world, self.loss_chunk)
        loss = (total[0] / total[1].clamp_min(1)).item()
        out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if self.exact_match is not None:
            out["val_exact_match"] = self.exact_match(m)
        return out


def run_seq2seq(cfg: Config):
    from lmforge.train.loop import train

    if cfg.seq2seq.init_from == "scratch":
        st, model = _scratch_stage(cfg)
    else:
        st = prepare_stage(cfg, "seq2seq")
        model = st.load_policy()  # refuses a decoder-only checkpoint
    sc, tc = st.cfg.seq2seq, st.cfg.train
    src_len, tgt_len = sc.source_len or tc.seq_len, sc.target_len or tc.seq_len
    train_records, val_records = load_split(sc.data, sc.val_data, sc.val_fraction, "seq2seq examples")
    examples = encode_seq2seq(st.tok, train_records, src_len, tgt_len)
    val_examples = encode_seq2seq(st.tok, val_records, src_len, tgt_len)
    log(f"seq2seq: {len(examples)} examples ({sum(len(t) for _, t in examples):,} target tokens), "
        f"{len(val_examples)} held out")
    em = None
    if val_records:
        held = val_records[:200]  # greedy decoding is the slow part of an evaluation: a fixed sample
        em = lambda m: exact_match(m, st.tok, held, src_len, tgt_len)  # noqa: E731
    objective = Seq2SeqObjective(examples, val_examples, st.tok.eot_id, tc.micro_batch, st.cfg.seed,
                                 tc.loss_chunk, em)
    result = train(st.cfg, model, objective, st.out_dir, tokenizer_dir=st.tok_dir)
    return finish("seq2seq", result)


def _scratch_stage(cfg: Config):
    """seq2seq.init_from=scratch: a fresh model.* (arch t5) with the run's tokenizer."""
    from lmforge.model.spec import build_model
    from lmforge.model.transformer import padded_vocab
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.sft import Stage, stage_config

    scfg = stage_config(cfg, "seq2seq")
    for key in ("data", "val_data"):
        setattr(scfg.seq2seq, key, [p.replace("{run_dir}", cfg.run_dir) for p in getattr(scfg.seq2seq, key)])
    if scfg.model.arch != "t5":
        raise LmforgeError(f"seq2seq.init_from=scratch builds model.arch=t5, not model.arch={scfg.model.arch}; "
                           "set model.arch=t5 (or model.preset=t5-tiny / t5-small)")
    tok_dir = cfg.run_path / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise LmforgeError(f"seq2seq.init_from=scratch: {tok_dir}/tokenizer.json not found; run `lmforge tokenizer` "
                           "for this run_dir first")
    tok = Tokenizer.load(tok_dir)
    m = scfg.model
    m.vocab_size = m.vocab_size or padded_vocab(tok.vocab_size, m.pad_vocab_to)
    if m.vocab_size < tok.vocab_size:
        raise LmforgeError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    m.decoder_start_id = tok.eot_id if m.decoder_start_id < 0 else m.decoder_start_id
    torch.manual_seed(cfg.seed)
    model = build_model(m).train()
    log("seq2seq: starting from a fresh model")
    return Stage("seq2seq", scfg, Path("scratch"), tok, tok_dir, cfg.run_path / "seq2seq"), model


def cmd_seq2seq(argv: list[str]) -> int:
    from lmforge.cli import parse_config

    run_seq2seq(parse_config("seq2seq", argv, "Sequence-to-sequence fine-tuning of a t5 model (model.arch=t5) on "
                             "{\"source\",\"target\"} JSONL (seq2seq.data) into RUN/seq2seq/checkpoints."))
    return 0
