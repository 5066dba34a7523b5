"""GRPO: advantages, the clipped objective, k3 and the three aggregations against hand-computed values;
reward functions; seeded rollouts; a run that logs what it must."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_chat import tiny_checkpoint, write_jsonl

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.train.grpo import aggregate, count_units, group_advantages, k3, policy_loss
from lmforge.train.rewards import Rewards, exact_match, format_reward, length_reward


def test_group_advantages_for_known_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4, scale=True)
    # Group 1: mean 0.5, sample std sqrt(1/3); group 2: all equal -> 0; group 3: mean 0.75, std 1.5.
    s1 = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    want = [s1, -s1, -s1, s1, 0, 0, 0, 0, 2.25 / 1.5001, -0.75 / 1.5001, -0.75 / 1.5001, -0.75 / 1.5001]
    torch.testing.assert_close(adv, torch.tensor(want))
    # Dr. GRPO: centred only.
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_clipped_objective_k3_and_aggregations_by_hand():
    # Row 0: two tokens, advantage +1; row 1: one token (second is padding), advantage -1.
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))  # ratios 1.5, 1.0 | 0.5
    per_tok, clipped, _ = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    # A>0, ratio 1.5 -> min(1.5, 1.2) = 1.2 (clipped); ratio 1 -> 1; A<0, ratio 0.5 -> min(-0.5, -0.8) = -0.8.
    torch.testing.assert_close(per_tok, torch.tensor([[-1.2, -1.0], [0.8, 0.0]]))
    torch.testing.assert_close(clipped, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    # DAPO's asymmetric clip: eps_high 0.28 lets the ratio reach 1.28.
    per_tok_hi, _, _ = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert per_tok_hi[0, 0].item() == pytest.approx(-1.28)
    # grpo: per-row means (-1.1) + (0.8) over 2 rows; dapo: token sum -1.4 over 3 tokens; dr_grpo: over 2 x 4.
    assert aggregate(per_tok, mask, "grpo").item() / count_units(mask, "grpo", 4) == pytest.approx(-0.15)
    assert aggregate(per_tok, mask, "dapo").item() / count_units(mask, "dapo", 4) == pytest.approx(-1.4 / 3)
    assert aggregate(per_tok, mask, "dr_grpo").item() / count_units(mask, "dr_grpo", 4) == pytest.approx(-1.4 / 8)
    # k3 = exp(ref - logp) - (ref - logp) - 1: zero when equal, 0.5 + log 2 - 1 for ref/pi = 1/2.
    assert k3(torch.tensor(-1.0), torch.tensor(-1.0)).item() == 0.0
    assert k3(torch.tensor(0.0), torch.tensor(math.log(0.5))).item() == pytest.approx(math.log(2) - 0.5)
    # With beta the KL term is added per token: ratio 1 (logp == old) and logp == ref -> just -A.
    same, _, kl = policy_loss(old, old, adv, mask, 0.2, 0.2, beta=0.1, ref=old)
    torch.testing.assert_close(same, torch.tensor([[-1.0, -1.0], [1.0, 0.0]]))
    assert kl.abs().sum() == 0


def test_reward_functions(tmp_path):
    done = ["The answer is 95.", "40 + 2 = 42，答案是 42。", "It is 95 I think", "The answer is 1,000.", "no number",
            "The answer is 3. The answer is 3.", "The answer is 3. Or 4"]
    examples = [{"answer": "95"}, {"answer": "42"}, {"answer": "95"}, {"answer": "1000"}, {"answer": "3"},
                {"answer": "3"}, {"answer": "3"}]
    assert exact_match(done, examples) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert format_reward(done, examples) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert length_reward(done[:3], examples[:3], lengths=[6, 7, 8], max_new_tokens=8) == [0.0, -0.5, -1.0]
    module = tmp_path / "my_rewards.py"
    module.write_text("def shouty(completions, examples):\n    return [float(c.isupper()) for c in completions]\n")
    rewards = Rewards(["exact_match", f"{module}:shouty"], [1.0, 0.5])
    total, parts = rewards(["THE ANSWER IS 95.", "the answer is 94."], [{"answer": "95"}, {"answer": "95"}],
                           lengths=[5, 5], max_new_tokens=8)
    assert total == [1.5, 0.0] and parts == {"reward/exact_match": 0.5, f"reward/{module}:shouty": 0.5}
    with pytest.raises(LmforgeError, match="has no function 'nope'"):
        Rewards([f"{module}:nope"], [])
    with pytest.raises(LmforgeError, match="reward_weights has 1 values for 2"):
        Rewards(["exact_match", "format"], [1.0])


def grpo_config(tmp_path, base, data, name, *extra):
    return load_config(overrides=[
        f"run_dir={tmp_path / name}", f"grpo.data=[{data}]", f"grpo.init_from={base}", "train.progress=false",
        "train.precision=fp32",
        "grpo.group_size=4", "grpo.max_new_tokens=6", "grpo.rewards=[exact_match,format]",
        "grpo.train.seq_len=32", "grpo.train.micro_batch=2", "grpo.train.max_steps=4", "grpo.train.lr=1e-3",
        "grpo.train.warmup_steps=1", "grpo.train.eval_every=0", "grpo.train.save_every=0",
        "grpo.train.log_every=1", "grpo.train.sample_every=0", *extra])


def test_grpo_run_is_seeded_logs_its_metrics_and_masks_truncation(tmp_path):
    from lmforge.train.grpo import run_grpo

    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)}
                                               for i in range(8)])
    # seed=1: none of the first step's 8 random-model completions stops within 6 tokens (a seeded fact:
    # the rollouts are the same on every run, below). A reward that differs within each group (the
    # completion's characters, hashed) gives non-zero advantages, so only the masking can zero the loss.
    varied = tmp_path / "varied.py"
    varied.write_text("import zlib\n\ndef reward(completions, examples):\n"
                      "    return [zlib.crc32(c.encode()) % 7 / 7 for c in completions]\n", encoding="utf-8")
    extra = ("grpo.beta=0.05", "grpo.iterations=2", "grpo.loss_type=grpo", "seed=1",
             f"grpo.rewards=[exact_match,format,{varied}:reward]", "grpo.reward_weights=[1.0,1.0,1.0]")
    runs = [run_grpo(grpo_config(tmp_path, base, data, name, *extra, "grpo.mask_truncated=true"))
            for name in ("a", "b")]
    unmasked = run_grpo(grpo_config(tmp_path, base, data, "c", *extra, "grpo.mask_truncated=false"))
    assert unmasked.step == 4
    rows = [[json.loads(line) for line in (tmp_path / n / "grpo" / "metrics.jsonl").read_text().splitlines()]
            for n in ("a", "b")]
    timing = ("time", "tokens_per_s", "generated_tokens_per_s", "mfu", "mfu_peak_flops", "memory_gb", "eta_s",
              "rollout_tokens_per_s")
    strip = [[{k: v for k, v in r.items() if k not in timing} for r in rs] for rs in rows]
    assert strip[0] == strip[1]  # same seed: same rollouts, same updates
    first = rows[0][0]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completion_length", "clip_ratio", "kl",
                "truncated", "reward/exact_match", "reward/format"):
        assert key in first, key
    assert first["rollout_tokens_per_s"] > 0
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    assert first["clip_ratio"] == 0.0  # first use of a rollout batch: ratio 1
    assert first["truncated"] == 1.0
    assert first["reward_std"] > 0 and first["frac_reward_zero_std"] < 1  # the advantages are not all zero
    # ...and every truncated completion is masked out of the loss: no gradient at all. (The loss value alone
    # cannot tell: with equal lengths and group-normalised advantages it is 0 at ratio 1 either way.)
    assert first["loss"] == 0.0 and first["grad_norm"] == 0.0
    control = json.loads((tmp_path / "c" / "grpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert control["truncated"] == 1.0 and control["grad_norm"] > 0.1  # unmasked, the same rollouts do count
    assert runs[0].step == 4 and len(rows[0]) == 4


def test_policy_gradient_direction(tmp_path):
    """One step on a batch raises the log-probability of the completion with positive advantage."""
    from lmforge.checkpoint import load_model
    from lmforge.model.loss import IGNORE, token_logprobs
    from lmforge.train.grpo import GRPOObjective

    model = load_model(tiny_checkpoint(tmp_path)).train()
    cfg = load_config(overrides=["grpo.group_size=2", "grpo.loss_type=dapo"])
    obj = GRPOObjective([], [], [], None, cfg.grpo, 1, 0, None)
    x = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 10]])
    y = torch.tensor([[IGNORE, 7, 8, 11], [IGNORE, 9, 10, 12]])
    batch = {"input_ids": x, "targets": y, "advantages": torch.tensor([1.0, -1.0]), "stats": {}}

    def seq_logps():
        with torch.no_grad():
            return token_logprobs(model, model(x, return_hidden=True), y).sum(1)

    before = seq_logps()
    loss, _ = obj.loss(model, batch)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = seq_logps()
    assert after[0] > before[0] and after[1] < before[1]


def test_grpo_rm_stage_is_rewarded_by_the_reward_model_alone_into_its_own_folder(tmp_path):
    from lmforge.stages import STAGES
    from lmforge.train.lora import load_any
    from lmforge.train.reward import RewardModel

    base = tiny_checkpoint(tmp_path)
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    RewardModel.from_policy(load_any(base), 0, likelihood=True).save_weights(rm_dir)
    data = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)}
                                               for i in range(8)])
    cfg = grpo_config(tmp_path, base, data, "run", f"grpo.reward_model={rm_dir}", "grpo.train.save_every=4")
    run, done = STAGES["grpo-rm"]
    assert not done(cfg)
    run(cfg)
    assert done(cfg) and not (tmp_path / "run" / "grpo").exists()  # the exact-match run's folder is left alone
    rows = [json.loads(line) for line in (tmp_path / "run" / "grpo-rm" / "metrics.jsonl").read_text().splitlines()]
    assert "reward/model" in rows[0] and "reward/exact_match" not in rows[0]
    assert rows[0]["reward"] == pytest.approx(rows[0]["reward/model"])
    assert cfg.grpo.rewards == ["exact_match", "format"]  # the stage changed a copy of the config
