"""Bad input stops with a clear message, a non-zero exit and no artifact that looks valid.

BAD_INPUT is the table of every mistake the CLI must answer: the command line, the exit code and a
fragment of the message. Each case runs the real CLI in a subprocess and must leave no traceback,
no new checkpoint folder and no evaluation report behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from spine import TINY, copy_run, lmforge, prepared_run

from lmforge.checkpoint import latest_checkpoint, load_model, save_checkpoint
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.io import DiskFullError
from lmforge.model.transformer import Transformer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = prepared_run(tmp_path_factory.mktemp("errors"))
    r = lmforge("pretrain", f"run_dir={run}", *TINY, "train.max_steps=4", "train.save_every=2")
    assert r.returncode == 0, r.stderr
    return run


@dataclass
class Ctx:
    """What a case's setup and command line refer to: {trained}, {ckpt}, {run} (a fresh copy), {tmp}."""

    trained: Path
    tmp: Path

    @cached_property
    def run(self) -> Path:
        return copy_run(self.trained, self.tmp / "run")

    @property
    def ckpt(self) -> Path:
        return latest_checkpoint(self.trained / "checkpoints")

    def fill(self, s: str) -> str:
        names = {k: getattr(self, k) for k in ("trained", "ckpt", "tmp") if "{" + k + "}" in s}
        if "{run}" in s:
            names["run"] = self.run
        return s.format(**names)

    def broken_checkpoint(self, change: Callable[[Path], None]) -> None:
        folder = self.tmp / "ckpt" / "step_000004"
        shutil.copytree(self.ckpt, folder)
        change(folder)


def _edit_config(folder: Path, **lmforge_keys) -> None:
    data = json.loads((folder / "config.json").read_text())
    data["lmforge"].update(lmforge_keys)
    (folder / "config.json").write_text(json.dumps(data))


def _truncate_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _write_pairs(ctx: Ctx, rows: list[dict]) -> None:
    (ctx.tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _other_tokenizer(ctx: Ctx) -> None:
    """Same vocabulary size, different tokens: the shards' token ids would silently mean other text."""
    path = ctx.run / "tokenizer" / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    vocab["zz_new_token"] = vocab.pop(next(iter(vocab)))
    path.write_text(json.dumps(tok))


BAD_REWARD = "import math\n\n\ndef _weights():\n    return 1 / 0\n\n\nWEIGHTS = _weights()\n"
TIED = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 1}."} for i in range(4)]
PRETRAIN = ["pretrain", "run_dir={run}", *TINY, "train.max_steps=2"]
POST = ["train.progress=false",
        "train.precision=fp32", "train.seq_len=32", "train.micro_batch=2", "train.max_steps=2", "train.eval_every=0"]
DPO = ["dpo", "run_dir={run}", "dpo.init_from={ckpt}", "dpo.data=[{tmp}/pairs.jsonl]", *POST]


@dataclass
class Case:
    argv: list[str]
    message: str
    code: int = 2
    setup: Callable[[Ctx], None] | None = None


