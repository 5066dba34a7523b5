"""`lmforge eval eval.tasks=[...]`: a checkpoint on a list of benchmarks, a CORE-style score, a report.

Writes <out>/bench-<stage>-<step>.json (every task's figures and each question's outcome, so two
evaluations can be compared question by question), a Markdown table beside it and a bar chart PNG.
`lmforge eval compare A B` reads two such files (or the latest of two run folders) and prints the
per-task difference with a 95 % interval.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from lmforge.config import Config
from lmforge.console import log
from lmforge.errors import LmforgeError
from lmforge.eval.core import binomial_interval, centred, core_score, paired_bootstrap
from lmforge.eval.tasks import load_task, parse_spec
from lmforge.eval.tasks.score import run_task
from lmforge.io import atomic_write_bytes, atomic_write_json, atomic_write_text

PREFIX = "bench-"


def out_dir(cfg: Config, ckpt: Path) -> Path:
    if cfg.eval.out:
        return Path(cfg.eval.out)
    if (cfg.run_path / "lmforge.yaml").is_file() or ckpt.resolve().is_relative_to(cfg.run_path.resolve()):
        return cfg.run_path / "eval"
    return ckpt / "eval"


def evaluate_suite(model, tok, cfg: Config, specs: list[str] | None = None) -> dict:
    """Every task of `specs` (eval.tasks by default) on an open model: per-task figures, per-question outcomes
    and the CORE-style score. The model is left in eval mode; nothing is written."""
    ec = cfg.eval
    tasks = {}
    clean = contamination_filter(cfg)
    for raw in specs if specs is not None else ec.tasks:
        spec = parse_spec(raw, cfg.run_dir)
        task = load_task(spec)
        if task.name in tasks:
            raise LmforgeError(f"eval.tasks: two tasks are named '{task.name}'; give one of them :as=NAME")
        excluded = clean(task) if clean else 0
        shots = ec.num_fewshot if spec.shots is None else spec.shots
        if task.kind == "code":
            shots = 0  # a HumanEval/MBPP prompt is complete as published; worked solutions would show tests
        t0 = time.perf_counter()
        per_doc = run_task(model, tok, task, shots, ec.fewshot_seed, ec.chat, ec.batch_size,
                           cfg.generate.max_new_tokens, ec.samples, ec.temperature, ec.exec_timeout)
        seconds = time.perf_counter() - t0
        metrics = sorted({k for d in per_doc for k, v in d.items() if isinstance(v, float) and k.startswith(
            ("acc", "exact", "pass@"))})
        figures = {m: sum(d[m] for d in per_doc) / len(per_doc) for m in metrics}
        main = task.main_metric
        tasks[task.name] = {
            "family": spec.family, "path": str(spec.path), "kind": task.kind, "shots": shots, "n": len(per_doc),
            "metric": main, "acc": figures[main], "baseline": task.baseline,
            "centred": centred(figures[main], task.baseline), "metrics": figures, "seconds": round(seconds, 2),
            "excluded_contaminated": excluded,
            "outcomes": [d[main] for d in per_doc],
            "examples": [{k: v for k, v in d.items() if k in ("where", "reply", main)} for d in per_doc[:5]]}
        log(f"{task.name}: {main} {100 * figures[main]:.1f}% over {len(per_doc)} "
            + (f"clean examples ({excluded} contaminated left out) " if clean else "")
            + f"(chance {100 * task.baseline:.1f}%, {seconds:.1f}s)")
    return {"tasks": tasks, "core": core_score(tasks) if tasks else 0.0, "chat": ec.chat,
            "fewshot_seed": ec.fewshot_seed}


def contamination_filter(cfg: Config):
    """eval.exclude_contaminated: a callable that drops a task's contaminated examples, else None."""
    if not cfg.eval.exclude_contaminated:
        return None
    from lmforge.eval.contamination import Cleaner

    return Cleaner(cfg)


