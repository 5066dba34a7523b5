"""`lmforge grpo`: group relative policy optimisation with verifiable rewards.

Each step samples `group_size` completions per prompt with the engine (batched, KV-cached, one
prefill per prompt shared by its group; `rollout_tokens_per_s` in the metrics is its speed), scores
them with the configured rewards, and turns each group's rewards into advantages
A_i = (r_i - mean(r)) / (std(r) + 1e-4) (no std division for Dr. GRPO). The per-token loss is

    -min(rho * A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * KL3,
    rho = pi(t) / pi_old(t),   KL3 = exp(ref - logp) - (ref - logp) - 1   (Schulman's k3 estimator)

aggregated as `grpo` (mean over each completion's tokens, then over completions), `dapo` (mean over
all tokens of the batch) or `dr_grpo` (sum over tokens / (completions x max_new_tokens)). The loop
divides loss sums by the batch's units, so each aggregation is a choice of unit: a completion, a
token, or a completion's fixed token budget.

With `iterations` = 1 the rollouts are used for one optimizer step, pi_old is the current policy
and rho = 1 (clipping never bites; the gradient is the policy gradient). With more, the same
rollouts serve several steps and the clip keeps the update near pi_old.

Rollouts draw from a torch.Generator seeded by (seed, rollout number, rank), and rollouts pending
for later iterations are part of the checkpoint, so a resumed run samples exactly what an
uninterrupted one would have.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.config import Config, GRPOConfig
from lmforge.console import log
from lmforge.errors import LmforgeError
from lmforge.model.loss import IGNORE
from lmforge.train.objectives import Objective, right_padded_tokens
from lmforge.train.parallelize import gathered

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: Tensor, group_size: int, scale: bool, eps: float = 1e-4) -> Tensor:
    """Rewards (N,) in consecutive groups of `group_size` -> advantages relative to each group."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def k3(logp: Tensor, ref: Tensor) -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref - logp
    return torch.exp(d) - d - 1.0


