"""`lmforge eval harness`: lm-evaluation-harness through lmforge's own engine agrees, example for example,
with lmforge's scorer and with `lm_eval --model hf` on the exported folder, on local tasks written as lm-eval
YAML (a multiple-choice task, a rolling log-likelihood task); without lm-eval the command says what to install."""

from __future__ import annotations

import json
import random
import sys

import pytest
from corpora import WORDS, english
from test_chat import tiny_checkpoint, write_jsonl

from lmforge.cli import main as cli_main
from lmforge.config import load_config
from lmforge.errors import LmforgeError

lm_eval = pytest.importorskip("lm_eval")

QUIZ_YAML = """task: lmf_quiz
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
TEXT_YAML = """task: lmf_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    return e.value.code


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("harness")
    ck = tiny_checkpoint(root, seed=3)
    hf = root / "hf"
    assert cli(["export", "hf", str(ck), str(hf)]) == 0
    rng = random.Random(5)
    rows = [{"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "?",
             "choices": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)],
             "answer": i % 4} for i in range(16)]
    quiz = write_jsonl(root / "quiz.jsonl", rows)
    text = write_jsonl(root / "text.jsonl", [{"text": english(n, seed=s).replace("\n", " ").strip()}
                                             for s, n in ((1, 300), (2, 900), (3, 1500))])  # past 128 tokens: rolls
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "quiz.yaml").write_text(QUIZ_YAML.format(path=quiz))
    (tasks / "text.yaml").write_text(TEXT_YAML.format(path=text))
    return {"root": root, "ck": ck, "hf": hf, "quiz": quiz, "tasks": tasks}


def by_doc(samples: list[dict]) -> list[dict]:
    return sorted(samples, key=lambda s: s["doc_id"])


def test_adapter_equals_lmforge_scorer_and_lm_eval_hf(setup, capsys):
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness import run_harness
    from lmforge.eval.tasks import load_task, parse_spec
    from lmforge.eval.tasks.score import run_task
    from lmforge.infer.loading import load_for_inference

    tasks = ["lmf_quiz", "lmf_text"]
    # 1. The command, as a user runs it: results JSON + table beside the checkpoint.
    assert cli(["eval", "harness", ",".join(tasks), f"eval.checkpoint={setup['ck']}", "device=cpu",
                f"eval.harness_include={setup['tasks']}", f"eval.out={setup['root'] / 'out'}"]) == 0
    assert "lmf_quiz" in capsys.readouterr().out
    (res,) = (setup["root"] / "out").glob("harness-*.json")
    ours = json.loads(res.read_text())
    # 2. lmforge's own scorer on the same questions.
    model, tok, _ = load_for_inference(str(setup["ck"]), "cpu", "fp32")
    own = run_task(model, tok, load_task(parse_spec(f"mc:{setup['quiz']}")))
    # 3. lm-eval's transformers model on the exported folder; and the adapter in-process, for its samples.
    manager = TaskManager(include_path=str(setup["tasks"]))
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={setup['hf']},dtype=float32,device=cpu",
                                 tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)
    cfg = load_config(overrides=[f"eval.checkpoint={setup['ck']}", "device=cpu",
                                 f"eval.harness_include={setup['tasks']}", f"eval.out={setup['root'] / 'out2'}"])
    adapter = run_harness(cfg, tasks)

    for metric in ("acc", "acc_norm"):
        mine = [s[metric] for s in by_doc(ours["per_example"]["lmf_quiz"])]
        assert mine == [d[metric] for d in own], metric  # the adapter equals lmforge's scorer, to the last example
        assert mine == [s[metric] for s in by_doc(hf["samples"]["lmf_quiz"])], metric  # and lm-eval's HF model
        assert ours["results"]["lmf_quiz"][f"{metric},none"] == hf["results"]["lmf_quiz"][f"{metric},none"]
    # The log-likelihoods themselves, choice by choice, against transformers.
    hf_lls = [ll for s in by_doc(hf["samples"]["lmf_quiz"]) for (ll, _) in s["filtered_resps"]]
    own_lls = [ll for d in own for ll in d["loglikelihoods"]]
    assert max(abs(a - b) for a, b in zip(own_lls, hf_lls, strict=True)) < 1e-4
    # Rolling windows over texts longer than the context.
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        a, b = adapter["results"]["lmf_text"][metric], hf["results"]["lmf_text"][metric]
        assert a == pytest.approx(b, rel=1e-5), metric
    assert ours["results"]["lmf_text"]["word_perplexity,none"] == pytest.approx(
        adapter["results"]["lmf_text"]["word_perplexity,none"], rel=1e-9)


def test_unknown_task_and_missing_lm_eval_say_what_to_do(setup, monkeypatch):
    from lmforge.eval.harness import run_harness

    cfg = load_config(overrides=[f"eval.checkpoint={setup['ck']}", "device=cpu"])
    with pytest.raises(LmforgeError, match="does not know the task.*eval.harness_include"):
        run_harness(cfg, ["lmf_quiz"])
    with pytest.raises(LmforgeError, match="usage: lmforge eval harness"):
        from lmforge.eval.harness import cmd_harness

        cmd_harness(["eval.checkpoint=x"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    with pytest.raises(LmforgeError, match=r'pip install "lmforge\[eval\]"'):
        run_harness(cfg, ["lmf_quiz"])


def test_generate_until_stops_where_lm_eval_asks(setup):
    from lmforge.eval.harness import lm_class
    from lmforge.eval.tasks.score import greedy_replies
    from lmforge.infer.loading import load_for_inference

    model, tok, _ = load_for_inference(str(setup["ck"]), "cpu", "fp32")
    lm = lm_class()(model=model, tok=tok)

    class Req:
        def __init__(self, *args):
            self.args = args

    free = greedy_replies(model, tok, ["the king of"], 24, 1, ())[0]
    assert len(free) >= 8, free
    stop = free[5:8]
    (reply,) = lm.generate_until([Req("the king of", {"until": [stop], "max_gen_toks": 24})])
    assert reply == free[:free.index(stop)]
    (short,) = lm.generate_until([Req("the king of", {"until": [], "max_gen_toks": 3})])
    assert free.startswith(short) and len(tok.encode(short)) <= 3
