"""The torch-free half of `bench/gpu.sh`: record a check, run the speed bench, sum everything up.

    python bench/gpu_report.py record SKIP|FAIL "reason" NAME [NAME ...] --dir DIR
    python bench/gpu_report.py bench NAME --dir DIR -- [bench/train.py arguments]
    python bench/gpu_report.py summary --dir DIR --json OUT.json

Kept apart from bench/gpu_checks.py so that these steps do not import torch: each import costs
seconds, and the CPU fallback of gpu.sh has a minute in all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def write(dir_: Path, name: str, status: str, reason: str, seconds: float = 0.0, **figures) -> None:
    """DIR/NAME.json and one printed line: the record every check leaves, whatever ran it."""
    dir_.mkdir(parents=True, exist_ok=True)
    record = {"check": name, "status": status, "reason": reason, "seconds": round(seconds, 1), **figures}
    (dir_ / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{status:<4}  {name:<22} {reason}", flush=True)


def bench(name: str, dir_: Path, args: list[str]) -> None:
    """bench/train.py with `args`: lmforge against its `transformers` twin; PASS once it measured both."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "train.py"), *args],
                          capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    try:
        result = json.loads(proc.stdout)
        lm, hf = result["lmforge"], result["transformers"]
    except (ValueError, KeyError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        write(dir_, name, "FAIL", f"bench/train.py exited {proc.returncode}: {tail}", time.perf_counter() - t)
        return
    reason = (f"{result['params_m']}M params, {result['precision']}: lmforge {lm['tokens_per_s']['median']:,.0f} "
              f"tokens/s (MFU {lm['mfu']:.1%}) vs transformers {hf['tokens_per_s']['median']:,.0f} "
              f"(MFU {hf['mfu']:.1%}): {result['speedup_vs_transformers']['median']:.2f}x")
    write(dir_, name, "PASS", reason, time.perf_counter() - t, result=result)


def summary(dir_: Path, out: Path) -> int:
    """One JSON of every check, in the order they ran, and a table; 1 if any check failed."""
    files = sorted(dir_.glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    checks = [json.loads(p.read_text()) for p in files]
    counts = {s: sum(c["status"] == s for c in checks) for s in ("PASS", "FAIL", "SKIP")}
    ran = next((c for c in checks if c.get("torch")), {})
    record = {"bench": "gpu", "torch": ran.get("torch"), "gpu": ran.get("gpu"), "counts": counts, "checks": checks}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nbench/gpu.sh on {record['gpu'] or 'a machine without CUDA'} (torch {record['torch']}):")
    for c in checks:
        print(f"  {c['status']:<4}  {c['check']:<22} {c['reason']}")
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped; {out}")
    return 1 if counts["FAIL"] else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["record", "bench", "summary"])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--dir", type=Path, required=True, help="where each check's JSON goes")
    ap.add_argument("--json", type=Path, help="summary: the combined JSON to write")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    if a.action == "record":
        status, reason, *names = a.names
        for name in names:
            write(a.dir, name, status, reason)
    elif a.action == "bench":
        bench(a.names[0], a.dir, argv[cut + 1:])
    else:
        return summary(a.dir, a.json or a.dir / "gpu.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
