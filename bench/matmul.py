"""The machine's dense matmul rate: the ceiling that MFU (model FLOPs utilisation) is measured against.

    python bench/matmul.py [--sizes 512,1024,2048] [--dtypes fp32,bf16] [--seconds 2] [--threads N]

For each size and dtype, square (n x n) @ (n x n) matmuls run for --seconds; the rate of each is
2 n^3 / time. Prints one JSON object with the median and min/max per size, and `ceiling_gflops`
per dtype: the median at --reference (default 1024, the size `lmforge pretrain` measures for the
MFU in its logs, so training logs and benchmarks agree). bf16 is reported where the device runs it
natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX); elsewhere it is emulated and many times
slower, and the JSON says so instead of passing that off as a ceiling.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from common import log, machine, matmul_rate, spread

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024,2048", help="comma-separated square sizes")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--reference", type=int, default=1024, help="size whose median is the ceiling")
    ap.add_argument("--seconds", type=float, default=2.0, help="per size and dtype")
    ap.add_argument("--rounds", type=int, default=3, help="passes over all sizes, interleaved")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads; 0: torch's default")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sizes = sorted({int(s) for s in args.sizes.split(",")} | {args.reference})
    dtypes = [d for d in args.dtypes.split(",") if d]
    info = machine(device)
    rates: dict[str, dict[int, list[float]]] = {d: {n: [] for n in sizes} for d in dtypes}
    emulated = [d for d in dtypes if d == "bf16" and not native_bf16(device)]
    for r in range(args.rounds):  # interleave sizes so a burst of load hits all of them
        for d in dtypes:
            for n in sizes:
                if d in emulated and n > 512:
                    continue  # emulated bf16: one small size says enough, large ones take minutes
                secs = args.seconds / args.rounds
                per_call = matmul_rate(n, DTYPES[d], device, secs)
                rates[d][n].append(statistics.median(per_call))
                log(f"round {r + 1}: {d} {n}: {rates[d][n][-1]:.1f} GFLOP/s")
    out = {"bench": "matmul", "machine": info, "rounds": args.rounds, "seconds_per_size": args.seconds,
           "gflops": {d: {str(n): spread(v, 1) for n, v in by_n.items() if v} for d, by_n in rates.items()},
           "reference_size": args.reference}
    out["ceiling_gflops"] = {d: round(statistics.median(rates[d][args.reference]), 1)
                             for d in dtypes if rates[d][args.reference]}
    out["best_gflops"] = {d: round(max(statistics.median(v) for v in by_n.values() if v), 1)
                          for d, by_n in rates.items() if any(by_n.values())}
    if emulated:
        out["bf16_native"] = False
        out["note_bf16"] = ("no native bf16 matmul on this device (no AVX512-BF16/AMX): bf16 is emulated, "
                            "so fp32 is the precision to train in here and the only meaningful ceiling")
    if device.type == "cpu":
        out["machine"]["load_avg_1min_end"] = machine(device).get("load_avg_1min")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
