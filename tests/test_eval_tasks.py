"""Benchmark evaluation: every reader on a small file in its published format, multiple-choice scores equal
to a brute-force computation from the model's own log-probs, a trained model above chance, few-shot
determinism, the CORE centring, compare's interval, and `lmforge eval eval.tasks=[...]` end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_chat import tiny_checkpoint, write_jsonl

from lmforge.cli import main as cli_main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.eval.core import binomial_interval, centred, core_score, paired_bootstrap
from lmforge.eval.suite import compare
from lmforge.eval.tasks import Doc, Task, load_task, parse_spec
from lmforge.eval.tasks.base import extract_hash, extract_last_number, extract_regex, score_gen
from lmforge.eval.tasks.code import pass_at_k, run_program, score_code
from lmforge.eval.tasks.score import encode_pair, fewshot_prefix, loglikelihoods, run_task, shared_rows
from lmforge.infer.loading import load_for_inference
from lmforge.model.transformer import Transformer


def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    return e.value.code


def task(spec: str) -> Task:
    return load_task(parse_spec(spec))


# --- readers ---------------------------------------------------------------------------------------------

def test_readers_of_every_published_format(tmp_path):
    hs = write_jsonl(tmp_path / "hellaswag_val.jsonl", [
        {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he", "ctx": "unused",
         "endings": ["bakes [title] bread.", "flies.", "sings.", "sleeps."], "label": 0},
        {"ctx": "A cat sits", "endings": ["down.", "up.", "in.", "out."], "label": "2"}])
    t = task(f"hellaswag:{hs}")
    assert t.docs[0].contexts == ["Baking: A man mixes flour. He"] and t.docs[0].choices[0] == "bakes. bread."
    assert [d.gold for d in t.docs] == [0, 2] and t.baseline == 0.25

    arc_rows = [{"id": "q1", "question": {"stem": "Which is hot?", "choices": [
        {"label": "A", "text": "ice"}, {"label": "B", "text": "fire"}]}, "answerKey": "B"}]
    arc_hf = [{"question": "Which is cold?", "choices": {"text": ["ice", "fire", "sun"], "label": ["1", "2", "3"]},
               "answerKey": "1"}]
    for name, rows in (("ARC-Easy-Dev.jsonl", arc_rows), ("hf.jsonl", arc_hf)):
        write_jsonl(tmp_path / name, rows)
    pd.DataFrame(arc_hf).to_parquet(tmp_path / "arc.parquet")
    names = ("ARC-Easy-Dev.jsonl", "hf.jsonl", "arc.parquet")
    nested, flat, parquet = (task(f"arc_easy:{tmp_path / n}") for n in names)
    assert nested.docs[0].contexts == ["Question: Which is hot?\nAnswer:"] and nested.docs[0].gold == 1
    assert flat.docs[0].choices == parquet.docs[0].choices == ["ice", "fire", "sun"]
    assert flat.docs[0].gold == parquet.docs[0].gold == 0 and flat.baseline == pytest.approx(1 / 3)

    (tmp_path / "piqa").mkdir()
    piqa = write_jsonl(tmp_path / "piqa" / "valid.jsonl", [{"goal": "Open a jar", "sol1": "twist", "sol2": "lick"}])
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n")
    assert task(f"piqa:{piqa}").docs[0].gold == 0

    wg = write_jsonl(tmp_path / "wg.jsonl", [{"sentence": "The cup fell off the table because _ was round.",
                                              "option1": "the cup", "option2": "the table", "answer": "1"}])
    d = task(f"winogrande:{wg}").docs[0]
    assert d.contexts == ["The cup fell off the table because the cup", "The cup fell off the table because the table"]
    assert d.continuation == "was round." and d.gold == 0

    # MMLU as Hendrycks publishes it: header-less csv per subject, test/ beside dev/.
    write_csv(tmp_path / "mmlu" / "test" / "high_school_physics_test.csv", [["What falls?", "apple", "moon", "sky",
                                                                              "sun", "A"]])
    write_csv(tmp_path / "mmlu" / "dev" / "high_school_physics_dev.csv", [["Shot?", "a", "b", "c", "d", "C"]])
    m = task(f"mmlu:{tmp_path / 'mmlu'}")
    assert m.docs[0].contexts == ["What falls?\nA. apple\nB. moon\nC. sky\nD. sun\nAnswer:"]
    assert m.docs[0].description.startswith("The following are multiple choice questions (with answers) about "
                                            "high school physics.")
    assert m.docs[0].choices == ["A", "B", "C", "D"] and m.fewshot_pool[0].gold == 2
    hf = write_jsonl(tmp_path / "mmlu.jsonl", [{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"],
                                                "answer": 1}])
    assert task(f"mmlu:{hf}").docs[0].gold == 1

    head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    write_csv(tmp_path / "ceval" / "val" / "computer_network_val.csv",
              [head, ["0", "网络层协议是？", "IP", "TCP", "UDP", "HTTP", "A", ""]])
    write_csv(tmp_path / "ceval" / "dev" / "computer_network_dev.csv",
              [head, ["0", "问？", "a", "b", "c", "d", "D", "因"]])
    write_csv(tmp_path / "ceval" / "test" / "computer_network_test.csv",  # published without answers
              [head[:6], ["0", "?", "a", "b", "c", "d"]])
    c = task(f"ceval:{tmp_path / 'ceval'}")
    assert c.docs[0].contexts[0].endswith("D. HTTP\n答案：")
    assert c.docs[0].description.startswith("以下是中国关于computer network考试") and c.fewshot_pool[0].gold == 3
    write_csv(tmp_path / "cmmlu.csv", [["", "Question", "A", "B", "C", "D", "Answer"],
                                       ["0", "天空是什么颜色？", "红", "蓝", "绿", "黄", "B"]])
    cm = task(f"cmmlu:{tmp_path / 'cmmlu.csv'}")
    assert cm.docs[0].contexts[0].startswith("题目：天空是什么颜色？\nA. 红") and cm.docs[0].gold == 1

    lam = write_jsonl(tmp_path / "lambada.jsonl", [{"text": "He opened the door and saw his dog"}])
    d = task(f"lambada:{lam}").docs[0]
    assert (d.contexts, d.gold) == (["He opened the door and saw his"], "dog")

    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "1+1?", "answer": "1 and 1 make <<1+1=2>>2.\n#### 2"}])
    g = task(f"gsm8k:{gsm}")
    assert g.docs[0].gold == "2" and g.docs[0].shot().endswith("#### 2") and g.kind == "gen"

    mc = write_jsonl(tmp_path / "mine.jsonl", [{"question": "Q?", "choices": ["x", "y"], "answer": "y"},
                                               {"question": "R?", "choices": ["x", "y", "z"], "answer": 2}])
    t = task(f"mc:{mc}:as=own:limit=1")
    assert (t.name, len(t.docs), t.docs[0].gold) == ("own", 1, 1)
    gen = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Say 7:", "answer": 7}])
    assert task(f"gen:{gen}:extract=last_number").docs[0].gold == "7"


@pytest.mark.parametrize("family,row,needle", [
    ("hellaswag", {"ctx": "x", "label": 0}, "'endings'"),
    ("arc", {"question": {"stem": "q", "choices": [{"label": "A", "text": "t"}]}}, "'answerKey'"),
    ("arc", {"question": {"stem": "q", "choices": [{"label": "A", "text": "t"}]}, "answerKey": "Z"},
     "'answerKey' is 'Z'"),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b"}, "'label'"),
    ("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}, "no _ blank"),
    ("mmlu", {"question": "q", "A": "a", "B": "b", "C": "c", "D": "d"}, "'answer'"),
    ("lambada", {"txt": "a b"}, "'text'"),
    ("gsm8k", {"question": "q", "answer": "no final"}, "'####"),
    ("mc", {"question": "q", "answer": 0}, "'choices'"),
    ("gen", {"prompt": "p"}, "'answer'"),
])
def test_errors_name_file_line_and_key(tmp_path, family, row, needle):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "ok", "choices": ["a"], "answer": 0, "prompt": "p",
                                               "text": "a b", "ctx": "c", "endings": ["e"], "label": 0}, row]
                       if family in ("mc", "gen", "lambada", "hellaswag") else [row])
    line = 2 if family in ("mc", "gen", "lambada", "hellaswag") else 1
    with pytest.raises(LmforgeError) as e:
        task(f"{family}:{path}")
    assert f"t.jsonl:{line}:" in str(e.value) and needle in str(e.value)


def test_spec_syntax_errors():
    with pytest.raises(LmforgeError, match="family:path"):
        parse_spec("hellaswag")
    with pytest.raises(LmforgeError, match="unknown task family 'nope'"):
        parse_spec("nope:x.jsonl")
    with pytest.raises(LmforgeError, match="unknown option 'bogus'"):
        parse_spec("mc:x.jsonl:bogus=1")
    s = parse_spec("gen:{run_dir}/x.jsonl:shots=3:extract=regex=answer: (\\d+)", "runs/a")
    assert (s.path, s.shots, s.extract) == (Path("runs/a/x.jsonl"), 3, "regex=answer: (\\d+)")


# --- scoring against brute force ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok, _ = load_for_inference(tiny_checkpoint(tmp_path_factory.mktemp("ck")), "cpu", "fp32")
    return model, tok


def brute_ll(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), one unbatched forward over the full logits."""
    ctx, cont = encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    logp = model(ids).float().log_softmax(-1)[0]
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_pairs_are_encoded_as_lm_eval_encodes_them(tiny):
    _, tok = tiny
    # A trailing space of the context moves into the continuation; the continuation is the whole text's
    # tokens after the context's own (so a merge across the boundary is scored with the continuation).
    ctx, cont = encode_pair(tok, "Answer: ", "95")
    assert ctx == tok.encode("Answer:") and cont == tok.encode("Answer: 95")[len(ctx):]
    # An empty context is scored after end-of-text (this tokenizer has no BOS), as lm-eval's prefix_token_id.
    assert encode_pair(tok, "", "95") == ([tok.eot_id], tok.encode("95"))


