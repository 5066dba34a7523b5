"""bench/gpu.sh in its CPU fallback: every CUDA check SKIPs, the CPU smoke of the same paths passes.

The GPU half needs a GPU and is run by hand (bench/README.md); what runs here is the script itself,
its JSON, its exit code, and that one failing check does not stop the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_CHECKS = ["autocast", "fused_adamw", "flash_sdpa", "cp_blocks", "compile", "flex_masks", "fsdp2",
               "fsdp2_offload", "ddp", "bench_small", "bench_small_compile"]


def gpu_sh(out: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    full = {**os.environ, "OUT": str(out), "GPU_SH_DEVICE": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            **env}
    r = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=full, capture_output=True, text=True, timeout=240)
    return r, json.loads((out / "gpu.json").read_text())


def test_cpu_fallback_skips_cuda_and_smokes_the_same_paths(tmp_path):
    r, result = gpu_sh(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {c["check"]: c for c in result["checks"]}
    assert list(checks)[:len(CUDA_CHECKS)] == CUDA_CHECKS
    for name in CUDA_CHECKS:
        assert (checks[name]["status"], checks[name]["reason"]) == ("SKIP", "no CUDA")
    smoke = ["cpu_autocast", "cpu_fused_adamw", "cpu_flash_sdpa", "cpu_cp_blocks", "cpu_flex_masks", "cpu_fsdp2",
             "cpu_bench_tiny"]
    for name in smoke:
        assert checks[name]["status"] == "PASS", checks[name]
    assert result["counts"] == {"PASS": len(smoke), "FAIL": 0, "SKIP": len(CUDA_CHECKS)}
    # each PASS carries the figures it compared
    autocast = checks["cpu_autocast"]["bf16_losses"]
    assert autocast[-1] < autocast[0] - 0.1
    fsdp = checks["cpu_fsdp2"]
    assert fsdp["parameter_types"] == ["DTensor"] and fsdp["world"] == 1
    assert fsdp["losses"]["fsdp2"] == fsdp["losses"]["unsharded"]  # fp32 on one rank: the same numbers
    assert checks["cpu_fused_adamw"]["max_abs_diff"] < 1e-5 and checks["cpu_fused_adamw"]["build_optimizer_fused"]
    assert max(checks["cpu_cp_blocks"]["max_abs_err_out_dq_dk_dv"]) < 1e-4
    bench = checks["cpu_bench_tiny"]["result"]
    assert bench["lmforge"]["tokens_per_s"]["median"] > 0 and bench["transformers"]["tokens_per_s"]["median"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json", "gpu.log"]
    flex = checks["cpu_flex_masks"]["loss_sdpa_flex"]
    assert abs(flex[0] - flex[1]) < 1e-4
    assert "PASS  cpu_fsdp2" in r.stdout and "7 passed, 0 failed, 11 skipped" in r.stdout


def test_a_check_that_crashes_fails_alone_and_the_exit_code_says_so(tmp_path):
    # A Python that dies whenever it is asked for the flash SDPA check; the FSDP2 check after it must
    # still run and pass. The other smoke checks are skipped (GPU_SH_SKIP) to keep this fast.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\nif [ "$1" = bench/gpu_checks.py ]; then for a in "$@"; do\n'
                    '  [ "$a" = flash_sdpa ] && { echo boom >&2; exit 3; }\ndone; fi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    r, result = gpu_sh(out, PYTHON=str(fake), GPU_SH_SKIP="cpu_autocast cpu_fused_adamw cpu_cp_blocks cpu_flex_masks "
                                                   "cpu_bench_tiny")
    assert r.returncode == 1, r.stdout + r.stderr
    checks = {c["check"]: c for c in result["checks"]}
    flash = checks["cpu_flash_sdpa"]
    assert flash["status"] == "FAIL" and "exited 3 before reporting: boom" in flash["reason"]
    assert checks["cpu_fsdp2"]["status"] == "PASS"
    assert checks["cpu_bench_tiny"] == {"check": "cpu_bench_tiny", "status": "SKIP", "reason": "GPU_SH_SKIP",
                                        "seconds": 0.0}
    assert result["counts"] == {"PASS": 1, "FAIL": 1, "SKIP": 16}
    assert "1 passed, 1 failed, 16 skipped" in r.stdout
