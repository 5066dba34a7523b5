"""`lmforge dpo`: direct preference optimisation on (prompt, chosen, rejected) pairs.

With h = [log pi(chosen) - log ref(chosen)] - [log pi(rejected) - log ref(rejected)] (sums over
the reply's tokens, the <|im_end|> included), the per-pair losses are

    sigmoid  -log sigmoid(beta * h)            (Rafailov et al. 2023)
    hinge    max(0, 1 - beta * h)              (SLiC / RSO)
    ipo      (h - 1 / (2 beta))^2              (Azar et al. 2023; log-probs averaged per token, as TRL does)

`dpo.sft_coef` adds that weight times the chosen reply's mean per-token negative log-likelihood (RPO,
Pang et al. 2024; TRL's `rpo_alpha`): the preference term alone may lower the chosen reply's
probability as long as the rejected one falls faster, which shows as worse greedy answers.

The reference is the starting policy, kept one of three ways: a frozen copy (`copy`), its
log-probabilities computed once before training so no second model stays in memory
(`precomputed`), or, with LoRA, the same network with the adapters switched off (`adapters`).
`auto` picks adapters under LoRA and precomputed otherwise.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import Config, DPOConfig
from lmforge.console import log
from lmforge.errors import LmforgeError
from lmforge.model.loss import IGNORE
from lmforge.train.objectives import Objective, right_padded_tokens


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, kind: str = "sigmoid") -> Tensor:
    """Per-pair DPO losses from sequence log-probabilities."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "sigmoid":
        return -F.logsigmoid(beta * h)
    if kind == "hinge":
        return torch.relu(1.0 - beta * h)
    if kind == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    allowed = typing.get_args(typing.get_type_hints(DPOConfig)["loss"])  # config.py checks it at load
    raise LmforgeError(f"dpo.loss: '{kind}' is not one of {', '.join(allowed)}")


def encode_pairs(tok, records, seq_len: int) -> list[tuple]:
    """(chosen inputs, chosen targets, rejected inputs, rejected targets) per record."""
    from lmforge.data.chat import preference_messages, render_conversation, shift

    out = []
    for r in records:
        prompt, chosen, rejected = preference_messages(r)
        c = shift(*render_conversation(tok, prompt + chosen, seq_len + 1, r.where))
        j = shift(*render_conversation(tok, prompt + rejected, seq_len + 1, r.where))
        out.append((*c, *j))
    return out


def drop_tied_pairs(splits: list[tuple[list, list]], tied: Callable[[Any], bool], seq_len: int) -> list[list]:
    """Each split's encoded pairs without those whose chosen and rejected are the same tokens.

    splits: (encoded pairs, their records) per split, e.g. train and val; tied(pair) says whether
    a pair's two sides are equal. Such a pair gives both sides one log-probability: it teaches
    nothing and, in a batch of them, holds the loss at its starting value. A file whose pairs are
    all tied is a mistake (the same field read twice, a broken export) and stops with an error;
    a few are dropped with a warning that counts them and names the first.
    """
    files: dict[str, list] = {}  # file -> [pairs, tied, (line, where) of the first tied]
    kept = []
    for pairs, records in splits:
        out = []
        for pair, rec in zip(pairs, records):
            file, _, line = rec.where.rpartition(":")
            stats = files.setdefault(file or rec.where, [0, 0, None])
            stats[0] += 1
            if tied(pair):
                stats[1] += 1
                at = (int(line) if line.isdigit() else 0, rec.where)
                stats[2] = min(stats[2], at) if stats[2] else at
            else:
                out.append(pair)
        kept.append(out)
    why = f"the same text, or texts that differ only after train.seq_len={seq_len} tokens"
    for file, (n, n_tied, first) in files.items():
        if n_tied == n:
            raise LmforgeError(f"{file}: all {n} preference pairs have 'chosen' equal to 'rejected' ({why}; first at "
                               f"{first[1]}): such pairs teach nothing. Check which fields hold the two replies")
        if n_tied:
            log(f"[yellow]warning:[/] {file}: {n_tied} of {n} preference pairs have 'chosen' equal to 'rejected' "
                f"({why}; first at {first[1]}); they teach nothing and are left out")
    if splits[0][0] and not kept[0]:
        raise LmforgeError(f"every training pair has 'chosen' equal to 'rejected' ({why}): nothing to learn from")
    return kept


