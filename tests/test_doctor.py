"""`lmforge doctor`: one OK/WARN/FAIL line per check, a fix under each failure, exit 1 when a needed one fails."""

from __future__ import annotations

import platform
import re
import shutil
from collections import namedtuple

import pytest
from rich.console import Console
from spine import lmforge

from lmforge import doctor
from lmforge.config import load_config
from lmforge.model.fit import Layout, training_memory

LINE = re.compile(r"^(OK|WARN|FAIL)\s+(\S.*?)\s{2,}(.*)$")
GiB = 2**30


def lines(text: str) -> dict[str, tuple[str, str]]:
    """check name -> (status, detail) of the first line of each check in doctor's output."""
    out = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            out.setdefault(m.group(2).strip(), (m.group(1), m.group(3)))
    return out


def run(cfg) -> tuple[int, str]:
    console = Console(width=400, highlight=False, force_terminal=False)
    with console.capture() as cap:
        code = doctor.report(doctor.run_checks(cfg), console)
    return code, cap.get()


def test_doctor_on_this_machine(tmp_path):
    r = lmforge("doctor", f"run_dir={tmp_path / 'run'}", "model.n_layer=2", "model.n_embd=64",
                "tokenizer.vocab_size=512", "train.micro_batch=2", "train.seq_len=64", "model.max_seq_len=64")
    assert r.returncode == 0, r.stdout + r.stderr
    found = lines(r.stdout)
    for name in ("python", "torch", "gpu", "cpu", "memory", "cpu kernels", "transformers", "peft", "torchao",
                 "tensorboard", "wandb", "swanlab", "gguf", "disk", "fit"):
        assert name in found, (name, r.stdout)
    assert found["python"][0] == "OK" and found["fit"][0] == "OK" and found["disk"][0] == "OK"
    if platform.machine() in ("x86_64", "AMD64"):
        assert "AVX2" in found["cpu"][1] and "AVX512-BF16" in found["cpu"][1] and "AMX" in found["cpu"][1]
    assert "ready: nothing failed" in r.stdout
    for line in r.stdout.splitlines()[1:-1]:  # every line is a check or the fix under one
        assert LINE.match(line) or line.strip().startswith("->"), line


def test_a_model_that_cannot_fit_fails_with_settings_that_do(tmp_path):
    # no machine holds xl at 4096 sequences x 2048 tokens: activations alone are petabytes
    r = lmforge("doctor", f"run_dir={tmp_path}", "model.preset=xl", "train.micro_batch=4096", "train.seq_len=2048")
    assert r.returncode == 1, r.stdout
    status, detail = lines(r.stdout)["fit"]
    assert status == "FAIL" and "xl" in detail and "needs about" in detail
    assert "-> model.preset=" in r.stdout or "train.micro_batch=" in r.stdout
    assert "failed" in r.stdout and "Traceback" not in r.stderr


def test_fit_on_a_24_gib_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "gpus", lambda: [doctor.GPU("NVIDIA RTX 4090", 24 * GiB, 23 * GiB, (8, 9))])
    cfg = load_config(overrides=[f"run_dir={tmp_path}", "model.preset=medium", "train.micro_batch=32",
                                 "train.seq_len=1024"])
    code, out = run(cfg)
    assert code == 1
    assert "cuda:0 NVIDIA RTX 4090, 24.0 GiB (23.0 free), compute 8.9, bf16 yes" in out
    status, detail = lines(out)["fit"]
    assert status == "FAIL" and "bf16" in detail and "of NVIDIA RTX 4090 (24.0 GiB)" in detail
    fix = next(line for line in out.splitlines() if "->" in line and "train.micro_batch=" in line)
    # the suggested micro-batch really fits, and keeps the global batch through accumulation
    batch = int(re.search(r"train\.micro_batch=(\d+)", fix).group(1))
    assert 0 < batch < 32 and "train.batch_tokens=32768" in fix
    cfg_fit = load_config(overrides=["model.preset=medium", "model.vocab_size=32000", f"train.micro_batch={batch}"])
    ac = "activation_checkpointing=true" in fix.split("train.batch_tokens")[0]
    mem = training_memory(cfg_fit.model, batch, 1024, "bf16", "adamw", Layout(activation_checkpointing=ac))["total"]
    assert mem <= 0.9 * 24 * GiB
    # the same run fits once the fix is applied
    code, out = run(load_config(overrides=[f"run_dir={tmp_path}", "model.preset=medium", f"train.micro_batch={batch}",
                                           f"train.activation_checkpointing={str(ac).lower()}", "train.seq_len=1024"]))
    assert lines(out)["fit"][0] in ("OK", "WARN"), out


