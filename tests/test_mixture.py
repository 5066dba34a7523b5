"""Weighted mixtures: per-source shards, the realised mix, per-source validation, bit-exact resume mid-mixture."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from corpora import english
from safetensors.torch import load_file
from spine import TINY, copy_run, lmforge, make_corpus

from lmforge.config import ConfigError, load_config
from lmforge.data.loader import MixtureBatches, TokenWindows
from lmforge.data.mixture import parse_sources
from lmforge.data.shards import read_manifest
from lmforge.stages import run_prepare, run_tokenizer


def prose(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        (dst / f"book{i}.txt").write_text(english(12_000, seed=i), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    code, text = make_corpus(root / "code"), prose(root / "prose")
    run = root / "run"
    (root / "mix.yaml").write_text(
        f"run_dir: {run}\n"
        "tokenizer: {vocab_size: 512}\n"
        "data:\n"
        "  val_fraction: 0.15\n  workers: 1\n  max_doc_bytes: 4096\n"
        f"  sources:\n    - {{path: {code}, name: code, weight: 0.7}}\n"
        f"    - {{path: {text}, name: prose, weight: 0.3}}\n")
    cfg = load_config(root / "mix.yaml")
    run_tokenizer(cfg)
    run_prepare(cfg)
    return run


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.weight") as e:
        parse_sources([{"path": "a", "weight": 1}, {"path": "b", "weight": -2}])
    assert e.value.key == "data.sources[1].weight"
    cases = [([{"path": "a", "weight": 1}, {"path": "b"}], "data.sources[1].weight"),
             ([{"path": "a", "wieght": 1}], "data.sources[0].wieght"),
             ([{"name": "x"}], "data.sources[0].path"),
             ([{"path": "a", "name": "x"}, {"path": "b", "name": "x"}], "data.sources[1].name"),
             ([{"path": "a", "name": "../x"}], "data.sources[0].name"),
             ([{"path": "a", "weight": 1, "epochs": 2}], "data.sources[0].weight"),
             ([{"path": "a", "epochs": "two"}], "data.sources[0].epochs")]
    for sources, key in cases:
        with pytest.raises(ConfigError) as e:
            parse_sources(sources)
        assert e.value.key == key and key in str(e.value), (sources, str(e.value))
    specs = parse_sources(["some/dir/", {"path": "x/*.jsonl", "epochs": 2}])
    assert [s.name for s in specs] == ["dir", "x"] and specs[1].epochs == 2.0


def test_prepare_keeps_each_source_apart(mix_run):
    train = read_manifest(mix_run / "data" / "train")
    val = read_manifest(mix_run / "data" / "val")
    assert [m["name"] for m in train["mixture"]] == ["code", "prose"]
    assert [m["weight"] for m in train["mixture"]] == pytest.approx([0.7, 0.3])
    for m in (train, val):
        assert {s["source"] for s in m["shards"]} == {"code", "prose"}
        assert all(s["file"].startswith(s["source"] + "/") for s in m["shards"])
        assert sum(x["tokens"] for x in m["mixture"]) == m["tokens"]
        assert all(x["documents"] > 0 for x in m["mixture"])  # every source has its own held-out split
    code = TokenWindows(mix_run / "data" / "train", 32, source="code")
    assert sum(len(a) for a in code.shards) == train["mixture"][0]["tokens"]


def _stream(run: Path, weights: list[float], micro=4, accum=1, rank=0, world=1) -> MixtureBatches:
    pools = [TokenWindows(run / "data" / "train", 32, source=n) for n in ("code", "prose")]
    return MixtureBatches(pools, ["code", "prose"], weights, micro, accum, rank, world, seed=7)


def test_realised_mix_follows_the_weights_and_resumes_exactly(mix_run):
    s = _stream(mix_run, [0.7, 0.3])
    for _ in range(50):
        s.next_step()
    tokens = s.tokens_per_source()
    total = sum(tokens.values())
    assert total == 50 * 4 * 32
    assert abs(tokens["code"] / total - 0.7) < 0.02 and abs(tokens["prose"] / total - 0.3) < 0.02
    # a source used up goes on with its next epoch (a new permutation); the mix still holds
    up = _stream(mix_run, [0.2, 0.8])
    prose_windows = len(up.pools[1])
    steps = prose_windows // 3 + 10
    for _ in range(steps):
        up.next_step()
    assert up.epochs[1] == 1 and up.epochs[0] == 0
    assert abs(up.tokens_per_source()["prose"] / (steps * 4 * 32) - 0.8) < 0.02
    # resume: a fresh stream given the state continues with exactly the same windows
    state = json.loads(json.dumps(s.state_dict()))
    ahead = [s.next_step() for _ in range(5)]
    t = _stream(mix_run, [0.7, 0.3])
    t.load_state_dict(state)
    for a, b in zip(ahead, [t.next_step() for _ in range(5)], strict=True):
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))
    # two ranks split each step's windows between them: together they see what one process sees
    one = _stream(mix_run, [0.7, 0.3], micro=4, accum=2)
    r0, r1 = (_stream(mix_run, [0.7, 0.3], micro=4, rank=r, world=2) for r in (0, 1))
    a = one.next_step()
    assert torch.equal(a[0][0], r0.next_step()[0][0]) and torch.equal(a[1][0], r1.next_step()[0][0])
    bad = _stream(mix_run, [0.5, 0.5], micro=8)
    with pytest.raises(Exception, match="per step"):
        bad.load_state_dict(state)


def test_epochs_weight_by_tokens(tmp_path, mix_run):
    from lmforge.data.mixture import mixture_weights

    specs = parse_sources([{"path": "a", "epochs": 2}, {"path": "b", "epochs": 1}])
    assert mixture_weights(specs, [100, 600]) == pytest.approx([0.25, 0.75])
    specs = parse_sources([{"path": "a"}, {"path": "b"}])
    assert mixture_weights(specs, [100, 300]) == pytest.approx([0.25, 0.75])


def test_plain_list_keeps_the_old_layout(tmp_path):
    code = make_corpus(tmp_path / "code")
    cfg = load_config(overrides=[f"run_dir={tmp_path / 'run'}", f"data.sources=[{code}]",
                                 "tokenizer.vocab_size=300", "data.val_fraction=0.15", "data.workers=1"])
    run_tokenizer(cfg)
    run_prepare(cfg)
    m = read_manifest(tmp_path / "run" / "data" / "train")
    assert "mixture" not in m and all(set(s) == {"file", "tokens"} for s in m["shards"])
    assert m["shards"][0]["file"] == "shard_00000.bin"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_on_a_mixture_resumes_bit_exact_and_reports_the_mix(mix_run, tmp_path):
    common = [*TINY, "train.max_steps=24", "train.save_every=8", "train.eval_every=24", "train.eval_batches=2"]
    straight = copy_run(mix_run, tmp_path / "straight")
    r = lmforge("pretrain", f"run_dir={straight}", *common)
    assert r.returncode == 0, r.stderr
    killed = copy_run(mix_run, tmp_path / "killed")
    r = lmforge("pretrain", f"run_dir={killed}", *common, env={"LMFORGE_FAULT": "step:13"})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    r = lmforge("pretrain", f"run_dir={killed}", *common)
    assert r.returncode == 0 and "resumed" in r.stderr, r.stderr
    a, b = (load_file(run / "checkpoints" / "step_000024" / "model.safetensors") for run in (straight, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = _metrics(straight)
    assert {m["step"]: m["loss"] for m in rows if "loss" in m} == \
           {m["step"]: m["loss"] for m in _metrics(killed) if "loss" in m}
    last = [m for m in rows if "mix_tokens_code" in m][-1]
    assert last["mix_tokens_code"] + last["mix_tokens_prose"] == 24 * 4 * 32
    assert abs(last["mix_share_code"] - 0.7) < 0.02
    assert [m for m in _metrics(killed) if "mix_tokens_code" in m][-1]["mix_tokens_code"] == last["mix_tokens_code"]
    val = [m for m in rows if "val_loss" in m][-1]
    assert np.isfinite(val["val_loss_code"]) and np.isfinite(val["val_loss_prose"])
    assert val["val_loss_code"] != val["val_loss_prose"]
    # the overall validation loss is the training mix's: each source's at its weight
    assert val["val_loss"] == pytest.approx(0.7 * val["val_loss_code"] + 0.3 * val["val_loss_prose"])


def test_two_processes_see_the_mixture_one_process_sees(mix_run, tmp_path):
    """DDP on 2 processes (gloo) follows the one-process run with accumulation 2 on the same global batch:
    every rank computes the same source schedule and takes its share of each step's windows."""
    common = [*TINY, "train.max_steps=6", "train.save_every=6", "train.micro_batch=4", "train.batch_tokens=256"]
    runs = []
    for name, procs in (("one", 0), ("two", 2)):
        run = copy_run(mix_run, tmp_path / name)
        r = lmforge("pretrain", f"run_dir={run}", *common, torchrun=procs)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append([m for m in _metrics(run) if "loss" in m])
    assert [m["loss"] for m in runs[0]] == pytest.approx([m["loss"] for m in runs[1]], rel=1e-4)
    assert runs[0][-1]["mix_tokens_code"] == runs[1][-1]["mix_tokens_code"] > 0


def test_epochs_per_source_set_the_weights_from_the_token_counts(mix_run, tmp_path):
    train = read_manifest(mix_run / "data" / "train")
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer").symlink_to(mix_run / "tokenizer")
    cfg = load_config(overrides=[f"run_dir={run}", "data.workers=1", "data.val_fraction=0.15",
                                 "data.max_doc_bytes=4096"])
    cfg.data.sources = [{"path": m["path"], "name": m["name"], "epochs": e} for m, e in zip(train["mixture"], (1, 3))]
    run_prepare(cfg)
    got = read_manifest(run / "data" / "train")["mixture"]
    code, prose = (m["tokens"] for m in got)
    assert [m["tokens"] for m in got] == [m["tokens"] for m in train["mixture"]]
    assert [m["weight"] for m in got] == pytest.approx([code / (code + 3 * prose), 3 * prose / (code + 3 * prose)])
    assert [m["epochs"] for m in got] == [1, 3]
