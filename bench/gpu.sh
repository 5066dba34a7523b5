#!/usr/bin/env bash
# bench/gpu.sh: every CUDA path lmforge relies on, checked and timed in one prepared run.
#
#   bash bench/gpu.sh            # from the repository root; under 8 minutes on one GPU
#
# Checks (bench/gpu_checks.py says what each compares against): bf16 autocast training steps,
# fused AdamW, flash SDPA, torch.compile (train.compile=true), FlexAttention block masks against
# SDPA's dense ones (packed documents, window, block-sparse), FSDP2 fully_shard on one GPU (and
# with CPU offload) under torchrun, NCCL DDP when more than one GPU is visible. Then it measures
# the small preset's (124M, vocab 50304, 8 x 1024) bf16 training tokens/s and MFU against its
# `transformers` twin in the same run (bench/train.py), eager and compiled.
#
# Each check prints PASS, FAIL or SKIP with a reason; a failing or hanging check never stops the
# others. The exit code is 1 if any check failed. Results: $OUT/gpu.json and $OUT/gpu.log, or
# bench/results/gpu/ when OUT is not set.
#
# Without CUDA every check says SKIP (no CUDA), and a CPU smoke of the same code paths runs on the
# tiny preset (cpu_*: autocast, fused AdamW, flash SDPA, FlexAttention's forward, FSDP2 under torchrun with gloo, the bench),
# in under a minute, so the script itself is tested where there is no GPU (tests/test_bench_gpu.py).
#
# Environment: OUT (results folder), PYTHON (default python3), GPU_SH_DEVICE=cpu (the CPU smoke even
# where there is a GPU), GPU_SH_BUDGET (seconds for all checks, default 450: what is not started by
# then is skipped), GPU_SH_SKIP (check names to skip, space-separated, cpu_* ones included).

set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
RESULTS="${OUT:-$ROOT/bench/results/gpu}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_SH_BUDGET:-450}"
SKIP_LIST=" ${GPU_SH_SKIP:-} "
export PYTHONPATH="$ROOT/src:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"  # this tree's lmforge, not an installed one
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS"
CHECKS_DIR="$(mktemp -d)"
trap 'rm -rf "$CHECKS_DIR"' EXIT
LOG="$RESULTS/gpu.log"
: >"$LOG"
CHECKS=(autocast fused_adamw flash_sdpa cp_blocks compile flex_masks fsdp2 fsdp2_offload ddp bench_small bench_small_compile)

gpus() {  # CUDA devices torch sees; no torch import (seconds) where there is no NVIDIA device at all
  [ "${GPU_SH_DEVICE:-}" = cpu ] && { echo 0; return; }
  command -v nvidia-smi >/dev/null || [ -e /dev/nvidia0 ] || [ -e /dev/nvidiactl ] || { echo 0; return; }
  "$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>>"$LOG" || echo 0
}

record() {  # record STATUS REASON NAME...
  "$PY" bench/gpu_report.py record "$@" --dir "$CHECKS_DIR" | tee -a "$LOG"
}

# attempt SECONDS NAME... -- COMMAND...: run COMMAND within the time left (at most SECONDS); every
# NAME it should have recorded and did not (a crash, a hang, the budget) becomes a FAIL or SKIP.
attempt() {
  local limit="$1" names=() name cmd rc left
  shift
  while [ "$1" != "--" ]; do names+=("$1"); shift; done
  shift
  left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    record SKIP "time budget of ${BUDGET} s spent" "${names[@]}"
    return
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "--- ${names[*]} (at most ${limit} s): $*" >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  for name in "${names[@]}"; do
    if [ ! -f "$CHECKS_DIR/$name.json" ]; then
      if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        record FAIL "did not finish within ${limit} s (see gpu.log)" "$name"
      else
        record FAIL "exited $rc before reporting: $(grep -v '^\s*$' "$LOG" | tail -n 1 | cut -c1-200)" "$name"
      fi
    elif [ "$rc" -ne 0 ] && grep -q '"status": "PASS"' "$CHECKS_DIR/$name.json"; then
      record FAIL "reported PASS, then exited $rc (see gpu.log)" "$name"
    else
      grep -h '"status"\|"reason"' "$CHECKS_DIR/$name.json" | tr -d '\n' | sed 's/^ *//' >>"$LOG"; echo >>"$LOG"
    fi
  done
}