def test_required_failures(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "gpus", lambda: [])
    real = doctor.package_version
    monkeypatch.setattr(doctor, "package_version", lambda name: None if name in ("wandb", "peft") else real(name))
    cfg = load_config(overrides=[f"run_dir={tmp_path}", "device=cuda", "train.wandb=true", "sft.lora.enabled=true",
                                 "model.n_layer=2", "model.n_embd=64", "train.micro_batch=2", "train.seq_len=64"])
    code, out = run(cfg)
    found = lines(out)
    assert code == 1
    assert found["gpu"][0] == "FAIL" and "device=cuda" in found["gpu"][1]
    assert found["wandb"] == ("FAIL", "not installed, and train.wandb=true needs it")
    assert found["peft"][0] == "FAIL" and "sft.lora.enabled=true" in found["peft"][1]
    assert "-> pip install 'lmforge[lora]'" in out and "-> pip install wandb" in out
    # not asked for: only a warning
    code, out = run(load_config(overrides=[f"run_dir={tmp_path}", "model.n_layer=2", "model.n_embd=64",
                                           "train.micro_batch=2", "train.seq_len=64"]))
    assert code == 0 and lines(out)["wandb"][0] == "WARN" and lines(out)["gpu"][0] == "WARN"


def test_disk_and_compiler_failures(monkeypatch, tmp_path):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**6, 10**6))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    monkeypatch.setattr(doctor, "gpus", lambda: [])
    from lmforge.model import cpu_kernels

    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    cfg = load_config(overrides=[f"run_dir={tmp_path / 'r'}", "model.preset=small", "train.micro_batch=1",
                                 "train.seq_len=64"])
    code, out = run(cfg)
    assert code == 1
    status, detail = lines(out)["disk"]
    assert status == "FAIL" and "1.0 MB free" in detail and "checkpoints need about" in detail
    status, detail = lines(out)["cpu kernels"]
    assert status == "WARN" and "no C compiler" in detail  # CPU training falls back to PyTorch: not fatal
    assert "apt-get install gcc" in out


def test_seq_len_beyond_the_context(tmp_path):
    code, out = run(load_config(overrides=[f"run_dir={tmp_path}", "model.preset=tiny", "train.seq_len=4096"]))
    assert code == 1
    assert lines(out)["fit"] == ("FAIL", "train.seq_len=4096 exceeds model.max_seq_len=512")


@pytest.mark.parametrize("device", ["cuda:7", "cuda:x"])
def test_a_gpu_that_is_not_there(monkeypatch, tmp_path, device):
    monkeypatch.setattr(doctor, "gpus", lambda: [doctor.GPU("A100", 40 * GiB, 40 * GiB, (8, 0))])
    code, out = run(load_config(overrides=[f"run_dir={tmp_path}", f"device={device}", "model.n_layer=2",
                                           "model.n_embd=64", "train.micro_batch=2", "train.seq_len=64"]))
    assert code == 1 and f"device={device}, but only 1 GPU(s)" in out


def test_fit_counts_the_parallel_layout(monkeypatch, tmp_path):
    """xl at 8 x 2048 on 16 GiB GPUs: no single GPU holds it; 8 FSDP shards with checkpointing do."""
    monkeypatch.setattr(doctor, "gpus", lambda: [doctor.GPU("Tesla V100-SXM2-16GB", 16 * GiB, 16 * GiB, (8, 0))])
    base = [f"run_dir={tmp_path}", "model.preset=xl", "train.micro_batch=8", "train.seq_len=2048"]
    code, out = run(load_config(overrides=base))
    assert lines(out)["fit"][0] == "FAIL"
    monkeypatch.setenv("WORLD_SIZE", "8")  # as torchrun sets it; parallel.dp_shard=-1 takes all 8
    code, out = run(load_config(overrides=base + ["train.activation_checkpointing=true"]))
    status, detail = lines(out)["fit"]
    assert status in ("OK", "WARN") and "per GPU under FSDP 8 + AC (8 processes)" in detail, out
    # DDP over the same 8 GPUs: each holds all of the state; the fix is the planner's layout
    code, out = run(load_config(overrides=base + ["parallel.dp_replicate=8", "parallel.dp_shard=1"]))
    status, detail = lines(out)["fit"]
    assert status == "FAIL" and "under DDP 8" in detail
    assert "parallel.dp_replicate=1 parallel.dp_shard=8 train.activation_checkpointing=true (FSDP 8 + AC" in out
    code, out = run(load_config(overrides=base + ["parallel.tp=3"]))
    assert lines(out)["fit"][0] == "FAIL" and "do not multiply to the 8 processes" in out