def benchmark_fn(cfg: Config, tok):
    """model -> {"bench_<task>": score, "bench_core": CORE} for pretraining's validation passes
    (`eval.train_tasks`). The files are read now, so a wrong path fails before training starts."""
    from lmforge.eval.tasks.score import run_task as score_task

    specs = [parse_spec(s, cfg.run_dir) for s in cfg.eval.train_tasks]
    tasks = [(t, 0 if t.kind == "code" else cfg.eval.num_fewshot if s.shots is None else s.shots)
             for s, t in ((s, load_task(s)) for s in specs)]
    clean = contamination_filter(cfg)
    for task, _ in tasks if clean else ():
        clean(task)
    ec = cfg.eval

    def benchmarks(model) -> dict[str, float]:
        out, centres = {}, []
        for task, shots in tasks:
            per_doc = score_task(model, tok, task, shots, ec.fewshot_seed, ec.chat, ec.batch_size,
                                 cfg.generate.max_new_tokens, ec.samples, ec.temperature, ec.exec_timeout)
            score = sum(d[task.main_metric] for d in per_doc) / len(per_doc)
            out[f"bench_{task.name}"] = score
            centres.append(centred(score, task.baseline))
        out["bench_core"] = sum(centres) / len(centres)
        return out
    return benchmarks


def result_path(cfg: Config, ckpt: Path) -> Path:
    from lmforge.eval.lm import stage_label

    return out_dir(cfg, ckpt) / f"{PREFIX}{stage_label(ckpt, cfg.run_path)}-{ckpt.name}.json"


def suite_done(cfg: Config) -> bool:
    """The recipe stage `bench` is done when its checkpoint already has a result (a newer checkpoint has none)."""
    from lmforge.checkpoint import resolve_checkpoint

    try:
        target, key = (cfg.eval.checkpoint, "eval.checkpoint") if cfg.eval.checkpoint else (cfg.run_dir, "")
        return result_path(cfg, resolve_checkpoint(target, cfg.run_dir, key)).is_file()
    except LmforgeError:
        return False


def run_suite(cfg: Config) -> dict:
    """`lmforge eval eval.tasks=[...]`, and the recipe stage `bench`: score, write JSON + Markdown + PNG, print."""
    from lmforge.eval.lm import open_checkpoint

    if not cfg.eval.tasks:
        raise LmforgeError("eval.tasks is empty: name the benchmarks, e.g. eval.tasks=[hellaswag:hellaswag_val.jsonl]")
    model, tok, ckpt = open_checkpoint(cfg)
    refuse_encoder_decoder(model, ckpt, "eval.tasks")
    result = {"checkpoint": str(ckpt), **evaluate_suite(model, tok, cfg)}
    out = result_path(cfg, ckpt)
    atomic_write_json(out, result)
    table = markdown(result)
    atomic_write_text(out.with_suffix(".md"), table)
    png = bar_chart(result)
    if png:
        atomic_write_bytes(out.with_suffix(".png"), png)
    print(table)
    log(f"CORE {result['core']:.4f} -> {out} (+ .md" + (", .png)" if png else ")"))
    return result


def refuse_encoder_decoder(model, ckpt: Path, what: str) -> None:
    """Benchmarks score a decoder's continuations; an encoder-decoder has its own evaluation."""
    if getattr(model, "is_encoder_decoder", False):
        raise LmforgeError(f"{ckpt}: an encoder-decoder (T5) checkpoint; {what} scores decoder-only models. "
                           "Evaluate it on seq2seq JSONL with `lmforge eval eval.files=...` (target loss and "
                           "exact match)")


# --- reports ---------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    lines = [f"# Benchmarks of {result['checkpoint']}", "",
             "| task | metric | score | chance | centred | shots | n |", "|---|---|---:|---:|---:|---:|---:|"]
    excluded = 0
    for name, t in result["tasks"].items():
        left_out = t.get("excluded_contaminated", 0)
        excluded += left_out
        lines.append(f"| {name} | {t['metric']} | {100 * t['acc']:.2f} | {100 * t['baseline']:.2f} | "
                     f"{t['centred']:.4f} | {t['shots']} | {t['n']}" + (f" (+{left_out} contaminated)" if left_out
                                                                         else "") + " |")
    lines += ["", f"**CORE** (mean of centred scores, (acc - chance) / (1 - chance)): **{result['core']:.4f}**", ""]
    if excluded:
        lines += [f"Scored on the clean examples only: {excluded} contaminated ones left out "
                  "(`lmforge eval contamination`).", ""]
    return "\n".join(lines)


