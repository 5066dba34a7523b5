"""`lmforge rm`: a reward model trained on preference pairs with the Bradley-Terry loss.

The reward model is the transformer with a scalar `score` head read at each sequence's last token,
named as transformers' LlamaForSequenceClassification names it, so its checkpoint (model.* and
score.weight, config.json with num_labels=1) loads there too. The loss for a pair is

    -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2

The margin comes from the pair's "margin" field when present (Llama 2's graded preferences), else
`rm.margin`; the centring term (TRL's center_rewards_coefficient) keeps rewards near zero, which
makes them usable as GRPO rewards without a separate normalisation.

`rm.score=likelihood` adds to the head's score the reply's summed token log-probs under the model's own
LM head: a verifier that reads every token of the reply, not only the state at its end. Started from
the SFT policy, it begins as that policy's judgement of the reply (on the demo's sums, where a wrong
digit is a token the policy finds unlikely) and Bradley-Terry training sharpens it. Such a checkpoint
keeps its LM head; transformers' sequence-classification class reads only the last-token part.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import Config, ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.loss import IGNORE, token_logprobs
from lmforge.model.transformer import Transformer
from lmforge.train.objectives import Objective


class RewardModel(Transformer):
    """Transformer + `score` Linear(n_embd, 1) on the last token of each sequence (+ the reply's log-likelihood
    when `likelihood`)."""

    def __init__(self, cfg: ModelConfig, pad_id: int = 0, likelihood: bool = False):
        super().__init__(cfg)
        self.pad_id, self.likelihood = pad_id, likelihood
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, 0.0, cfg.init_std)

    @classmethod
    def from_policy(cls, policy: Transformer, pad_id: int, likelihood: bool = False) -> RewardModel:
        torch.manual_seed(0)  # the head's init does not depend on the run's RNG position
        rm = cls(policy.cfg, pad_id, likelihood)
        rm.load_state_dict(policy.state_dict(), strict=False)
        if not policy.cfg.tie_embeddings and not likelihood:  # the LM head is unused: frozen, DDP expects no grad
            rm.lm_head.weight.requires_grad_(False)
        return rm.to(next(policy.parameters()).device)

    def flops_per_token(self, seq_len: int) -> float:
        """The LM head runs only for a likelihood score (the score head reads one position per row)."""
        return super().flops_per_token(seq_len) - (0 if self.likelihood else 6 * self.lm_head.weight.numel())

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None, reply_labels: Tensor | None = None,
                **kw) -> Tensor:
        """With lengths: (B,) scores of right-padded sequences, read at each one's last real token; a likelihood
        model adds sum_t log p(reply_labels[t]) (see `reply_labels`).

        The score head runs inside forward, like the LM loss, so that under FSDP its weight is whole.
        """
        if lengths is None:
            return super().forward(input_ids, **kw)
        h = super().forward(input_ids, return_hidden=True)
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        score = self.score(last).squeeze(-1).float()
        if self.likelihood:
            if reply_labels is None:
                raise LmforgeError("a likelihood reward model scores the reply's tokens: pass reply_labels")
            score = score + token_logprobs(self, h, reply_labels).sum(1)
        return score

    def rewards(self, input_ids: Tensor, lengths: Tensor, reply_labels: Tensor | None = None) -> Tensor:
        """(B,) scores of right-padded sequences, read at each one's last real token."""
        return self(input_ids, lengths=lengths, reply_labels=reply_labels)

    def save_weights(self, folder: Path, state: dict | None = None) -> None:
        """state: the whole state dict when the caller gathered it (FSDP shards it otherwise)."""
        from safetensors.torch import save_file

        from lmforge.checkpoint import hf_config, model_state
        from lmforge.io import atomic_write_json

        keep_head = self.likelihood and not self.cfg.tie_embeddings
        sd = {k: v for k, v in model_state(self, state).items() if keep_head or not k.startswith("lm_head.")}
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        hf = hf_config(self.cfg)
        if "architectures" in hf:
            hf["architectures"] = [hf["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
        hf.update({"num_labels": 1, "pad_token_id": self.pad_id, "lmforge_reward_model": True,
                   "lmforge_reward_score": "likelihood" if self.likelihood else "last"})
        hf.pop("tie_word_embeddings", None)
        atomic_write_json(folder / "config.json", hf)

    def load_weights(self, folder: Path) -> None:
        from safetensors.torch import load_file

        file = Path(folder) / "model.safetensors"
        if not is_reward_checkpoint(folder):
            raise LmforgeError(f"{folder} is not a reward-model checkpoint (written by `lmforge rm`)")
        missing, unexpected = self.load_state_dict(load_file(file), strict=False)
        missing = [k for k in missing if not k.startswith("lm_head.")]
        if missing or unexpected:
            raise LmforgeError(f"{file}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def is_reward_checkpoint(folder: str | Path) -> bool:
    import json

    cfg = Path(folder) / "config.json"
    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("lmforge_reward_model"))
    except (OSError, ValueError):
        return False


def load_reward_model(folder: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    import json

    from lmforge.checkpoint import read_model_config

    folder = Path(folder)
    if not is_reward_checkpoint(folder):
        raise LmforgeError(f"{folder} is not a reward-model checkpoint (train one with `lmforge rm`)")
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    likelihood = hf.get("lmforge_reward_score") == "likelihood"
    rm = RewardModel(read_model_config(folder), hf.get("pad_token_id", 0), likelihood)
    rm.load_weights(folder)
    return rm.to(device).eval()


def bradley_terry(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float = 0.0,
                  center_coef: float = 0.0) -> Tensor:
    """Per-pair loss -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss


def reply_labels(ids: list[int], mask: list[int]) -> list[int]:
    """Per position, the next token where it is reply text (the renderer's mask), else IGNORE: the tokens a
    likelihood score sums log p over."""
    return [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])] + [IGNORE]


def encode_pairs(tok, records, max_len: int, default_margin: float) -> list[tuple]:
    """(chosen ids, rejected ids, margin, chosen reply labels, rejected reply labels) per preference record,
    rendered by the one chat renderer."""
    from lmforge.data.chat import preference_messages, render_conversation

    out = []
    for r in records:
        prompt, chosen, rejected = preference_messages(r)
        c, cm = render_conversation(tok, prompt + chosen, max_len, r.where)
        j, jm = render_conversation(tok, prompt + rejected, max_len, r.where)
        margin = r.data.get("margin", default_margin)
        if not isinstance(margin, int | float) or isinstance(margin, bool):
            raise LmforgeError(f"{r.where}: field 'margin' must be a number, got {margin!r}")
        out.append((c, j, float(margin), reply_labels(c, cm), reply_labels(j, jm)))
    return out


class RewardObjective(Objective):
    """Bradley-Terry pairs: a micro-batch is `micro_batch` pairs; the unit is one pair."""

    name = "reward"

    def __init__(self, pairs, val_pairs, micro_batch: int, seed: int, pad_id: int, center_coef: float):
        self.pairs, self.val_pairs = pairs, val_pairs
        self.micro_batch, self.seed, self.pad_id, self.center_coef = micro_batch, seed, pad_id, center_coef

    def setup(self, model, device, rank, world, accum):
        from lmforge.data.chat import IndexBatches

        self.device, self.rank, self.world = device, rank, world
        self.use_stream(IndexBatches(len(self.pairs), self.micro_batch, accum, rank, world, self.seed, "pairs"))

    def collate(self, pairs) -> dict[str, Tensor]:
        from lmforge.data.chat import pad_rows

        rows = [p[0] for p in pairs] + [p[1] for p in pairs]
        labels = [p[3] for p in pairs] + [p[4] for p in pairs]
        return {"input_ids": pad_rows(rows, self.pad_id).to(self.device),
                "lengths": torch.tensor([len(r) for r in rows], device=self.device),
                "reply_labels": pad_rows(labels, IGNORE).to(self.device),
                "margin": torch.tensor([p[2] for p in pairs], device=self.device)}

    def next_batches(self, model):
        return [self.collate([self.pairs[i] for i in idx]) for idx in self.stream.next_step()]

    def count(self, batch) -> float:
        return float(batch["margin"].numel())

    def tokens(self, batch) -> float:
        return float(batch["lengths"].sum())  # chosen and rejected rows alike

    def scores(self, model, batch) -> tuple[Tensor, Tensor]:
        # Through the DDP / FSDP wrapper, for its hooks; a last-token model ignores the reply labels.
        r = model(batch["input_ids"], lengths=batch["lengths"], reply_labels=batch["reply_labels"])
        n = r.shape[0] // 2
        return r[:n], r[n:]

    def loss(self, model, batch):
        rc, rr = self.scores(model, batch)
        per_pair = bradley_terry(rc, rr, batch["margin"], self.center_coef)
        loss = per_pair.sum()
        return loss, {"loss": loss.detach(), "accuracy": (rc > rr).float().sum().detach(),
                      "rewards/chosen": rc.detach().sum(), "rewards/rejected": rr.detach().sum(),
                      "rewards/margins": (rc - rr).detach().sum()}

    @torch.no_grad()
    def evaluate(self, model):
        from lmforge.train.dist import all_reduce_slices

        if not self.val_pairs:
            return {}
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        idx = list(range(self.rank * self.micro_batch, len(self.val_pairs), self.world * self.micro_batch))
        for i in idx:
            batch = self.collate(self.val_pairs[i:i + self.micro_batch])
            rc, rr = self.scores(model, batch)
            total[0] += bradley_terry(rc, rr, batch["margin"], self.center_coef).sum().double()
            total[1] += (rc > rr).sum().double()
            total[2] += rc.shape[0]
        all_reduce_slices(total, self.world)  # tensor-parallel ranks count once
        n = total[2].clamp_min(1)
        return {"val_loss": (total[0] / n).item(), "val_accuracy": (total[1] / n).item(), "val_pairs": int(n)}


def run_rm(cfg: Config):
    from lmforge.data.chat import read_records, split_records
    from lmforge.io import atomic_write_json
    from lmforge.train.dpo import drop_tied_pairs
    from lmforge.train.loop import train
    from lmforge.train.sft import finish, prepare_stage

    st = prepare_stage(cfg, "rm")
    rc = st.cfg.rm
    records = read_records(rc.data, "preference pairs")
    val = read_records(rc.val_data, "preference pairs") if rc.val_data else []
    train_records, held = split_records(records, 0.0 if rc.val_data else rc.val_fraction)
    val = val or held
    seq = st.cfg.train.seq_len
    pairs = encode_pairs(st.tok, train_records, seq, rc.margin)
    val_pairs = encode_pairs(st.tok, val, seq, rc.margin)
    pairs, val_pairs = drop_tied_pairs([(pairs, train_records), (val_pairs, val)], lambda p: p[0] == p[1], seq)
    policy = st.load_policy()
    torch.manual_seed(st.cfg.seed)
    model = RewardModel.from_policy(policy, st.tok.eot_id, rc.score == "likelihood").train()
    del policy
    objective = RewardObjective(pairs, val_pairs, st.cfg.train.micro_batch, st.cfg.seed, st.tok.eot_id,
                                rc.center_coef)
    result = train(st.cfg, model, objective, st.out_dir, tokenizer_dir=st.tok_dir)
    if result.checkpoint is not None and "val_accuracy" in result.metrics:
        out = cfg.run_path / "eval" / f"rm-{result.checkpoint.name}-pairs.json"
        atomic_write_json(out, {**result.metrics, "checkpoint": str(result.checkpoint)})
    return finish("rm", result)


def cmd_rm(argv: list[str]) -> int:
    from lmforge.cli import parse_config

    run_rm(parse_config("rm", argv, "Train a reward model (Bradley-Terry) on "
                        "preference pairs (rm.data) into RUN/rm/checkpoints."))
    return 0


class ModelReward:
    """A trained reward model as a GRPO reward function (scores prompt + completion)."""

    def __init__(self, folder: str | Path, tok, device: torch.device, batch_size: int = 16):
        self.model = load_reward_model(folder, device)
        self.tok, self.device, self.batch_size = tok, device, batch_size

    @torch.no_grad()
    def __call__(self, completions: list[str], examples: list[dict], *, prompts: list, **info) -> list[float]:
        from lmforge.data.chat import pad_rows, render_conversation

        max_len = self.model.cfg.max_seq_len
        rendered = [render_conversation(self.tok, p + [{"role": "assistant", "content": c}], max_len, "completion")
                    for p, c in zip(prompts, completions)]
        out: list[float] = []
        for i in range(0, len(rendered), self.batch_size):
            chunk = rendered[i:i + self.batch_size]
            ids = pad_rows([r[0] for r in chunk], self.model.pad_id).to(self.device)
            lengths = torch.tensor([len(r[0]) for r in chunk], device=self.device)
            labels = pad_rows([reply_labels(*r) for r in chunk], IGNORE).to(self.device)
            out += self.model.rewards(ids, lengths, labels).tolist()
        return [v if math.isfinite(v) else 0.0 for v in out]