def test_mc_scores_equal_a_brute_force_reference(tiny):
    model, tok = tiny
    docs = [Doc(["The answer is"], ["yes", "no way at all", "maybe so"], 1, "x:1"),
            Doc(["计算 37 + 58 等于"], ["95", "九十五", "100"], 0, "x:2"),
            Doc(["A long context " * 3], ["a", "bb", "ccc", "dddd"], 3, "x:3")]
    t = Task("t", "mc", docs)
    got = run_task(model, tok, t, batch_size=4)
    for d, g in zip(docs, got):
        lls = [brute_ll(model, tok, d.context(), " " + c) for c in d.choices]
        assert g["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        norm = [ll / len(c) for ll, c in zip(lls, d.choices)]
        assert g["acc"] == float(lls.index(max(lls)) == d.gold)
        assert g["acc_norm"] == float(norm.index(max(norm)) == d.gold)
    # Batching (and the order batches are formed in) does not change a score.
    flat = [(d.context(), " " + c) for d in docs for c in d.choices]
    assert [x[0] for x in loglikelihoods(model, tok, flat, 1)] == pytest.approx(
        [x[0] for x in loglikelihoods(model, tok, flat, 16)], abs=1e-4)


def test_requests_sharing_an_input_share_one_forward(tiny):
    model, tok = tiny
    assert shared_rows([(1, 2), (1, 2, 3), (1, 2), (4,), (1, 3)]) == {(1, 2): (1, 2, 3), (1, 2, 3): (1, 2, 3),
                                                                     (1, 3): (1, 3), (4,): (4,)}
    # MMLU's letters: one forward serves the four choices, and the scores are the brute-force ones.
    d = Doc(["What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"], list("ABCD"), 1, "x:1")
    requests = [(d.context(), " " + c) for c in d.choices]
    inputs = [tuple(sum(encode_pair(tok, *r), [])[:-1]) for r in requests]
    assert len(set(shared_rows(inputs).values())) == 1
    got = [ll for ll, _ in loglikelihoods(model, tok, requests)]
    assert got == pytest.approx([brute_ll(model, tok, *r) for r in requests], abs=1e-4)


def test_acc_and_acc_norm_equal_lm_evaluation_harness(tmp_path, monkeypatch):
    """lm-eval's own process_results on the same log-likelihoods (where it is installed)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.api.task import ConfigurableTask

    from lmforge.eval.tasks.base import score_mc

    rng = np.random.default_rng(0)
    rows = [{"question": f"Q{i}", "choices": ["a", "bbbb", "cc", "ddddddd"][: 2 + i % 3], "answer": i % 2}
            for i in range(30)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    theirs = ConfigurableTask(config={
        "task": "t", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": path}, "cache_dir": str(tmp_path / "cache")},
        "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]})
    ours = task(f"mc:{path}")
    differ = 0
    for doc, d in zip(theirs.test_docs(), ours.docs):
        lls = list(-rng.exponential(4.0, len(d.choices)))
        want = theirs.process_results(doc, [(ll, False) for ll in lls])
        got = score_mc(d, lls)
        assert (got["acc"], got["acc_norm"]) == (want["acc"], want["acc_norm"])
        differ += got["acc"] != got["acc_norm"]
    assert differ > 0  # the length normalisation was exercised


def test_winogrande_scores_the_shared_rest_of_the_sentence(tiny):
    model, tok = tiny
    d = Doc(["He put the ball in the box because the ball", "He put the ball in the box because the box"],
            ["the ball", "the box"], 1, "x:1", continuation="was big.")
    got = run_task(model, tok, Task("wg", "mc", [d]))[0]
    assert got["loglikelihoods"] == pytest.approx([brute_ll(model, tok, c, " was big.") for c in d.contexts], abs=1e-4)


def trained_model(tok) -> Transformer:
    """A tiny model that has learned four facts, trained here in a few seconds."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=448, max_seq_len=64))
    facts = ["the sky is blue.", "the grass is green.", "the snow is white.", "the coal is black."]
    rows = [list(tok.doc_prefix) or [tok.eot_id] for _ in facts]
    rows = [r + tok.encode(f) + [tok.eot_id] for r, f in zip(rows, facts)]
    width = max(len(r) for r in rows)
    x = torch.tensor([r + [tok.eot_id] * (width - len(r)) for r in rows])
    labels = x.clone()
    for i, r in enumerate(rows):
        labels[i, len(r):] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is ~30x faster than two contending ones
    try:
        for _ in range(120):
            opt.zero_grad()
            model(x[:, :-1], labels=labels[:, 1:]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_a_trained_model_answers_what_it_learned_above_chance(tiny):
    _, tok = tiny
    model = trained_model(tok)
    colours = ["blue.", "green.", "white.", "black."]
    docs = [Doc([f"the {t} is"], colours, i, f"x:{i}") for i, t in enumerate(("sky", "grass", "snow", "coal"))]
    mc = run_task(model, tok, Task("facts", "mc", docs))
    assert sum(r["acc"] for r in mc) / len(mc) > 0.75  # chance is 0.25
    cloze = [Doc(["the sky is"], ["blue."], "blue.", "x:0"), Doc(["the snow is"], ["white."], "white.", "x:1")]
    assert all(r["acc"] == 1.0 for r in run_task(model, tok, Task("cl", "cloze", cloze)))
    wrong = [Doc(["the sky is"], ["green."], "green.", "x:0")]
    assert run_task(model, tok, Task("cl", "cloze", wrong))[0]["acc"] == 0.0


def test_answer_extraction_and_exact_match():
    assert extract_hash("so 3+4=7\n#### 1,234") == "1234" and extract_hash("no answer") is None
    assert extract_last_number("it is 12 or $3,000.") == "3000"
    assert extract_regex(r"answer: (\w+)")("The answer: cat!") == "cat"
    t = Task("g", "gen", [], extract=extract_last_number)
    assert score_gen(t, Doc(["q"], [], "1000", "x:1"), "That is 1,000.")["exact_match"] == 1.0
    assert score_gen(t, Doc(["q"], [], "7", "x:1"), "That is 8.")["exact_match"] == 0.0


def test_fewshot_is_seeded_never_shows_the_question_and_prefers_the_dev_pool():
    docs = [Doc([f"Q{i}"], ["a", "b"], i % 2, f"x:{i}") for i in range(10)]
    t = Task("t", "mc", docs)
    p = fewshot_prefix(t, 3, 4, seed=1)
    assert p == fewshot_prefix(t, 3, 4, seed=1) and p != fewshot_prefix(t, 3, 4, seed=2)
    assert p.count("\n\n") == 4 and "Q3 " not in p
    t.fewshot_pool = [Doc(["D0"], ["a", "b"], 1, "dev:1")]
    assert fewshot_prefix(t, 3, 4, seed=1) == "D0 b\n\n"


def test_chat_mode_asks_in_the_chat_template(tiny):
    model, tok = tiny
    d = Doc(["Is it?"], ["yes", "no"], 0, "x:1")
    got = run_task(model, tok, Task("t", "mc", [d]), chat=True)[0]
    ctx = tok.render_chat([{"role": "user", "content": "Is it?"}], add_generation_prompt=True)
    assert ctx.endswith("assistant\n")
    assert got["loglikelihoods"] == pytest.approx([brute_ll(model, tok, ctx, c) for c in d.choices], abs=1e-4)


# --- code execution -----------------------------------------------------------------------------------------

def test_code_runs_in_a_limited_subprocess_and_pass_at_k_is_unbiased(tmp_path):
    assert run_program("assert 1 + 1 == 2")[0] and not run_program("assert 1 + 1 == 3")[0]
    ok, why = run_program("while True: pass", timeout=1.0)
    assert not ok and "timed out" in why
    ok, why = run_program("import socket\nsocket.create_connection(('127.0.0.1', 80))")
    assert not ok and "network access is disabled" in why
    assert not run_program("x = bytearray(4 << 30)", memory_mb=256)[0]
    # pass@k against the definition: the chance that k samples drawn without replacement hold a pass.
    for n, c, k in ((10, 3, 1), (10, 3, 5), (20, 0, 10), (5, 5, 1), (10, 8, 5)):
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    he = write_jsonl(tmp_path / "HumanEval.jsonl", [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n",
                                                     "canonical_solution": "    return a + b\n", "entry_point": "add",
                                                     "test": "def check(f):\n    assert f(2, 3) == 5\n"}])
    t = task(f"humaneval:{he}")
    assert score_code(t.docs[0], ["    return a + b\n", "    return a - b\n"]) == {"pass@1": 0.5}
    mb = write_jsonl(tmp_path / "mbpp.jsonl", [{"task_id": 1, "text": "Write a function to double x.",
                                                "code": "def double(x): return 2 * x", "test_setup_code": "",
                                                "test_list": ["assert double(2) == 4", "assert double(0) == 0"]}])
    m = task(f"mbpp:{mb}")
    assert m.docs[0].context().endswith("assert double(0) == 0\n[BEGIN]\n")
    assert score_code(m.docs[0], ["def double(x):\n    return x + x\n"]) == {"pass@1": 1.0}
    with pytest.raises(LmforgeError, match="HumanEval.jsonl:1: no 'entry_point'"):
        task(f"humaneval:{write_jsonl(tmp_path / 'HumanEval.jsonl', [{'prompt': 'p', 'test': 't'}])}")


# --- aggregate and comparison ----------------------------------------------------------------------------

def test_core_centres_each_task_by_chance():
    assert centred(0.25, 0.25) == 0.0 and centred(1.0, 0.25) == 1.0 and centred(0.5, 0.25) == pytest.approx(1 / 3)
    tasks = {"hs": {"acc": 0.4, "baseline": 0.25}, "lam": {"acc": 0.3, "baseline": 0.0},
             "wg": {"acc": 0.5, "baseline": 0.5}}
    assert core_score(tasks) == pytest.approx((0.2 + 0.3 + 0.0) / 3)


def test_compare_interval_tells_a_gain_from_noise():
    a = [1.0, 0.0] * 200
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    flip = [1.0 - x if i % 20 in (0, 1) else x for i, x in enumerate(a)]  # as many up as down
    d, lo, hi = paired_bootstrap(a, flip)
    assert lo < 0 < hi
    better = [1.0] * 400
    d, lo, hi = paired_bootstrap(a, better, seed=0)
    assert d == 0.5 and 0.4 < lo < 0.5 < hi < 0.6 and paired_bootstrap(a, better, seed=0) == (d, lo, hi)
    d, lo, hi = binomial_interval(0.5, 400, 0.55, 400)
    assert d == pytest.approx(0.05) and hi - d == pytest.approx(1.96 * (0.5 * 0.5 / 400 + 0.55 * 0.45 / 400) ** 0.5)
    ra = {"tasks": {"t": {"acc": 0.5, "n": 400, "outcomes": a, "path": "p"}}}
    rb = {"tasks": {"t": {"acc": 1.0, "n": 400, "outcomes": better, "path": "p"}}}
    (row,) = compare(ra, rb)
    assert row["significant"] and row["interval"] == "paired bootstrap"


def test_pretraining_validation_reports_the_benchmarks(tmp_path, tiny):
    from lmforge.config import Config
    from lmforge.eval.suite import benchmark_fn
    from lmforge.train.objectives import LMObjective

    model, tok = tiny
    mc = write_jsonl(tmp_path / "mine.jsonl", [{"question": "Q?", "choices": ["x", "y"], "answer": 0}] * 3)
    cfg = Config()
    cfg.eval.train_tasks = [f"mc:{mc}:as=toy"]
    fn = benchmark_fn(cfg, tok)
    expected = sum(r["acc_norm"] for r in run_task(model, tok, task(f"mc:{mc}"))) / 3
    objective = LMObjective.__new__(LMObjective)  # no shards needed: no validation split, benchmarks only
    objective.val, objective.benchmarks = None, fn
    got = objective.evaluate(model)
    assert got == {"bench_toy": expected, "bench_core": centred(expected, 0.5)}
    cfg.eval.train_tasks = [f"mc:{tmp_path / 'missing.jsonl'}"]
    with pytest.raises(LmforgeError, match="missing.jsonl: no such file"):
        benchmark_fn(cfg, tok)


# --- the command ------------------------------------------------------------------------------------------

def test_eval_command_writes_json_markdown_png_and_compares(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path)
    mc = write_jsonl(tmp_path / "mine.jsonl", [{"question": f"Q{i}?", "choices": ["x", "y", "z"], "answer": i % 3}
                                               for i in range(6)])
    lam = write_jsonl(tmp_path / "lambada.jsonl", [{"text": "the sky is blue"}, {"text": "the grass is green"}])
    gen = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Say 7:", "answer": "7"}])
    he = write_jsonl(tmp_path / "he.jsonl", [{"prompt": "def f():\n", "test": "def check(g):\n    assert g() is None\n",
                                              "entry_point": "f"}])
    out = tmp_path / "results"
    for i, (shots, quant) in enumerate(((0, ""), (2, "int8"))):  # the second: few-shot, quantized
        assert cli(["eval", f"eval.checkpoint={ck}", "device=cpu", f"eval.out={out / str(i)}", f"eval.quantize={quant}",
                f"eval.num_fewshot={shots}", "generate.max_new_tokens=4",
                "eval.samples=2",
                f"eval.tasks=[mc:{mc}, lambada:{lam}, gen:{gen}:extract=last_number, humaneval:{he}]"]) == 0
    (res,) = (out / "0").glob("bench-*.json")
    r = json.loads(res.read_text())
    assert set(r["tasks"]) == {"mine", "lambada", "qa", "humaneval"}
    assert set(r["tasks"]["humaneval"]["metrics"]) == {"pass@1"}
    assert r["tasks"]["mine"]["baseline"] == pytest.approx(1 / 3)
    assert r["core"] == pytest.approx(core_score(r["tasks"]))
    assert "**CORE**" in res.with_suffix(".md").read_text() and res.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert cli(["eval", "compare", str(out / "0"), str(out / "1")]) == 0
    text = capsys.readouterr().out
    assert "mine" in text and "paired bootstrap" in text and "CORE" in text


def test_bench_stage_of_a_recipe_runs_once_per_checkpoint(tmp_path):
    from lmforge.config import Config
    from lmforge.stages import STAGES

    run, done = STAGES["bench"]
    cfg = Config()
    cfg.run_dir, cfg.device = str(tmp_path / "run"), "cpu"
    cfg.eval.checkpoint = str(tiny_checkpoint(tmp_path))
    with pytest.raises(LmforgeError, match="eval.tasks is empty"):
        run(cfg)
    mc = write_jsonl(tmp_path / "m.jsonl", [{"question": "Q", "choices": ["a", "b"], "answer": 0}])
    cfg.eval.tasks = [f"mc:{mc}"]
    assert not done(cfg)
    run(cfg)
    assert done(cfg)


def test_a_hub_dataset_is_downloaded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """`mmlu:hf:cais/mmlu:all@test` goes through datasets.load_dataset the first time only (the fake here
    stands in for the Hub); the cached JSONL keeps the questions, Chinese text included."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    calls = []
    rows = [{"question": "2 + 2 =", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
            {"question": "天空是什么颜色？", "subject": "常识", "choices": ["蓝", "绿", "红", "黑"], "answer": 0}]

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    first = task("mmlu:hf:cais/mmlu:all@test")
    assert calls == [("cais/mmlu", "all", "test")]
    assert [d.gold for d in first.docs] == [1, 0] and "天空" in first.docs[1].context()
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the cache was not used"))
    again = task("mmlu:hf:cais/mmlu:all@test")
    assert [d.context() for d in again.docs] == [d.context() for d in first.docs]
    assert (tmp_path / "cache" / "eval" / "cais_mmlu--all@test.jsonl").is_file()

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LmforgeError, match=r"cannot download the dataset \(ConnectionError.*put the split as JSONL"):
        task("hellaswag:hf:Rowan/hellaswag@validation")
