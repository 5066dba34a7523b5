"""The fit planner's answer for every preset on a few machines; prints ONE JSON object (or --markdown).

    python bench/fit.py [--machines 1x24GB,8x16GB,8x80GB] [--batch 8] [--markdown]

Arithmetic, not a measurement (model/fit.py): what `lmforge model info PRESET --gpus N --gpu-mem M`
suggests at micro-batch 8 x the preset's context, bf16, AdamW, vocab 50304, with the memory per GPU
of the suggested layout and of plain DDP for comparison. Runs in seconds on any machine.
"""

from __future__ import annotations

import argparse
import json

from lmforge.model.fit import GiB, Layout, param_counts, parse_memory, plan
from lmforge.model.presets import DEFAULT_INFO_VOCAB, PRESETS, model_config


def answer(preset: str, machine: str, batch: int) -> dict:
    n, mem = machine.lower().split("x")
    cfg = model_config(preset, vocab_size=DEFAULT_INFO_VOCAB)
    result = plan(cfg, int(n), parse_memory(mem), batch, cfg.max_seq_len)
    ddp = next(r for r in result.rows if r.layout == Layout(dp_replicate=int(n)))
    out = {"preset": preset, "machine": machine, "params_m": round(param_counts(cfg).total / 1e6, 1),
           "seq_len": cfg.max_seq_len, "ddp_gib": round(ddp.memory["total"] / GiB, 2), "layout": None}
    if result.best:
        keys = result.best.layout.keys()
        if result.best_batch != batch:
            keys.append(f"train.micro_batch={result.best_batch}")
        out.update(layout=result.best.layout.name, gib=round(result.best.memory["total"] / GiB, 2),
                   host_gib=round(result.best.memory["host"] / GiB, 2), micro_batch=result.best_batch, keys=keys)
    return out


def cell(a: dict) -> str:
    if a["layout"] is None:
        return "nothing fits"
    at = f" at micro-batch {a['micro_batch']}" if a["micro_batch"] != 8 else ""
    host = f" (+{a['host_gib']:.1f} GiB host)" if a["host_gib"] else ""
    return f"{a['layout']}: {a['gib']:.1f} GiB{host}{at}"


def markdown(answers: list[dict], machines: list[str]) -> str:
    head = "| preset | params | context | " + " | ".join(m.replace("x", " × ") for m in machines) + " |"
    lines = [head, "|" + "---|" * (3 + len(machines))]
    for preset in dict.fromkeys(a["preset"] for a in answers):
        row = {a["machine"]: a for a in answers if a["preset"] == preset}
        first = row[machines[0]]
        lines.append(f"| {preset} | {first['params_m']:.0f}M | {first['seq_len']} | "
                     + " | ".join(cell(row[m]) for m in machines) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machines", default="1x24GB,8x16GB,8x80GB")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    machines = args.machines.split(",")
    answers = [answer(p, m, args.batch) for p in PRESETS for m in machines]
    print(markdown(answers, machines) if args.markdown else json.dumps({"bench": "fit", "results": answers}, indent=2))


if __name__ == "__main__":
    main()