def policy_loss(logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float,
                beta: float = 0.0, ref: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token losses (B, T) (zero outside mask), the clipped-token indicator and the KL term."""
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a
    per_token = -torch.min(unclipped, clipped)
    kl = k3(logp, ref) if ref is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    m = mask.float()
    return per_token * m, (clipped < unclipped).float() * m, kl * m


def aggregate(per_token: Tensor, mask: Tensor, loss_type: str) -> Tensor:
    """The loss *sum* whose unit `count_units` gives (the loop divides by the global count)."""
    if loss_type == "grpo":
        return (per_token.sum(1) / mask.sum(1).clamp_min(1)).sum()
    return per_token.sum()


def count_units(mask: Tensor, loss_type: str, max_new_tokens: int) -> float:
    if loss_type == "grpo":
        return float(mask.shape[0])
    if loss_type == "dr_grpo":
        return float(mask.shape[0] * max_new_tokens)
    return max(float(mask.sum()), 1e-6)  # dapo; never 0, so an all-masked batch gives loss 0, not NaN


def _to_state(batch: dict) -> dict:
    """A rollout batch as JSON (float32 -> Python float -> JSON round-trips exactly)."""
    return {k: {"tensor": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "data": v.flatten().tolist()}
            if isinstance(v, Tensor) else v for k, v in batch.items()}


def _from_state(state: dict, device) -> dict:
    return {k: torch.tensor(v["data"], dtype=getattr(torch, v["tensor"]), device=device).view(v["shape"])
            if isinstance(v, dict) and "tensor" in v else v for k, v in state.items()}


class GRPOObjective(Objective):
    """One micro-batch = `micro_batch` prompts x `group_size` sampled completions."""

    name = "grpo"

    def __init__(self, prompts: list[list[int]], records, messages, rewards, gc: GRPOConfig, micro_batch: int,
                 seed: int, tok):
        if gc.loss_type not in LOSS_TYPES:
            raise LmforgeError(f"grpo.loss_type: '{gc.loss_type}' is not one of {', '.join(LOSS_TYPES)}")
        if gc.scale_rewards not in ("auto", "group", "none"):
            raise LmforgeError(f"grpo.scale_rewards: '{gc.scale_rewards}' is not one of auto, group, none")
        if gc.group_size < 2:
            raise LmforgeError(f"grpo.group_size must be at least 2 (advantages compare completions), got "
                               f"{gc.group_size}")
        if gc.iterations < 1:
            raise LmforgeError(f"grpo.iterations must be >= 1, got {gc.iterations}")
        self.prompts, self.records, self.messages, self.rewards = prompts, records, messages, rewards
        self.gc, self.micro_batch, self.seed, self.tok = gc, micro_batch, seed, tok
        self.scale = gc.scale_rewards == "group" or (gc.scale_rewards == "auto" and gc.loss_type != "dr_grpo")
        self.rollouts = 0  # rollout batches drawn so far: with the seed, it fixes the sampler's stream
        self.pending_batches: list[dict] = []  # rollouts still to be trained on (iterations > 1)
        self.uses_left = 0
        self.generated = 0  # tokens sampled since the loop last asked (generated_tokens)
        self.ref_model: nn.Module | None = None

    def setup(self, model, device, rank, world, accum):
        from lmforge.checkpoint import unwrap
        from lmforge.data.chat import IndexBatches

        self.device, self.rank, self.world = device, rank, world
        inner = unwrap(model)
        if self.gc.beta > 0 and not hasattr(inner, "disable_adapter"):
            # Taken before a resume loads trained weights: `model` is still the starting policy.
            self.ref_model = copy.deepcopy(inner).eval().requires_grad_(False)
        self.use_stream(IndexBatches(len(self.prompts), self.micro_batch, accum, rank, world, self.seed, "prompts"))

    # --- rollouts -------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.seed, self.rollouts, self.rank]).generate_state(1)[0])
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def _logps(self, model: nn.Module, batch: dict) -> Tensor:
        return model(batch["input_ids"], labels=batch["targets"], logprobs=True)

    @torch.no_grad()
    def rollout(self, model: nn.Module) -> list[dict]:
        """Sample, score and tensorise this rank's completions for one step."""
        from lmforge.checkpoint import unwrap
        from lmforge.data.chat import pad_rows
        from lmforge.infer.engine import default_stop_ids, generate_samples
        from lmforge.infer.sampling import SamplingParams

        gc, G = self.gc, self.gc.group_size
        inner = unwrap(model)
        groups = self.stream.next_step()
        flat = [i for idx in groups for i in idx]
        stop_ids = default_stop_ids(self.tok)
        params = SamplingParams(max_new_tokens=gc.max_new_tokens, temperature=gc.temperature, top_k=gc.top_k,
                                top_p=gc.top_p)
        was = inner.training
        inner.eval()
        try:  # under FSDP, whole weights on every rank first: each rank's generation stops on its own
            with gathered(inner):
                # One prefill per prompt, its cache copied for the group's G continuations.
                start = time.perf_counter()
                samples = generate_samples(inner, [self.prompts[i] for i in flat], params, stop_ids=stop_ids,
                                           generator=self._generator(), vocab_limit=self.tok.vocab_size,
                                           repeats=G)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - start
        finally:
            inner.train(was)
        self.rollouts += 1
        sampled = sum(len(s.tokens) for s in samples)
        self.generated += sampled
        texts = [self.tok.decode([t for t in s.tokens if t not in stop_ids]) for s in samples]
        truncated = [s.finish_reason == "length" for s in samples]
        lengths = [len(s.tokens) for s in samples]
        examples = [self.records[i].data for i in flat for _ in range(G)]
        prompts = [self.messages[i] for i in flat for _ in range(G)]
        total, parts = self.rewards(texts, examples, prompts=prompts, lengths=lengths, truncated=truncated,
                                    max_new_tokens=gc.max_new_tokens)
        rewards = torch.tensor(total, dtype=torch.float32)
        adv = group_advantages(rewards, G, self.scale)
        std = rewards.view(-1, G).std(dim=1)
        stats = {"reward": rewards.mean().item(), "reward_std": std.mean().item(),  # mean within-group std
                 "frac_reward_zero_std": (std < 1e-6).float().mean().item(),
                 "completion_length": float(np.mean(lengths)), "completion_length_max": float(max(lengths)),
                 "truncated": float(np.mean(truncated)), "rollout_tokens_per_s": sampled / max(seconds, 1e-9),
                 **parts}

        batches = []
        per_mb = len(groups[0]) * G
        for m in range(len(groups)):
            rows = range(m * per_mb, (m + 1) * per_mb)
            inputs, targets = [], []
            for r in rows:
                p, c = self.prompts[flat[r // G]], samples[r].tokens
                ids = p + c
                inputs.append(ids[:-1])
                keep = not (gc.mask_truncated and truncated[r])
                targets.append([IGNORE] * (len(p) - 1) + [t if keep else IGNORE for t in c])
            b = {"input_ids": pad_rows(inputs, self.tok.eot_id).to(self.device),
                 "targets": pad_rows(targets, IGNORE).to(self.device),
                 "advantages": adv[list(rows)].to(self.device), "stats": stats}
            if gc.iterations > 1:
                b["old_logps"] = self._logps(inner, b)
            if self.ref_model is not None:
                b["ref_logps"] = self._logps(self.ref_model, b)
            elif gc.beta > 0:
                with inner.disable_adapter():
                    b["ref_logps"] = self._logps(inner, b)
            batches.append(b)
        return batches

    def next_batches(self, model):
        if self.uses_left == 0:
            self.pending_batches = self.rollout(model)
            self.uses_left = self.gc.iterations
        self.uses_left -= 1
        return self.pending_batches

    # --- loss ---------------------------------------------------------------------------------
    def count(self, batch) -> float:
        return count_units(batch["targets"] != IGNORE, self.gc.loss_type, self.gc.max_new_tokens)

    def tokens(self, batch) -> float:
        """Prompt and completion tokens of the training pass (padding left out)."""
        return right_padded_tokens(batch["input_ids"], self.tok.eot_id)

    def generated_tokens(self) -> float:
        n, self.generated = self.generated, 0
        return float(n)

    def loss(self, model, batch):
        gc = self.gc
        y = batch["targets"]
        mask = y != IGNORE
        logp = model(batch["input_ids"], labels=y, logprobs=True)
        old = batch.get("old_logps", logp.detach())
        per_token, clipped, kl = policy_loss(logp, old, batch["advantages"], mask, gc.epsilon_low, gc.epsilon_high,
                                             gc.beta, batch.get("ref_logps"))
        loss = aggregate(per_token, mask, gc.loss_type)
        # Metrics are sums over the batch's units (the loop divides by them): scale each statistic by the count.
        units = self.count(batch)
        n_tok = mask.sum().clamp_min(1)
        metrics = {"loss": loss.detach(), "clip_ratio": clipped.sum() / n_tok * units}
        if batch.get("ref_logps") is not None:
            metrics["kl"] = kl.detach().sum() / n_tok * units
        for k, v in batch["stats"].items():
            metrics[k] = torch.tensor(v * units, device=loss.device)
        return loss, metrics

    # --- state --------------------------------------------------------------------------------
    def state_dict(self):
        if self.stream is None:
            return self.pending or {}
        state = {"stream": self.stream.state_dict(), "rollouts": self.rollouts, "uses_left": self.uses_left}
        if self.uses_left:
            state["pending_batches"] = [_to_state(b) for b in self.pending_batches]
        return state

    def load_state_dict(self, state):
        self.pending = state
        if self.stream is None or not state:
            return
        self.stream.load_state_dict(state["stream"])
        self.rollouts, self.uses_left = int(state["rollouts"]), int(state["uses_left"])
        self.pending_batches = [_from_state(b, self.device) for b in state.get("pending_batches", [])]


def run_grpo(cfg: Config, folder: str = "grpo"):
    from lmforge.data.chat import prompt_messages, read_records, render_conversation
    from lmforge.train.loop import train
    from lmforge.train.rewards import Rewards
    from lmforge.train.sft import chat_sampler, finish, prepare_stage, resolve_init

    st = prepare_stage(cfg, "grpo", folder)
    gc, tc = st.cfg.grpo, st.cfg.train
    if not gc.data:
        raise LmforgeError("no prompts: set grpo.data to .jsonl/.json files of {\"prompt\" or \"messages\", ...}")
    records = read_records(gc.data, "prompts")
    messages = [prompt_messages(r) for r in records]
    prompts = [render_conversation(st.tok, m, tc.seq_len, r.where, add_generation_prompt=True)[0]
               for m, r in zip(messages, records)]
    model = st.load_policy(gc.lora)
    model_reward = None
    if "model" in gc.rewards:
        if not gc.reward_model:
            raise LmforgeError("grpo.rewards names 'model': set grpo.reward_model to an `lmforge rm` checkpoint "
                               "(or 'rm' for this run's)")
        from lmforge.train.dist import pick_device
        from lmforge.train.reward import ModelReward

        path = resolve_init(cfg, "grpo", gc.reward_model)
        model_reward = ModelReward(path, st.tok, pick_device(cfg.device))
        log(f"grpo: reward model {path}")
    rewards = Rewards(gc.rewards, gc.reward_weights, model_reward)
    rewards.check(records)
    log(f"grpo: {len(prompts)} prompts x {gc.group_size} completions, rewards "
        + " + ".join(f"{w:g}*{n}" for n, w in zip(rewards.names, rewards.weights))
        + f", loss {gc.loss_type}, beta {gc.beta}, iterations {gc.iterations}")
    objective = GRPOObjective(prompts, records, messages, rewards, gc, tc.micro_batch, st.cfg.seed, st.tok)
    result = train(st.cfg, model, objective, st.out_dir, tokenizer_dir=st.tok_dir,
                   sample_fn=chat_sampler(st.tok, messages[0], gc.max_new_tokens))
    return finish("grpo", result)


def run_grpo_rm(cfg: Config):
    """The recipe stage grpo-rm: GRPO as configured, rewarded by the trained reward model alone
    (grpo.reward_model, default this run's rm) instead of grpo.rewards, into RUN/grpo-rm. Beside the
    exact-match run it measures what a learned reward buys against the verifier it stands in for."""
    sub = copy.deepcopy(cfg)
    sub.grpo.rewards, sub.grpo.reward_weights = ["model"], []
    sub.grpo.reward_model = sub.grpo.reward_model or "rm"
    return run_grpo(sub, "grpo-rm")


def cmd_grpo(argv: list[str]) -> int:
    from lmforge.cli import parse_config

    run_grpo(parse_config("grpo", argv, "GRPO on prompts (grpo.data) with reward "
                          "functions (grpo.rewards) into RUN/grpo/checkpoints."))
    return 0