BAD_INPUT: dict[str, Case] = {
    # --- the config, checked when it loads --------------------------------------------------------
    "n_embd zero": Case([*PRETRAIN, "model.n_embd=0"], "model.n_embd must be positive, got 0"),
    "odd head width": Case([*PRETRAIN, "model.n_embd=60"], "the head width must be even for RoPE, which rotates "
                           "pairs of dimensions: model.n_embd / model.n_head = 60 / 4 = 15"),
    "odd head_dim": Case([*PRETRAIN, "model.head_dim=15"], "even for RoPE, which rotates pairs of dimensions: "
                         "model.head_dim=15"),
    "n_embd % n_head": Case([*PRETRAIN, "model.n_head=3", "model.n_kv_head=1"],
                            "model.n_embd=64 is not divisible by model.n_head=3"),
    "n_head % n_kv_head": Case([*PRETRAIN, "model.n_kv_head=3"],
                               "model.n_head=4 is not divisible by model.n_kv_head=3"),
    "negative lr": Case([*PRETRAIN, "train.lr=-1"], "train.lr must be positive, got -1.0"),
    "negative max_steps": Case([*PRETRAIN, "train.max_steps=-1"], "train.max_steps must be positive"),
    "zero max_steps, no time budget": Case([*PRETRAIN, "train.max_steps=0"], "train.max_steps must be positive (0 "
                                           "only with train.max_minutes, a time budget), got 0"),
    "negative warmup": Case([*PRETRAIN, "train.warmup_steps=-5"], "train.warmup_steps must be >= 0, got -5"),
    "batch_tokens not a multiple": Case([*PRETRAIN, "train.batch_tokens=100"], "train.batch_tokens=100 is not a "
                                        "multiple of train.micro_batch * train.seq_len = 128"),
    "negative grad_clip": Case([*PRETRAIN, "train.grad_clip=-1"], "train.grad_clip must be >= 0, got -1.0"),
    "dropout 1": Case([*PRETRAIN, "model.dropout=1"], "model.dropout must be in [0, 1), got 1.0"),
    "negative keep_last": Case([*PRETRAIN, "train.keep_last=-2"], "train.keep_last must be >= 0, got -2"),
    "log_every 0": Case([*PRETRAIN, "train.log_every=0"], "train.log_every must be >= 1, got 0"),
    "val_fraction 1": Case(["prepare", "run_dir={run}", "data.val_fraction=1"],
                           "data.val_fraction must be in [0, 1), got 1.0"),
    "bad value in a recipe names it": Case(["pretrain", "{tmp}/recipe.yaml", "run_dir={run}", *TINY],
                                           "{tmp}/recipe.yaml: train.max_steps must be positive",
                                           setup=lambda c: (c.tmp / "recipe.yaml").write_text(
                                               "train:\n  max_steps: -1\n")),
    "negative sft.train.lr": Case(["sft", "run_dir={run}", "sft.train.lr=-1"], "sft.train.lr must be positive"),
    "negative dpo.train.max_steps": Case(["dpo", "run_dir={run}", "dpo.train.max_steps=-3"],
                                         "dpo.train.max_steps must be positive"),
    "negative dpo.beta": Case(["dpo", "run_dir={run}", "dpo.beta=-0.1"], "dpo.beta must be positive, got -0.1"),
    "grpo group of one": Case(["grpo", "run_dir={run}", "grpo.group_size=1"], "grpo.group_size must be >= 2"),
    "unknown command": Case(["pretrian"], "did you mean 'pretrain'"),
    "unknown key": Case(["pretrain", "train.lrr=1"], "did you mean 'train.lr'"),
    # --- the data --------------------------------------------------------------------------------
    "dpo: chosen equals rejected everywhere": Case(
        DPO, "{tmp}/pairs.jsonl: all 4 preference pairs have 'chosen' equal to 'rejected'",
        setup=lambda c: _write_pairs(c, TIED)),
    "rm: chosen equals rejected everywhere": Case(
        ["rm", "run_dir={run}", "rm.init_from={ckpt}", "rm.data=[{tmp}/pairs.jsonl]", "rm.val_fraction=0", *POST],
        "{tmp}/pairs.jsonl: all 4 preference pairs have 'chosen' equal to 'rejected' (the same text, or texts that "
        "differ only after train.seq_len=32 tokens; first at {tmp}/pairs.jsonl:1)",
        setup=lambda c: _write_pairs(c, TIED)),
    "reward module raises at import": Case(
        ["grpo", "run_dir={run}", "grpo.init_from={ckpt}", "grpo.data=[{tmp}/pairs.jsonl]",
         "grpo.rewards=[{tmp}/my_reward.py:score]", "grpo.group_size=2", "grpo.max_new_tokens=4", *POST],
        "grpo.rewards: importing '{tmp}/my_reward.py' failed at {tmp}/my_reward.py:5: ZeroDivisionError: "
        "division by zero",
        setup=lambda c: (_write_pairs(c, TIED), (c.tmp / "my_reward.py").write_text(BAD_REWARD))),
    "model vocab smaller than the tokenizer": Case(
        [*PRETRAIN, "model.vocab_size=100"], "model.vocab_size=100 is smaller than the tokenizer's 512"),
    "data from another tokenizer": Case(PRETRAIN, "re-run `lmforge prepare`", setup=_other_tokenizer),
    "no tokenizer": Case(["pretrain", "run_dir={tmp}/empty", *TINY], "run `lmforge tokenizer`"),
    "resume with another model": Case(
        ["pretrain", "run_dir={tmp}/full", *TINY, "model.n_layer=3", "train.max_steps=6"], "model config differs",
        setup=lambda c: shutil.copytree(c.trained, c.tmp / "full")),
    # --- checkpoints -----------------------------------------------------------------------------
    "wrong type in a checkpoint's config.json": Case(
        ["eval", "run_dir={run}", "eval.checkpoint={tmp}/ckpt/step_000004"],
        "{tmp}/ckpt/step_000004/config.json: lmforge.n_layer: expected an integer, got 'two'",
        setup=lambda c: c.broken_checkpoint(lambda f: _edit_config(f, n_layer="two"))),
    "bad shape in a checkpoint's config.json": Case(
        ["generate", "{tmp}/ckpt/step_000004", "--prompt", "def "],
        "{tmp}/ckpt/step_000004/config.json: lmforge.n_head=4 is not divisible by lmforge.n_kv_head=3",
        setup=lambda c: c.broken_checkpoint(lambda f: _edit_config(f, n_kv_head=3))),
    "config.json not JSON": Case(
        ["eval", "run_dir={run}", "eval.checkpoint={tmp}/ckpt/step_000004"], "config.json: not valid JSON",
        setup=lambda c: c.broken_checkpoint(lambda f: (f / "config.json").write_text("{not json"))),
    "checkpoint without weights": Case(
        ["eval", "run_dir={run}", "eval.checkpoint={tmp}/ckpt/step_000004"], "model.safetensors is missing",
        setup=lambda c: c.broken_checkpoint(lambda f: (f / "model.safetensors").unlink())),
    "truncated weights": Case(
        ["eval", "run_dir={run}", "eval.checkpoint={tmp}/ckpt/step_000004"], "damaged or truncated",
        setup=lambda c: c.broken_checkpoint(_truncate_weights)),
}