wanted() { [[ "$SKIP_LIST" != *" $1 "* ]]; }

skip_unwanted() {  # skip_unwanted NAME...: a SKIP record for each one GPU_SH_SKIP names
  local c skipped=()
  for c in "$@"; do wanted "$c" || skipped+=("$c"); done
  [ "${#skipped[@]}" -eq 0 ] || record SKIP "GPU_SH_SKIP" "${skipped[@]}"
}

TORCHRUN=("$PY" -m torch.distributed.run --standalone)  # a free rendezvous port each time

N="$(gpus)"
echo "bench/gpu.sh: $N CUDA device(s); results in $RESULTS" | tee -a "$LOG"

if [ "$N" -gt 0 ]; then
  skip_unwanted "${CHECKS[@]}"
  in_process=()
  for c in autocast fused_adamw flash_sdpa cp_blocks; do wanted "$c" && in_process+=("$c"); done
  [ "${#in_process[@]}" -gt 0 ] && attempt 120 "${in_process[@]}" -- \
    "$PY" bench/gpu_checks.py run "${in_process[@]}" --dir "$CHECKS_DIR"
  wanted compile && attempt 180 compile -- "$PY" bench/gpu_checks.py run compile --dir "$CHECKS_DIR"
  wanted flex_masks && attempt 180 flex_masks -- "$PY" bench/gpu_checks.py run flex_masks --dir "$CHECKS_DIR"
  for c in fsdp2 fsdp2_offload; do
    wanted "$c" && attempt 120 "$c" -- \
      "${TORCHRUN[@]}" --nproc_per_node=1 bench/gpu_checks.py run "$c" --dir "$CHECKS_DIR"
  done
  if wanted ddp; then
    if [ "$N" -gt 1 ]; then
      attempt 120 ddp -- "${TORCHRUN[@]}" --nproc_per_node="$N" bench/gpu_checks.py run ddp --dir "$CHECKS_DIR"
    else
      record SKIP "one GPU visible: NCCL DDP needs two" ddp
    fi
  fi
  wanted bench_small && attempt 150 bench_small -- "$PY" bench/gpu_report.py bench bench_small --dir "$CHECKS_DIR" \
    -- --config small --device cuda --precision bf16
  wanted bench_small_compile && attempt 200 bench_small_compile -- "$PY" bench/gpu_report.py bench bench_small_compile \
    --dir "$CHECKS_DIR" -- --config small --device cuda --precision bf16 --no-memory train.compile=true
else
  record SKIP "no CUDA" "${CHECKS[@]}"
  skip_unwanted cpu_autocast cpu_fused_adamw cpu_flash_sdpa cpu_cp_blocks cpu_flex_masks cpu_fsdp2 cpu_bench_tiny
  smoke=()
  for c in autocast fused_adamw flash_sdpa cp_blocks flex_masks; do wanted "cpu_$c" && smoke+=("$c"); done
  [ "${#smoke[@]}" -gt 0 ] && attempt 60 "${smoke[@]/#/cpu_}" -- \
    "$PY" bench/gpu_checks.py run "${smoke[@]}" --device cpu --dir "$CHECKS_DIR"
  wanted cpu_fsdp2 && attempt 60 cpu_fsdp2 -- \
    "${TORCHRUN[@]}" --nproc_per_node=1 bench/gpu_checks.py run fsdp2 --device cpu --dir "$CHECKS_DIR"
  wanted cpu_bench_tiny && attempt 60 cpu_bench_tiny -- \
    "$PY" bench/gpu_report.py bench cpu_bench_tiny --dir "$CHECKS_DIR" -- \
    --config tiny --device cpu --precision fp32 --batch 2 --seq-len 64 --repeats 2 --warmup 1 --no-memory \
    --threads 1 --vocab 512 model.n_layer=2 model.n_embd=64 model.n_head=4 model.n_kv_head=4
fi

"$PY" bench/gpu_report.py summary --dir "$CHECKS_DIR" --json "$RESULTS/gpu.json"