class DPOObjective(Objective):
    """A micro-batch is `micro_batch` pairs, run as one (2B, T) forward; the unit is one pair."""

    name = "dpo"

    def __init__(self, pairs, val_pairs, micro_batch: int, seed: int, pad_id: int, beta: float, loss: str,
                 reference: str, sft_coef: float = 0.0):
        # loss, reference, beta and sft_coef were checked when the config loaded; `reference` comes
        # resolved (run_dpo decides what "auto" means).
        self.sft_coef = sft_coef
        self.pairs, self.val_pairs = pairs, val_pairs
        self.micro_batch, self.seed, self.pad_id = micro_batch, seed, pad_id
        self.beta, self.kind, self.reference = beta, loss, reference
        self.ref_model: nn.Module | None = None
        self.ref_logps: dict[str, Tensor] = {}

    # --- reference ----------------------------------------------------------------------------
    def setup(self, model, device, rank, world, accum):
        from lmforge.checkpoint import unwrap
        from lmforge.data.chat import IndexBatches

        self.device, self.rank, self.world = device, rank, world
        self.use_stream(IndexBatches(len(self.pairs), self.micro_batch, accum, rank, world, self.seed, "pairs"))
        inner = unwrap(model)
        if self.reference == "adapters" and not hasattr(inner, "disable_adapter"):
            raise LmforgeError("dpo.reference=adapters needs LoRA (dpo.lora.enabled=true)")
        if self.reference == "copy":
            self.ref_model = copy.deepcopy(inner).eval().requires_grad_(False)
        elif self.reference == "precomputed":
            # Called before a resume loads trained weights: `model` is still the starting policy.
            was = inner.training
            inner.eval()
            self.ref_logps = {"train": self._all_logps(inner, self.pairs),
                              "val": self._all_logps(inner, self.val_pairs)}
            inner.train(was)
            log(f"dpo: reference log-probabilities precomputed for {len(self.pairs)} + {len(self.val_pairs)} pairs")

    @torch.no_grad()
    def _all_logps(self, model: nn.Module, pairs) -> Tensor:
        out = [self._logps(model, self.collate(pairs[i:i + self.micro_batch], list(range(i, i + self.micro_batch))))
               for i in range(0, len(pairs), self.micro_batch)]
        return torch.cat(out, dim=1) if out else torch.zeros(2, 0, device=self.device)

    @torch.no_grad()
    def _reference(self, model: nn.Module, batch: dict, split: str) -> Tensor:
        from lmforge.checkpoint import unwrap

        if self.reference == "precomputed":
            return self.ref_logps[split][:, batch["index"]]
        if self.reference == "copy":
            return self._logps(self.ref_model, batch)
        inner = unwrap(model)
        with inner.disable_adapter():
            return self._logps(inner, batch)

    # --- batches ------------------------------------------------------------------------------
    def collate(self, pairs, index: list[int]) -> dict[str, Tensor]:
        from lmforge.data.chat import pad_rows

        inputs = [p[0] for p in pairs] + [p[2] for p in pairs]
        targets = [p[1] for p in pairs] + [p[3] for p in pairs]
        return {"input_ids": pad_rows(inputs, self.pad_id).to(self.device),
                "targets": pad_rows(targets, IGNORE).to(self.device),
                "index": torch.tensor(index[:len(pairs)], dtype=torch.long, device=self.device)}

    def next_batches(self, model):
        return [self.collate([self.pairs[i] for i in idx], idx) for idx in self.stream.next_step()]

    def count(self, batch) -> float:
        return float(batch["index"].numel())

    def tokens(self, batch) -> float:
        return right_padded_tokens(batch["input_ids"], self.pad_id)  # chosen and rejected rows alike

    def _logps(self, model: nn.Module, batch: dict) -> Tensor:
        """(2, B) log-probabilities of [chosen; rejected] replies (per-token means for IPO)."""
        y = batch["targets"]
        lp = model(batch["input_ids"], labels=y, logprobs=True).sum(-1)
        if self.kind == "ipo":
            lp = lp / (y != IGNORE).sum(-1).clamp_min(1)
        return lp.view(2, -1)

    def _terms(self, model, batch, split: str) -> tuple[Tensor, dict[str, Tensor]]:
        policy = self._logps(model, batch)
        ref = self._reference(model, batch, split)
        losses = dpo_loss(policy[0], policy[1], ref[0], ref[1], self.beta, self.kind)
        n_chosen = (batch["targets"] != IGNORE).sum(-1).view(2, -1)[0].clamp_min(1)
        nll = -policy[0] if self.kind == "ipo" else -policy[0] / n_chosen  # per token either way
        if self.sft_coef:
            losses = losses + self.sft_coef * nll
        rc, rr = (self.beta * (policy - ref)).detach()
        metrics = {"nll/chosen": nll.detach().sum(),
                   "rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(), "rewards/margins": (rc - rr).sum(),
                   "rewards/accuracies": (rc > rr).float().sum(), "logps/chosen": policy[0].detach().sum(),
                   "logps/rejected": policy[1].detach().sum()}
        return losses.sum(), metrics

    def loss(self, model, batch):
        loss, metrics = self._terms(model, batch, "train")
        return loss, {"loss": loss.detach(), **metrics}

    @torch.no_grad()
    def evaluate(self, model):
        from lmforge.train.dist import all_reduce_slices

        if not self.val_pairs:
            return {}
        keys = ["loss", "rewards/margins", "rewards/accuracies"]
        total = torch.zeros(len(keys) + 1, dtype=torch.float64, device=self.device)
        for i in range(self.rank * self.micro_batch, len(self.val_pairs), self.world * self.micro_batch):
            chunk = self.val_pairs[i:i + self.micro_batch]
            batch = self.collate(chunk, list(range(i, i + len(chunk))))
            loss, m = self._terms(model, batch, "val")
            total += torch.stack([loss.double()] + [m[k].double() for k in keys[1:]] + [torch.tensor(
                float(len(chunk)), dtype=torch.float64, device=self.device)])
        all_reduce_slices(total, self.world)  # tensor-parallel ranks count once
        n = total[-1].clamp_min(1)
        return {f"val_{k}": (total[i] / n).item() for i, k in enumerate(keys)}