def _artifacts(*roots: Path) -> set[Path]:
    """What would look like a result: checkpoint folders and evaluation reports."""
    found: set[Path] = set()
    for root in roots:
        if root.exists():
            found |= {p for p in root.rglob("step_*") if p.is_dir()} | set(root.rglob("eval/*.json"))
    return found


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_gets_an_answer(name, trained, tmp_path):
    case = BAD_INPUT[name]
    ctx = Ctx(trained, tmp_path)
    if case.setup is not None:
        case.setup(ctx)
    argv = [ctx.fill(a) for a in case.argv]
    before = _artifacts(tmp_path, trained)
    r = lmforge(*argv)
    assert r.returncode == case.code, r.stderr
    assert ctx.fill(case.message) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert _artifacts(tmp_path, trained) == before, "a failed command left a checkpoint or report"


def test_load_model_explains_broken_checkpoints(trained, tmp_path):
    """The same mistakes through the Python API: LmforgeError, with the file named."""
    ctx = Ctx(trained, tmp_path)
    with pytest.raises(LmforgeError, match="checkpoint folder not found"):
        load_model(tmp_path / "nope")
    ctx.broken_checkpoint(_truncate_weights)
    with pytest.raises(LmforgeError, match="damaged or truncated"):
        load_model(tmp_path / "ckpt" / "step_000004")
    _edit_config(tmp_path / "ckpt" / "step_000004", n_layer="two")
    with pytest.raises(LmforgeError, match=r"step_000004/config.json: lmforge.n_layer: expected an integer"):
        load_model(tmp_path / "ckpt" / "step_000004")


def test_some_tied_pairs_are_dropped_with_a_warning(trained, tmp_path):
    """Two of eight pairs teach nothing: one says the same twice, one differs only past seq_len."""
    ctx = Ctx(trained, tmp_path)
    rows = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": "no idea"} for i in range(6)]
    rows.insert(2, TIED[0])
    long = "word " * 60
    rows.append({"prompt": "Say it", "chosen": long + "yes", "rejected": long + "no"})
    _write_pairs(ctx, rows)
    r = lmforge(*[ctx.fill(a) for a in DPO])
    assert r.returncode == 0, r.stderr
    pairs = ctx.fill("{tmp}/pairs.jsonl")
    assert f"{pairs}: 2 of 8 preference pairs have 'chosen' equal to 'rejected'" in r.stderr, r.stderr
    assert f"first at {pairs}:3); they teach nothing and are left out" in r.stderr
    assert "dpo: 6 pairs" in r.stderr


