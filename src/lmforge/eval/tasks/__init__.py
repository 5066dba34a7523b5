"""Benchmark tasks: one reader per published format behind one Task interface (see base.py).

A task is named on the command line as `family:path[:option=value...]`, the path a local file or
folder as the benchmark publishes it:

    eval.tasks=[hellaswag:data/hellaswag_val.jsonl, mmlu:data/mmlu, gsm8k:gsm8k/test.jsonl:shots=8:limit=500]

or a Hugging Face dataset split, downloaded once and cached (`mmlu:hf:cais/mmlu:all@test`).

Options: shots=N (this task's few-shot count, overriding eval.num_fewshot), limit=N (first N
questions), as=NAME (the name reported), extract=exact|last_number|hash|regex=PATTERN (gen only;
regex= takes the rest of the spec; quote the whole list when a pattern holds brackets or ": ").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.tasks.arith import accuracy, arith, evaluate_task, run_stage_eval, stage_eval_done
from lmforge.eval.tasks.base import Doc, Task
from lmforge.eval.tasks.cloze import lambada
from lmforge.eval.tasks.code import humaneval, mbpp
from lmforge.eval.tasks.files import HUB_PREFIX, hub_file
from lmforge.eval.tasks.gen import generic_gen, gsm8k
from lmforge.eval.tasks.mc import arc, ceval, cmmlu, generic_mc, hellaswag, mmlu, piqa, winogrande

__all__ = ["READERS", "Doc", "Task", "TaskSpec", "accuracy", "evaluate_task", "load_task", "parse_spec",
           "run_stage_eval", "stage_eval_done"]

READERS: dict[str, Callable[[Path], Task]] = {
    "hellaswag": hellaswag, "arc_easy": lambda p: arc(p, "arc_easy"),
    "arc_challenge": lambda p: arc(p, "arc_challenge"),
    "arc": arc, "piqa": piqa, "winogrande": winogrande, "mmlu": mmlu, "ceval": ceval, "cmmlu": cmmlu,
    "lambada": lambada, "gsm8k": gsm8k, "humaneval": humaneval, "mbpp": mbpp, "mc": generic_mc, "gen": generic_gen,
    "arith": arith,
}
OPTIONS = ("shots", "limit", "as", "extract")


@dataclass
class TaskSpec:
    family: str
    path: Path
    shots: int | None = None  # None: eval.num_fewshot
    limit: int = 0
    label: str = ""
    extract: str = "exact"


def parse_spec(spec: str, run_dir: str = "") -> TaskSpec:
    """`family:path[:shots=5][:limit=100][:as=name][:extract=...]` -> TaskSpec, or an error showing the syntax."""
    usage = (f"eval.tasks entry {spec!r}: write family:path[:shots=N][:limit=N][:as=NAME][:extract=...], "
             f"family one of {', '.join(READERS)}")
    family, sep, rest = spec.strip().partition(":")
    if not sep or not rest:
        raise LmforgeError(usage)
    family = family.strip().lower()
    if family not in READERS:
        raise LmforgeError(f"eval.tasks: unknown task family '{family}'. " + usage)
    # Options are the trailing key=value segments; a regex takes everything after its "regex=".
    segments = rest.split(":")
    first = next((i for i, seg in enumerate(segments) if i and "=" in seg), len(segments))
    out = TaskSpec(family, Path(":".join(segments[:first]).strip().replace("{run_dir}", run_dir)))
    options = segments[first:]
    while options:
        key, _, value = options.pop(0).partition("=")
        if key == "extract" and value.startswith("regex="):
            value, options = ":".join([value, *options]), []
        if key not in OPTIONS:
            raise LmforgeError(f"eval.tasks entry {spec!r}: unknown option '{key}' (options: {', '.join(OPTIONS)})")
        if key in ("shots", "limit"):
            if not value.isdigit():
                raise LmforgeError(f"eval.tasks entry {spec!r}: {key}={value!r} is not a whole number")
            setattr(out, key, int(value))
        elif key == "as":
            out.label = value
        else:
            out.extract = value
    return out


def load_task(spec: TaskSpec) -> Task:
    """Read the files a spec names into a Task (its name the spec's `as`, else the family's); an `hf:` path
    is a Hub dataset split, downloaded once into the cache (files.hub_file)."""
    path = hub_file(str(spec.path)) if str(spec.path).startswith(HUB_PREFIX) else spec.path
    if spec.family == "gen":
        task = generic_gen(path, spec.extract)
    else:
        task = READERS[spec.family](path)
    if not task.docs:
        raise LmforgeError(f"{spec.path}: no questions in {spec.family} format")
    if spec.limit:
        task.docs = task.docs[:spec.limit]
    if spec.label:
        task.name = spec.label
    return task
