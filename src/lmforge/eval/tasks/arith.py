"""The demo's generative task: exact-match accuracy of greedy answers on held-out prompts.

`lmforge eval eval.task=arith` scores a checkpoint on the demo's held-out arithmetic problems
(RUN/demo/test.jsonl); `eval.task=path.jsonl` on any file of {"prompt" or "messages", "answer"}.
Each prompt is rendered by the same chat renderer training used, answered greedily by the engine
(batched, KV-cached), and counted correct when the last number in the reply equals "answer".
Results go to RUN/eval/<stage>-<step>-<task>.json, beside the loss evaluations.

The recipe stages eval-<stage> score through the benchmark suite instead (`arith:` beside the generic
`gen:` JSONL scorer on the same file), so each stage also gets the suite's bench-<stage>-<step>.json,
Markdown table and chart, and two ways of scoring one file check each other.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lmforge.checkpoint import STAGES, resolve_checkpoint
from lmforge.config import Config
from lmforge.console import log
from lmforge.errors import LmforgeError
from lmforge.eval.lm import open_checkpoint, stage_label
from lmforge.eval.tasks.base import Task
from lmforge.eval.tasks.gen import generic_gen

CJK = re.compile(r"[\u4e00-\u9fff]")


def task_file(cfg: Config) -> tuple[str, Path]:
    task = cfg.eval.task
    if task == "arith":
        path = cfg.run_path / "demo" / "test.jsonl"
        if not path.is_file():
            raise LmforgeError(f"eval.task=arith: {path} not found; run the demo stage first "
                               "(`lmforge run recipes/posttrain-demo.yaml`)")
        return "arith", path
    path = Path(task.replace("{run_dir}", cfg.run_dir))
    if not path.is_file():
        raise LmforgeError(f"eval.task={task!r}: neither 'arith' nor a .jsonl/.json file of prompts with answers")
    return path.stem, path


def arith(path: Path) -> Task:
    """The suite's `arith:` family: a run folder (its demo/test.jsonl) or a {"prompt", "answer"} file, scored on
    the last number of the reply, as `eval.task=arith` scores it."""
    path = Path(path)
    if path.is_dir():
        path = path / "demo" / "test.jsonl"
        if not path.is_file():
            raise LmforgeError(f"arith:{path.parent.parent}: no demo/test.jsonl there; run the demo stage first")
    task = generic_gen(path, "last_number")
    task.name, task.stop = "arith", ()  # a chat reply ends at <|im_end|>, as `eval.task=arith` reads it
    return task


@torch.no_grad()
def accuracy(model, tok, records, batch_size: int, max_new_tokens: int) -> tuple[list[str], list[float]]:
    """Greedy replies to each record's prompt and whether each one's last number is its "answer"."""
    from lmforge.data.chat import prompt_messages, render_conversation
    from lmforge.infer.engine import default_stop_ids, generate_ids
    from lmforge.infer.sampling import SamplingParams
    from lmforge.train.rewards import exact_match

    for r in records:
        if "answer" not in r.data:
            raise LmforgeError(f"{r.where}: no 'answer' field to compare the reply with")
    prompts = [render_conversation(tok, prompt_messages(r), 0, r.where, add_generation_prompt=True)[0]
               for r in records]
    stop = default_stop_ids(tok)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    replies: list[str] = []
    for i in range(0, len(prompts), batch_size):
        out = generate_ids(model, prompts[i:i + batch_size], params, stop_ids=stop, vocab_limit=tok.vocab_size)
        replies += [tok.decode([t for t in o if t not in stop]) for o in out]
    return replies, exact_match(replies, [r.data for r in records])


def evaluate_task(cfg: Config) -> dict:
    from lmforge.data.chat import prompt_messages, read_records
    from lmforge.io import atomic_write_json

    ec = cfg.eval
    name, path = task_file(cfg)
    model, tok, ckpt = open_checkpoint(cfg)
    records = read_records([str(path)], "evaluation prompts")
    if ec.max_batches:
        records = records[:ec.max_batches * ec.batch_size]
    replies, correct = accuracy(model, tok, records, ec.batch_size, cfg.generate.max_new_tokens)
    result = {"task": name, "accuracy": sum(correct) / len(correct), "correct": int(sum(correct)),
              "total": len(correct), "checkpoint": str(ckpt), **by_language(records, correct)}
    result["examples"] = [{"prompt": prompt_messages(r)[-1]["content"], "reply": a, "answer": r.data["answer"]}
                          for r, a in list(zip(records, replies))[:5]]
    out = result_path(cfg, ckpt, name)
    atomic_write_json(out, result)
    log(f"{name}: exact-match accuracy {100 * result['accuracy']:.1f}% ({result['correct']}/{result['total']}"
        + languages_text(result) + f") of {ckpt} -> {out}")
    return result


def by_language(records: list, correct: list[float]) -> dict:
    """accuracy_en / accuracy_zh over the records whose last prompt message is in that language."""
    from lmforge.data.chat import prompt_messages

    langs = ["zh" if CJK.search(prompt_messages(r)[-1]["content"]) else "en" for r in records]
    out = {}
    for lang in ("en", "zh"):
        hits = [c for c, g in zip(correct, langs) if g == lang]
        if hits:
            out[f"accuracy_{lang}"] = sum(hits) / len(hits)
    return out


def languages_text(result: dict) -> str:
    return "".join(f", {g} {100 * result[f'accuracy_{g}']:.1f}%" for g in ("en", "zh") if f"accuracy_{g}" in result)


def result_path(cfg: Config, ckpt: Path, name: str) -> Path:
    return cfg.run_path / "eval" / f"{stage_label(ckpt, cfg.run_path)}-{ckpt.name}-{name}.json"


# --- recipe stages: eval-<stage> scores that stage's latest checkpoint on the demo task ----------

def _stage_cfg(cfg: Config, stage: str) -> Config:
    import copy

    sub = copy.deepcopy(cfg)
    folder = stage if stage in STAGES else str(cfg.run_path / stage)  # grpo-rm: a folder of this run
    sub.eval.checkpoint = str(resolve_checkpoint(folder, cfg.run_dir))
    sub.eval.task = cfg.eval.task or "arith"
    return sub


def run_stage_eval(cfg: Config, stage: str) -> dict:
    """The demo's eval-<stage>: the suite on the task (`arith:`) and on the same file by the generic `gen:`
    scorer, asked in the chat template; then the task's own summary (accuracy, English / Chinese)."""
    from lmforge.data.chat import prompt_messages, read_records
    from lmforge.eval.suite import run_suite
    from lmforge.io import atomic_write_json

    sub = _stage_cfg(cfg, stage)
    name, path = task_file(sub)
    sub.eval.tasks = [f"arith:{path}:as={name}", f"gen:{path}:extract=last_number:as={path.name}"]
    sub.eval.chat, sub.eval.num_fewshot, sub.eval.out = True, 0, str(cfg.run_path / "eval")
    suite = run_suite(sub)
    task = suite["tasks"][name]
    records = read_records([str(path)], "evaluation prompts")
    correct = task["outcomes"]
    result = {"task": name, "accuracy": task["acc"], "correct": int(sum(correct)), "total": len(correct),
              "checkpoint": suite["checkpoint"], "generic_jsonl_accuracy": suite["tasks"][path.name]["acc"],
              **by_language(records, correct)}
    result["examples"] = [{"prompt": prompt_messages(r)[-1]["content"], "reply": e["reply"],
                           "answer": r.data["answer"]} for r, e in zip(records, task["examples"])]
    ckpt = Path(suite["checkpoint"])
    out = result_path(cfg, ckpt, name)
    atomic_write_json(out, result)
    log(f"{stage}: {name} exact match {100 * result['accuracy']:.1f}% ({result['correct']}/{result['total']}"
        + languages_text(result) + f"; generic JSONL scorer {100 * result['generic_jsonl_accuracy']:.1f}%) -> {out}")
    return result


def stage_eval_done(cfg: Config, stage: str) -> bool:
    try:
        sub = _stage_cfg(cfg, stage)
        name, _ = task_file(sub)
    except LmforgeError:
        return False
    ckpt = Path(sub.eval.checkpoint)
    label = "pretrain" if stage == "pretrain" else stage
    return (cfg.run_path / "eval" / f"{label}-{ckpt.name}-{name}.json").is_file()