REWARD_MODULES = {  # file contents -> the message load_function gives for "<file>:score"
    "syntax.py": ("def score(c, e):\n    return [0.0 for _ in c\n", "failed at {d}/syntax.py:2: SyntaxError: "),
    "imports.py": ("import json\nimport numpyy\n", "failed at {d}/imports.py:2: ModuleNotFoundError: No module "
                   "named 'numpyy'"),
    "exits.py": ("import sys\nsys.exit('needs a GPU')\n", "failed at {d}/exits.py:2: SystemExit: needs a GPU"),
    "nofn.py": ("def scor(c, e):\n    return [0.0] * len(c)\n", "'{d}/nofn.py' has no function 'score' (it "
                "defines scor)"),
}


@pytest.mark.parametrize("name", list(REWARD_MODULES))
def test_reward_module_errors_name_the_line(name, tmp_path):
    from lmforge.train.rewards import load_function

    text, message = REWARD_MODULES[name]
    (tmp_path / name).write_text(text)
    with pytest.raises(LmforgeError) as e:
        load_function(f"{tmp_path}/{name}:score")
    assert message.format(d=tmp_path) in str(e.value)


def test_reward_modules_from_the_current_directory(tmp_path, monkeypatch):
    """`pkg.mod:fn` is found in the directory lmforge runs from (the `lmforge` script does not put it on
    sys.path), and a module with dataclasses loads as a file too (it must be in sys.modules while it runs)."""
    from lmforge.train.rewards import load_function

    (tmp_path / "myrewards").mkdir()
    (tmp_path / "myrewards" / "__init__.py").write_text("")
    code = ("from __future__ import annotations\nfrom dataclasses import dataclass\n\n\n@dataclass\nclass Rubric:\n"
            "    weight: float = 1.0\n\n\ndef score(completions, examples):\n"
            "    return [Rubric().weight] * len(completions)\n")
    (tmp_path / "myrewards" / "rubric.py").write_text(code)
    (tmp_path / "myrewards" / "broken.py").write_text("\nraise ValueError('bad setting')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_function("myrewards.rubric:score")(["a", "b"], [{}, {}]) == [1.0, 1.0]
    assert load_function(f"{tmp_path}/myrewards/rubric.py:score")(["a"], [{}]) == [1.0]
    with pytest.raises(LmforgeError, match=r"importing 'myrewards.broken' failed at .*myrewards/broken.py:2: "
                       "ValueError: bad setting"):
        load_function("myrewards.broken:score")
    with pytest.raises(LmforgeError, match="'nothere:score': no module named 'nothere'"):
        load_function("nothere:score")


# --- a full disk while saving a checkpoint ------------------------------------------------------------

def _safetensors_full(*a, **k):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _torch_save_full(*a, **k):
    """What torch.save raises when its file's write hits ENOSPC: a RuntimeError, the OSError as context."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def _os_full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer,fail", [("save_file", _safetensors_full), ("save_file", _os_full),
                                         ("torch.save", _torch_save_full)])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(writer, fail, tmp_path, monkeypatch):
    """Each writer failing the way its library does when the disk is full (messages as seen on a full tmpfs)."""
    import lmforge.checkpoint as ck

    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, max_seq_len=16))
    good = save_checkpoint(tmp_path / "step_000001", model, optimizer_state={"s": 1}, trainer_state={"step": 1})
    if writer == "save_file":
        monkeypatch.setattr(ck, "save_file", fail)
    else:
        monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(DiskFullError, match="no space left on device while writing .*step_000002; the previous "
                       "artifact is untouched"):
        save_checkpoint(tmp_path / "step_000002", model, optimizer_state={"s": 2}, trainer_state={"step": 2})
    assert not (tmp_path / "step_000002").exists()
    assert not list(tmp_path.glob(".step_000002*")), "the temporary folder was removed"
    assert latest_checkpoint(tmp_path) == good
    load_model(good)


def test_a_real_full_disk_during_a_save(trained, tmp_path):
    """A run on a small tmpfs (a mount namespace, no root needed) fills it while saving step 4.

    Twice: the weights (safetensors) and the optimizer state (torch.save) are each the write that
    fails. The message is prepare's disk-full message, step 2 stays the latest checkpoint, and with
    space freed the same command resumes from it.
    """
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("no unshare (util-linux) to make a small filesystem with")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {mnt}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {probe.stderr.strip()}")
    script = tmp_path / "full.sh"
    script.write_text(FULL_DISK_SCRIPT)
    src = tmp_path / "src"
    shutil.copytree(trained, src, ignore=shutil.ignore_patterns("step_000004", "eval"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LMFORGE_FAULT", None)
    for fail_on in ("weights", "optimizer"):
        out = tmp_path / fail_on
        out.mkdir()
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", str(script), str(mnt), str(src),
                            str(out), fail_on, sys.executable, *TINY, "train.max_steps=4", "train.save_every=2"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        err = (out / "full.err").read_text()
        assert (out / "full.rc").read_text().strip() == "1", err
        assert f"no space left on device while writing {mnt}/run/checkpoints/step_000004; the previous artifact " \
               "is untouched" in err, err
        assert "Traceback" not in err
        assert (out / "after_full.ls").read_text().split() == [".", "..", "step_000002"], "a half-written save is left"
        load_model(out / "run" / "checkpoints" / "step_000002")
        assert (out / "resume.rc").read_text().strip() == "0", (out / "resume.log").read_text()
        assert "resumed from" in (out / "resume.log").read_text()
        assert latest_checkpoint(out / "run" / "checkpoints").name == "step_000004"


# Runs inside the mount namespace: MNT SRC OUT FAIL_ON PYTHON overrides... The tmpfs is sized so step 4's
# weights (or its optimizer state) no longer fit, then grown again for the resume.
FULL_DISK_SCRIPT = r"""
set -e
MNT=$1; SRC=$2; OUT=$3; FAIL_ON=$4; PY=$5; shift 5
mount -t tmpfs -o size=64m tmpfs "$MNT"
cp -r "$SRC" "$MNT/run"
ck="$MNT/run/checkpoints/step_000002"
w=$(stat -c %s "$ck/model.safetensors"); o=$(du -sb "$ck/optimizer" | cut -f1)
if [ "$FAIL_ON" = weights ]; then room=$((w / 2)); else room=$((w + o / 2)); fi
used=$(df -B1 --output=used "$MNT" | tail -1)
mount -o remount,size=$((used + room + 65536)) "$MNT"
set +e
"$PY" -m lmforge pretrain run_dir="$MNT/run" "$@" > "$OUT/full.out" 2> "$OUT/full.err"
echo $? > "$OUT/full.rc"
ls -a "$MNT/run/checkpoints" > "$OUT/after_full.ls"
mount -o remount,size=64m "$MNT"
"$PY" -m lmforge pretrain run_dir="$MNT/run" "$@" > "$OUT/resume.log" 2>&1
echo $? > "$OUT/resume.rc"
cp -r "$MNT/run" "$OUT/run"
"""


# --- the rest -------------------------------------------------------------------------------------------

def test_leftovers_of_a_killed_writer_are_cleared(tmp_path):
    """A writer killed mid-build leaves .NAME.tmp-PID; one killed between its renames leaves only .NAME.old-PID."""
    from lmforge.io import AtomicDir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    (tmp_path / f".data.tmp-{pid}").mkdir()  # half-built
    (tmp_path / f".data.old-{pid}").mkdir()  # the last complete copy, moved aside before the kill
    (tmp_path / f".data.old-{pid}" / "manifest.json").write_text("{}")
    (tmp_path / f".data.tmp-{os.getpid() + 10**7}").mkdir()  # no such process either: cleared
    (tmp_path / ".other.tmp-1").mkdir()  # another artifact's (pid 1 is alive): not ours to touch
    with AtomicDir(tmp_path / "data") as tmp:
        assert (tmp_path / "data" / "manifest.json").is_file(), "the old copy was restored first"
        (tmp / "manifest.json").write_text('{"new": true}')
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "data"]
    assert json.loads((tmp_path / "data" / "manifest.json").read_text()) == {"new": True}


def test_initial_weights_are_seeded():
    torch.manual_seed(0)
    a = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, max_seq_len=16))
    torch.manual_seed(0)
    b = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, max_seq_len=16))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
