"""Code benchmarks (HumanEval, MBPP): a completion passes when the task's tests run without error.

Each program runs in its own Python subprocess (isolated mode, an empty temporary working
directory, a minimal environment) under a wall-clock timeout and resource limits: CPU seconds,
address space, file size, open files; `socket` is replaced by a stub that raises, so the program
cannot reach a network by ordinary means. This is a guard against accidents in generated code,
not a sandbox against a hostile program: run untrusted models' code in a container.

pass@k from n samples per problem is the unbiased estimator of Chen et al. (2021):
1 - C(n - c, k) / C(n, k), c the passing samples, averaged over problems.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from lmforge.eval.tasks.base import Doc, Task
from lmforge.eval.tasks.files import files_in, need, rows

# Runs before the program: no sockets, and the limits (set here, in the child, so the parent is untouched).
PRELUDE = """\
import resource, socket
def _no_network(*a, **k):
    raise OSError("network access is disabled while scoring")
socket.socket = socket.create_connection = _no_network
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
del resource, socket, _no_network
"""
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> tuple[bool, str]:
    """(passed, last lines of stderr or why it failed) of one program in a limited subprocess."""
    prelude = PRELUDE.format(cpu=max(1, int(timeout)), mem=memory_mb << 20, fsize=16 << 20)
    with tempfile.TemporaryDirectory(prefix="lmforge-exec-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(prelude + program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        try:
            out = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, env=env, capture_output=True,
                                 text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:g}s"
    return out.returncode == 0, out.stderr[-500:]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def humaneval(path: Path) -> Task:
    """HumanEval's jsonl: {task_id, prompt, test, entry_point}; the completion continues the prompt."""
    what = "HumanEval rows are {task_id, prompt, test, entry_point}"
    docs = []
    for file in files_in(path, (".jsonl", ".json", ".parquet")):
        for where, r in rows(file):
            prompt = need(r, "prompt", where, what, str)
            tests = need(r, "test", where, what, str) + f"\n\ncheck({need(r, 'entry_point', where, what, str)})\n"
            docs.append(Doc([prompt], [], "", where, delimiter="", target=tests, program_head=prompt))
    return Task("humaneval", "code", docs, stop=HUMANEVAL_STOP, metric="pass@1")


def mbpp(path: Path) -> Task:
    """MBPP's jsonl: {text, test_list, test_setup_code?}, prompted as lm-eval's mbpp (tests shown, [BEGIN])."""
    what = "MBPP rows are {text, test_list: [assert strings], test_setup_code}"
    docs = []
    for file in files_in(path, (".jsonl", ".json", ".parquet")):
        for where, r in rows(file):
            asserts = [str(t) for t in need(r, "test_list", where, what, list)]
            text = need(r, "text", where, what, str)
            prompt = (f"You are an expert Python programmer, and here is your task: {text} "
                      "Your code should pass these tests:\n\n" + "\n".join(asserts) + "\n[BEGIN]\n")
            tests = str(r.get("test_setup_code") or "") + "\n" + "\n".join(asserts) + "\n"
            docs.append(Doc([prompt], [], "", where, delimiter="", target=tests))
    return Task("mbpp", "code", docs, stop=("[DONE]",), metric="pass@1")


def program_of(doc: Doc, completion: str) -> str:
    """What runs: HumanEval's prompt + completion (the signature is in the prompt), MBPP's completion alone,
    then the tests."""
    return doc.program_head + completion + "\n\n" + doc.target


def score_code(doc: Doc, completions: list[str], ks: tuple[int, ...] = (1, 10, 100),
               timeout: float = 10.0) -> dict[str, float]:
    """pass@k for every k <= the number of samples, from running each completion against the tests."""
    passed = [run_program(program_of(doc, c), timeout)[0] for c in completions]
    n, c = len(passed), sum(passed)
    return {f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n}
