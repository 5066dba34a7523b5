"""Expert parallel (parallel.ep, train/expert.py) on 2 gloo processes against the one-process MoE run.

Golden losses, as tests/test_parallel.py has them for the dense layouts: the same tiny MoE, data and
global batch trained by one process and under parallel.ep=2 (each rank 4 of the 8 experts, tokens sent
by all-to-all, FSDP2 over both ranks for the rest) must give the same losses, validation losses and final
weights, with AdamW and with Muon (3-D experts), and with activation checkpointing (whose recompute
sends the tokens again). An ep=2 run killed after step 6 resumes bit for bit, and
a checkpoint written under ep=2 resumes on one process (DCP reshards the optimizer state).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from spine import TINY, copy_run, lmforge, lmforge_batch, prepared_run
from test_pretrain import metrics

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.train.expert import check_ep
from lmforge.train.parallelize import Layout, check_supported, resolve_sizes

STEPS = 8
COMMON = [*TINY, "model.qk_norm=true", "model.moe.experts=8", "model.moe.top_k=2", "model.moe.balance=aux_free",
          "model.moe.bias_update_rate=0.01", "model.moe.z_loss=1e-2", "model.moe.shared_experts=1",
          f"train.max_steps={STEPS}", "train.save_every=4", "train.eval_every=4", "train.micro_batch=2",
          "train.batch_tokens=256", "train.sample_every=0"]
OPTIMIZERS = {"adamw": [], "muon": ["train.optimizer=muon"]}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return prepared_run(tmp_path_factory.mktemp("ep"))


def _job(run: Path, *extra: str) -> list[str]:
    return ["pretrain", f"run_dir={run}", *COMMON, *extra]


def _column(run: Path, key: str) -> list[float]:
    return [m[key] for m in metrics(run) if key in m]


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(base_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {f"{kind}_{opt}": copy_run(base_run, root / f"{kind}_{opt}") for kind in ("one", "ep") for opt in OPTIMIZERS}
    for rc, err in lmforge_batch({f"one_{o}": _job(out[f"one_{o}"], *x) for o, x in OPTIMIZERS.items()}).values():
        assert rc == 0, err[-3000:]
    out["ep_recompute"] = copy_run(base_run, root / "ep_recompute")
    jobs = {f"ep_{o}": _job(out[f"ep_{o}"], "parallel.ep=2", *x) for o, x in OPTIMIZERS.items()}
    # activation checkpointing runs each block's forward again in backward: the all-to-alls with it
    jobs["ep_recompute"] = _job(out["ep_recompute"], "parallel.ep=2", "train.activation_checkpointing=true")
    done = lmforge_batch(jobs, torchrun=2)
    for rc, err in done.values():
        assert rc == 0, err[-3000:]
        assert "(dp_shard 2, ep 2)" in err, err[-3000:]
    return out


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_ep_equals_one_process(runs, opt):
    one, ep = runs[f"one_{opt}"], runs[f"ep_{opt}"]
    assert len(_column(ep, "loss")) == STEPS
    assert _column(ep, "loss") == pytest.approx(_column(one, "loss"), rel=1e-5)
    assert _column(ep, "grad_norm") == pytest.approx(_column(one, "grad_norm"), rel=1e-5)  # clipped over both meshes
    assert len(_column(ep, "val_loss")) == 2  # evaluation: every rank holds every expert for it
    assert _column(ep, "val_loss") == pytest.approx(_column(one, "val_loss"), rel=1e-5)
    want, got = _final(one), _final(ep)
    assert got.keys() == want.keys() and got["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 8  # whole
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4, msg=k)
    # the experts learned, and the aux-free biases moved from the load summed over both ranks' tokens
    assert not torch.equal(got["model.layers.1.mlp.experts.down_proj"], load_file(
        ep / "checkpoints" / "step_000004" / "model.safetensors")["model.layers.1.mlp.experts.down_proj"])
    assert got["model.layers.0.mlp.gate.e_score_correction_bias"].abs().sum() > 0


def test_ep_with_activation_checkpointing_equals_one_process(runs):
    assert _column(runs["ep_recompute"], "loss") == pytest.approx(_column(runs["one_adamw"], "loss"), rel=1e-5)
    for k, v in _final(runs["one_adamw"]).items():
        torch.testing.assert_close(_final(runs["ep_recompute"])[k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_ep_checkpoint_resumes_on_one_process(runs, base_run, tmp_path):
    """Written by 2 processes with 4 experts each, read by one holding all 8: the optimizer's sharded state
    is resharded on load, and the run ends where the straight one-process run ends."""
    run = copy_run(base_run, tmp_path / "one")
    (run / "checkpoints").mkdir()
    shutil.copytree(runs["ep_adamw"] / "checkpoints" / "step_000004", run / "checkpoints" / "step_000004")
    r = lmforge(*_job(run))
    assert r.returncode == 0 and "(written by 2 processes)" in r.stderr, r.stderr[-3000:]
    assert _column(run, "loss") == pytest.approx(_column(runs["one_adamw"], "loss")[4:], rel=1e-5)
    for k, v in _final(runs["one_adamw"]).items():
        torch.testing.assert_close(_final(run)[k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_ep_kill_and_resume_is_bit_exact(runs, base_run, tmp_path):
    killed = copy_run(base_run, tmp_path / "killed")
    r = lmforge(*_job(killed, "parallel.ep=2", "train.optimizer=muon"), env={"LMFORGE_FAULT": "step:6"},
                torchrun=2)
    assert r.returncode != 0 and (killed / "checkpoints" / "step_000004").is_dir(), r.stderr[-3000:]
    assert not (killed / "checkpoints" / f"step_{STEPS:06d}").exists()
    r = lmforge(*_job(killed, "parallel.ep=2", "train.optimizer=muon"), torchrun=2)
    assert r.returncode == 0 and "resumed" in r.stderr, r.stderr[-3000:]
    straight = runs["ep_muon"]
    want, got = _final(straight), _final(killed)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    losses = lambda run: {m["step"]: m["loss"] for m in metrics(run) if "loss" in m}  # noqa: E731
    assert losses(killed) == losses(straight)


def _layout(**sizes) -> Layout:
    pc = load_config(overrides=[f"parallel.{k}={v}" for k, v in sizes.items()]).parallel
    world = 4
    got = resolve_sizes(pc, world)
    return Layout(**got, dp_world=got["dp_replicate"] * got["dp_shard"], ep=pc.ep)


@pytest.mark.parametrize("sizes, why", [
    ({"ep": 3}, r"parallel.ep=3 must be a positive divisor of parallel.dp_shard=4"),
    ({"ep": 2, "tp": 2}, r"parallel.ep=2 with parallel.tp=2: expert parallel is built with FSDP2"),
    ({"ep": 2, "cp": 2}, r"parallel.ep=2 with parallel.cp=2"),
    ({"ep": 2, "pp": 2}, r"parallel.ep=2 with parallel.pp=2"),
    ({"ep": 2, "dp_replicate": 2}, r"parallel.ep=2 with parallel.dp_replicate=2"),
])
def test_ep_refuses_what_it_does_not_build(sizes, why):
    with pytest.raises(LmforgeError, match=why):
        check_supported(_layout(**sizes), "lm")


def test_ep_refuses_dense_models_and_uneven_experts():
    check_supported(_layout(ep=4), "lm")  # ep 4 of dp_shard 4: accepted
    with pytest.raises(LmforgeError, match=r"parallel.ep=2 with a dense model \(model.moe.experts=0\)"):
        check_ep(0, 2)
    with pytest.raises(LmforgeError, match=r"parallel.ep=4 must divide model.moe.experts=6"):
        check_ep(6, 4)