def run_dpo(cfg: Config):
    from lmforge.data.chat import preference_messages
    from lmforge.train.loop import train
    from lmforge.train.sft import chat_sampler, finish, load_split, prepare_stage

    st = prepare_stage(cfg, "dpo")
    dc, tc = st.cfg.dpo, st.cfg.train
    train_records, val_records = load_split(dc.data, dc.val_data, dc.val_fraction, "preference pairs")
    pairs = encode_pairs(st.tok, train_records, tc.seq_len)
    val_pairs = encode_pairs(st.tok, val_records, tc.seq_len)
    pairs, val_pairs = drop_tied_pairs([(pairs, train_records), (val_pairs, val_records)],
                                       lambda p: p[0] == p[2] and p[1] == p[3], tc.seq_len)
    reference = dc.reference
    if reference == "auto":
        reference = "adapters" if dc.lora.enabled else "precomputed"
    log(f"dpo: {len(pairs)} pairs, {len(val_pairs)} held out; loss {dc.loss}, beta {dc.beta}, reference {reference}"
        + (f", sft_coef {dc.sft_coef}" if dc.sft_coef else ""))
    model = st.load_policy(dc.lora)
    objective = DPOObjective(pairs, val_pairs, tc.micro_batch, st.cfg.seed, st.tok.eot_id, dc.beta, dc.loss,
                             reference, dc.sft_coef)
    prompt = preference_messages((val_records or train_records)[0])[0]
    result = train(st.cfg, model, objective, st.out_dir, tokenizer_dir=st.tok_dir,
                   sample_fn=chat_sampler(st.tok, prompt))
    return finish("dpo", result)


def cmd_dpo(argv: list[str]) -> int:
    from lmforge.cli import parse_config

    run_dpo(parse_config("dpo", argv, "Direct preference optimisation (dpo.loss=sigmoid|"
                         "ipo|hinge) on preference pairs (dpo.data) into RUN/dpo/checkpoints."))
    return 0
