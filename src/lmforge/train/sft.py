"""`lmforge sft`: supervised fine-tuning on chat examples, and the plumbing every post-training stage shares.

A post-training stage (SFT, DPO, RM, GRPO) is: the run config with the stage's own `train`
overrides, a starting checkpoint (`<stage>.init_from`), the tokenizer saved beside it, a policy
(full weights, or LoRA/QLoRA adapters on a frozen base), an objective, and a call to the one
training loop with RUN/<stage> as its output folder. `prepare_stage` does the first four here so
each stage module holds only its data format, its batches and its loss.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoint import latest_checkpoint, resolve_checkpoint, stage_checkpoints
from lmforge.config import Config, LoRAConfig, stage_train
from lmforge.console import log
from lmforge.errors import LmforgeError
from lmforge.model.loss import IGNORE
from lmforge.train.objectives import Objective, right_padded_tokens

# --- shared stage plumbing ---------------------------------------------------------------------

def stage_config(cfg: Config, name: str) -> Config:
    """A copy of `cfg` whose `train` section has the stage's non-empty `<name>.train` keys applied."""
    out = copy.deepcopy(cfg)
    out.train = stage_train(cfg, name)  # the merge config.validate checked when the config loaded
    return out


def expand(cfg: Config, paths: list[str]) -> list[str]:
    """Data paths with `{run_dir}` replaced, so a recipe can name files a stage wrote into its run."""
    return [p.replace("{run_dir}", cfg.run_dir) for p in paths]


def resolve_init(cfg: Config, name: str, value: str) -> Path:
    """`<name>.init_from`: a checkpoint folder, a run or stage folder (its latest checkpoint), a stage name of
    this run (pretrain, sft, dpo, rm, grpo), or "" for the run's latest pretraining checkpoint."""
    return resolve_checkpoint(value, cfg.run_dir, key=f"{name}.init_from")


@dataclass
class Stage:
    """What a post-training stage starts from."""

    name: str
    cfg: Config  # the run config with this stage's train overrides applied
    init: Path
    tok: object  # lmforge.tokenizer.Tokenizer
    tok_dir: Path
    out_dir: Path

    def load_policy(self, lora: LoRAConfig | None = None) -> nn.Module:
        """The model to train: the init checkpoint's weights, LoRA-wrapped when lora.enabled."""
        from lmforge.train.lora import apply_lora, is_adapter_checkpoint, load_any

        if lora is not None and lora.enabled and is_adapter_checkpoint(self.init):
            raise LmforgeError(f"{self.name}.init_from={self.init} is a LoRA checkpoint; new adapters need a plain "
                               f"base: `lmforge merge {self.init} OUT`, then start from OUT")
        model = load_any(self.init).train()
        if getattr(model, "is_encoder_decoder", False) != (self.name == "seq2seq"):
            raise LmforgeError(f"{self.name}.init_from={self.init} is model.arch={model.cfg.arch}: "
                               + ("an encoder-decoder is fine-tuned with `lmforge seq2seq` on source/target pairs; "
                                  f"{self.name} trains decoder-only models" if self.name != "seq2seq" else
                                  "seq2seq trains an encoder-decoder (model.arch=t5); use `lmforge sft` for "
                                  "decoder-only models"))
        if self.cfg.train.seq_len > model.cfg.max_seq_len:
            raise LmforgeError(f"train.seq_len={self.cfg.train.seq_len} exceeds the model's context "
                               f"{model.cfg.max_seq_len} ({self.init})")
        if model.cfg.vocab_size < self.tok.vocab_size:
            raise LmforgeError(f"{self.init}: vocab_size {model.cfg.vocab_size} is smaller than its tokenizer's "
                               f"{self.tok.vocab_size}")
        self.cfg.model = model.cfg
        if lora is not None and lora.enabled:
            torch.manual_seed(self.cfg.seed)  # adapters start the same in every run with this seed
            model = apply_lora(model, lora, self.init)
        return model


def prepare_stage(cfg: Config, name: str, folder: str = "") -> Stage:
    """folder: RUN/<folder> instead of RUN/<name> (a second run of the same stage, e.g. grpo-rm)."""
    from lmforge.tokenizer import Tokenizer

    scfg = stage_config(cfg, name)
    section = getattr(scfg, name)
    for key in ("data", "val_data"):
        if hasattr(section, key):
            setattr(section, key, expand(cfg, getattr(section, key)))
    init = resolve_init(cfg, name, getattr(cfg, name).init_from)
    tok_dir = init if (init / "tokenizer.json").is_file() else cfg.run_path / "tokenizer"
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(cfg.seed)  # a stage starts from the same RNG state whatever ran before it in this process
    log(f"{name}: starting from {init}")
    return Stage(name, scfg, init, tok, tok_dir, cfg.run_path / (folder or name))


def finish(name: str, result):
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    log(f"[bold green]{name} done[/] step {result.step}: {metrics}; checkpoint {result.checkpoint}")
    return result


