"""Benchmark: an MMLU-sized multiple-choice task on the `small` preset, against lm-eval's transformers model.

The task is MMLU's shape, written in its Hugging Face JSONL format: 57 subject files, --questions
questions in all (14,042 as MMLU's test split), each a question of 25-60 words and four options of
1-10 words, answered by a letter, with MMLU's subject line before it. Words are the commonest
identifiers of the Python standard library, and the tokenizer (vocab 8192) is trained on it; the model is
the `small` preset (124 M parameters, GPT-2's vocabulary of 50304) at random initialisation, in fp32. Timed:
- `lmforge eval eval.tasks=[mmlu:DIR]`'s scorer on every question (the four letters share one forward);
- the peer, `lm_eval` 's Hugging Face model (`HFLM`) holding the same weights (the `transformers` twin),
  on the first --peer-questions questions through an lm-eval YAML of the same prompt; lmforge is timed on
  those same questions too, and the per-question answers of the two are compared.
Prints one JSON object on stdout; progress goes to stderr.

    python bench/eval_suite.py [--questions 14042] [--peer-questions 300] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_flags, hf_twin, log
from prepare import stdlib_texts

from lmforge.config import Config, load_config
from lmforge.eval.suite import evaluate_suite
from lmforge.model.presets import model_config
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer, train_tokenizer

YAML = """task: mmlu_synth
dataset_path: json
dataset_kwargs:
  data_files:
    test: {files}
test_split: test
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {{{{subject.replace('_', ' ')}}}}.\\n\\n"
doc_to_text: {doc_to_text}
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
"""
DOC_TO_TEXT = ("{{question.strip()}}" + "".join(f"\n{c}. {{{{choices[{i}]}}}}" for i, c in enumerate("ABCD"))
               + "\nAnswer:")


def write_task(folder: Path, words: list[str], questions: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    subjects = [f"subject_{i:02d}" for i in range(57)]
    per = collections.Counter(subjects[i % 57] for i in range(questions))
    files = []
    for s in subjects:
        rows = [{"question": " ".join(rng.choice(words) for _ in range(rng.randint(25, 60))) + "?", "subject": s,
                 "choices": [" ".join(rng.choice(words) for _ in range(rng.randint(1, 10))) for _ in range(4)],
                 "answer": rng.randrange(4)} for _ in range(per[s])]
        f = folder / "test" / f"{s}_test.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        files.append(f)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=14042)
    ap.add_argument("--peer-questions", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab-size", type=int, default=50304, help="the model's (GPT-2's); the tokenizer has 8192")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        root = Path(tmp)
        texts = [t for _, t in stdlib_texts(5_000_000)]
        counts = collections.Counter(w for t in texts for w in re.findall(r"\b[a-z]{3,10}\b", t))
        words = [w for w, _ in counts.most_common(2000)]
        corpus = root / "corpus"
        corpus.mkdir()
        (corpus / "stdlib.txt").write_text("\n".join(texts), encoding="utf-8")
        cfg = Config(run_dir=str(root / "run"))
        cfg.data.sources = [str(corpus)]
        cfg.tokenizer.vocab_size, cfg.tokenizer.max_train_bytes = 8192, 5_000_000
        train_tokenizer(cfg)
        tok = Tokenizer.load(root / "run" / "tokenizer")
        files = write_task(root / "mmlu", words, args.questions)
        model = Transformer(model_config(args.preset, vocab_size=args.vocab_size)).eval()
        n_params = sum(p.numel() for p in model.parameters())
        ecfg = load_config(overrides=[f"eval.batch_size={args.batch_size}"])

        log(f"lmforge: {args.questions} questions on {args.preset} ({n_params / 1e6:.1f} M)")
        t0 = time.perf_counter()
        full = evaluate_suite(model, tok, ecfg, [f"mmlu:{root / 'mmlu'}"])["tasks"]["mmlu"]
        ours_all = time.perf_counter() - t0
        t0 = time.perf_counter()
        head = evaluate_suite(model, tok, ecfg, [f"mmlu:{root / 'mmlu'}:limit={args.peer_questions}"])
        ours_head = time.perf_counter() - t0

        log(f"peer: lm-eval HFLM on the first {args.peer_questions}")
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from transformers import PreTrainedTokenizerFast

        hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "run" / "tokenizer" / "tokenizer.json"),
                                         eos_token=tok.eos_token, pad_token=tok.eos_token)
        twin = hf_twin(model).eval()
        tasks = root / "yaml"
        tasks.mkdir()
        (tasks / "mmlu_synth.yaml").write_text(YAML.format(files=json.dumps([str(f) for f in files]),
                                                                  doc_to_text=json.dumps(DOC_TO_TEXT)))
        peer_lm = HFLM(pretrained=twin, tokenizer=hf_tok, batch_size=args.batch_size, device="cpu")
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=peer_lm, tasks=["mmlu_synth"], limit=args.peer_questions,
                                      task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                                      bootstrap_iters=0)
        peer = time.perf_counter() - t0
        peer_acc = [s["acc"] for s in sorted(res["samples"]["mmlu_synth"], key=lambda s: s["doc_id"])]
    ours_acc = head["tasks"]["mmlu"]["outcomes"]
    out = {
        "bench": "MMLU-sized multiple choice", "preset": args.preset, "parameters_m": round(n_params / 1e6, 1),
        "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "lmforge_all": {"questions": full["n"], "seconds": round(ours_all, 1),
                        "questions_per_s": round(full["n"] / ours_all, 2), "acc": round(full["acc"], 4)},
        "same_questions": {"questions": args.peer_questions, "lmforge_seconds": round(ours_head, 2),
                           "lm_eval_hf_seconds": round(peer, 2),
                           "ratio_lmforge_vs_lm_eval_hf": round(peer / ours_head, 2),
                           "answers_identical": peer_acc == ours_acc, "acc_lmforge": sum(ours_acc) / len(ours_acc),
                           "acc_lm_eval_hf": sum(peer_acc) / len(peer_acc)},
        "note": "random-initialised model: the accuracies are chance; the figures are speed and agreement",
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