def bar_chart(result: dict) -> bytes | None:
    """Each task's score beside its chance level, as PNG bytes (None without matplotlib)."""
    try:
        from matplotlib.figure import Figure

        from lmforge.plot import font_rc
    except ImportError:
        return None
    import matplotlib

    names = list(result["tasks"])
    with matplotlib.rc_context(font_rc()):
        fig = Figure(figsize=(max(4.0, 0.9 * len(names) + 2), 3.6))
        ax = fig.add_subplot()
        xs = range(len(names))
        ax.bar(xs, [100 * result["tasks"][n]["acc"] for n in names], color="tab:blue", label="score")
        ax.scatter(xs, [100 * result["tasks"][n]["baseline"] for n in names], color="0.2", marker="_", s=400,
                   label="chance", zorder=3)
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.set_title(f"CORE {result['core']:.3f}", loc="left", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# --- compare ---------------------------------------------------------------------------------------------

def result_file(arg: str) -> Path:
    """A bench-*.json, or the newest one in a run's eval/ folder (or in a folder of them)."""
    p = Path(arg)
    if p.is_file():
        return p
    for folder in (p / "eval", p):
        found = sorted(folder.glob(f"{PREFIX}*.json"), key=lambda f: f.stat().st_mtime) if folder.is_dir() else []
        if found:
            return found[-1]
    raise LmforgeError(f"{arg}: neither a {PREFIX}*.json result nor a run folder with eval/{PREFIX}*.json in it "
                       "(run `lmforge eval eval.tasks=[...]` first)")


def compare(a: dict, b: dict, seed: int = 0) -> list[dict]:
    """Per task both runs have: B - A with a 95 % interval, paired when the questions are the same."""
    rows = []
    for name, ta in a["tasks"].items():
        tb = b["tasks"].get(name)
        if tb is None:
            continue
        if len(ta["outcomes"]) == len(tb["outcomes"]) and ta["path"] == tb["path"]:
            d, lo, hi = paired_bootstrap(ta["outcomes"], tb["outcomes"], seed=seed)
            how = "paired bootstrap"
        else:
            d, lo, hi = binomial_interval(ta["acc"], ta["n"], tb["acc"], tb["n"])
            how = "binomial"
        rows.append({"task": name, "a": ta["acc"], "b": tb["acc"], "diff": d, "low": lo, "high": hi,
                     "significant": lo > 0 or hi < 0, "interval": how})
    return rows


def cmd_compare(argv: list[str]) -> int:
    if len(argv) != 2 or any(a.startswith("-") for a in argv):
        raise LmforgeError("usage: lmforge eval compare RUN_A RUN_B (run folders or bench-*.json files): "
                           "prints B - A per task with a 95 % interval")
    fa, fb = result_file(argv[0]), result_file(argv[1])
    a, b = (json.loads(f.read_text(encoding="utf-8")) for f in (fa, fb))
    rows = compare(a, b)
    if not rows:
        raise LmforgeError(f"{fa} and {fb} share no task")
    print(f"A = {fa}\nB = {fb}\n")
    print(f"{'task':<18} {'A':>7} {'B':>7} {'B - A':>8}   95% interval")
    for r in rows:
        mark = "  *" if r["significant"] else ""
        print(f"{r['task']:<18} {100 * r['a']:>6.2f}% {100 * r['b']:>6.2f}% {100 * r['diff']:>+7.2f}   "
              f"[{100 * r['low']:+.2f}, {100 * r['high']:+.2f}] ({r['interval']}){mark}")
    print(f"\nCORE {a['core']:.4f} -> {b['core']:.4f}; * the interval excludes 0: more than noise")
    return 0