def stage_done(cfg: Config, name: str, folder: str = "") -> bool:
    """True when the stage's latest checkpoint (in RUN/<folder or name>) reached its planned step count (recipes
    skip it then)."""
    found = latest_checkpoint(stage_checkpoints(cfg.run_dir, folder or name), resumable=True)
    if found is None:
        return False
    try:
        state = json.loads((found / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    tc = stage_config(cfg, name).train
    target = tc.max_steps if tc.max_minutes <= 0 else state.get("total_steps", 0)
    return bool(target) and state.get("step", 0) >= target


def chat_sampler(tok, messages: list[dict], max_new_tokens: int = 48) -> Callable[[nn.Module], str]:
    """model -> greedy reply to `messages` (greedy: no RNG is touched, so resume stays exact)."""
    from lmforge.data.chat import render_conversation

    prompt = render_conversation(tok, messages, add_generation_prompt=True)[0]

    def sample(model: nn.Module) -> str:
        from lmforge.infer.engine import default_stop_ids, generate_ids
        from lmforge.infer.sampling import SamplingParams

        was = model.training
        model.eval()
        try:
            out = generate_ids(model, [prompt], SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                               stop_ids=default_stop_ids(tok), vocab_limit=tok.vocab_size)[0]
        finally:
            model.train(was)
        return f"{messages[-1]['content']} -> {tok.decode(out, skip_special_tokens=True)}"

    return sample


# --- SFT ---------------------------------------------------------------------------------------

class SFTObjective(Objective):
    """Next-token loss on assistant tokens only; the unit is one trained token."""

    name = "sft"

    def __init__(self, examples, val_examples, seq_len: int, packing: bool, pad_id: int, micro_batch: int,
                 seed: int, loss_chunk: int = 0):
        self.examples, self.val_examples = examples, val_examples
        self.seq_len, self.packing, self.pad_id = seq_len, packing, pad_id
        self.micro_batch, self.seed, self.loss_chunk = micro_batch, seed, loss_chunk

    def setup(self, model, device, rank, world, accum):
        from lmforge.data.chat import SFTBatches

        self.device, self.rank, self.world = device, rank, world
        self.use_stream(SFTBatches(self.examples, self.seq_len, self.packing, self.pad_id, self.micro_batch,
                                   accum, rank, world, self.seed))

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def next_batches(self, model):
        return [self._to_device(self.stream.collate(rows)) for rows in self.stream.next_step()]

    def count(self, batch) -> float:
        return float((batch["targets"] != IGNORE).sum())

    def tokens(self, batch) -> float:
        if "doc_ids" in batch:  # packed: padding is the positions of no document
            return float((batch["doc_ids"] >= 0).sum())
        return right_padded_tokens(batch["input_ids"], self.pad_id)

    def _loss(self, model, batch):
        return model(batch["input_ids"], labels=batch["targets"], positions=batch.get("positions"),
                     doc_ids=batch.get("doc_ids"), loss_chunk=self.loss_chunk)

    def loss(self, model, batch):
        loss = self._loss(model, batch)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model):
        import math

        from lmforge.data.chat import collate_sft, pack
        from lmforge.train.dist import all_reduce_slices

        if not self.val_examples:
            return {}
        order = range(len(self.val_examples))
        rows = pack(self.val_examples, order, self.seq_len) if self.packing else [[i] for i in order]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(self.rank * self.micro_batch, len(rows), self.world * self.micro_batch):
            batch = self._to_device(collate_sft(self.val_examples, rows[i:i + self.micro_batch], self.seq_len,
                                                self.packing, self.pad_id))
            total[0] += self._loss(model, batch).double()
            total[1] += self.count(batch)
        all_reduce_slices(total, self.world)  # tensor-parallel ranks count once
        loss = (total[0] / total[1].clamp_min(1)).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def encode_sft(tok, records, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) per record: rendered by `render_conversation`, cut to seq_len predictions."""
    from lmforge.data.chat import render_conversation, sft_messages, shift

    return [shift(*render_conversation(tok, sft_messages(r), seq_len + 1, r.where)) for r in records]


def load_split(data: list[str], val_data: list[str], val_fraction: float, what: str):
    from lmforge.data.chat import read_records, split_records

    if not data:
        raise LmforgeError(f"no {what}: set the stage's `data` key to .jsonl/.json files")
    records = read_records(data, what)
    if val_data:
        return records, read_records(val_data, what)
    return split_records(records, val_fraction)


def run_sft(cfg: Config):
    from lmforge.data.chat import sft_messages
    from lmforge.train.loop import train

    st = prepare_stage(cfg, "sft")
    sc, tc = st.cfg.sft, st.cfg.train
    train_records, val_records = load_split(sc.data, sc.val_data, sc.val_fraction, "SFT examples")
    examples = encode_sft(st.tok, train_records, tc.seq_len)
    val_examples = encode_sft(st.tok, val_records, tc.seq_len)
    n_tokens = sum(sum(t != IGNORE for t in ex[1]) for ex in examples)
    log(f"sft: {len(examples)} examples ({n_tokens:,} assistant tokens), {len(val_examples)} held out, "
        f"{'packed' if sc.packing else 'padded'} into rows of {tc.seq_len}")
    model = st.load_policy(sc.lora)
    objective = SFTObjective(examples, val_examples, tc.seq_len, sc.packing, st.tok.eot_id, tc.micro_batch,
                             st.cfg.seed, tc.loss_chunk)
    first = sft_messages((val_records or train_records)[0])
    prompt = first[:max(i for i, m in enumerate(first) if m["role"] == "assistant")]
    result = train(st.cfg, model, objective, st.out_dir, tokenizer_dir=st.tok_dir,
                   sample_fn=chat_sampler(st.tok, prompt) if prompt else None)
    return finish("sft", result)


def cmd_sft(argv: list[str]) -> int:
    from lmforge.cli import parse_config

    run_sft(parse_config("sft", argv, "Supervised fine-tuning (full, or LoRA/QLoRA with "
                         "sft.lora.enabled=true) on chat examples (sft.data) into RUN/sft/checkpoints."))
    return 0
