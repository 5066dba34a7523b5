"""checkpoint.resolve_checkpoint: one reading of "which checkpoint" for every command, with errors that name
the key, the folder and what to do. Folders here are empty stand-ins: resolution only looks at file names."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.checkpoint import resolve_checkpoint
from lmforge.cli import main as cli_main
from lmforge.errors import LmforgeError


def fake(folder: Path, adapter: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / ("adapter_model.safetensors" if adapter else "model.safetensors")).write_bytes(b"")
    return folder


@pytest.fixture()
def root(tmp_path):
    run = tmp_path / "run"
    fake(run / "checkpoints" / "step_000002")
    fake(run / "checkpoints" / "step_000010")
    (run / "checkpoints" / ".step_000011.tmp-99999").mkdir()  # an interrupted save
    fake(run / "sft" / "checkpoints" / "step_000005", adapter=True)
    (run / "dpo" / "checkpoints").mkdir(parents=True)
    fake(tmp_path / "loose" / "step_000003")
    fake(tmp_path / "only-sft" / "sft" / "checkpoints" / "step_000001", adapter=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    return tmp_path


FOUND = [  # (target, run_dir, the folder it means)
    ("run/checkpoints/step_000002", None, "run/checkpoints/step_000002"),
    ("run/sft/checkpoints/step_000005", None, "run/sft/checkpoints/step_000005"),  # an adapter checkpoint
    ("run", None, "run/checkpoints/step_000010"),  # a run: its latest pretraining checkpoint
    ("run/checkpoints", None, "run/checkpoints/step_000010"),
    ("run/sft", None, "run/sft/checkpoints/step_000005"),  # a stage folder
    ("run/sft/checkpoints", None, "run/sft/checkpoints/step_000005"),
    ("loose", None, "loose/step_000003"),  # any folder of step_N
    ("sft", "run", "run/sft/checkpoints/step_000005"),  # a stage name of the run
    ("pretrain", "run", "run/checkpoints/step_000010"),
    ("", "run", "run/checkpoints/step_000010"),
]


@pytest.mark.parametrize("target, run_dir, want", FOUND)
def test_what_each_target_means(root, target, run_dir, want):
    got = resolve_checkpoint(str(root / target) if "/" in target or target in ("run", "loose") else target,
                             root / run_dir if run_dir else None)
    assert got == root / want


ERRORS = [  # (target, run_dir, key, what the message must say)
    ("missing", None, "eval.checkpoint", r"eval\.checkpoint='.*missing': .*missing does not exist: give a "
                                         r"checkpoint folder, a run folder, a stage folder \(RUN/sft\) or a stage"),
    ("dpo", "run", "sft.init_from", r"sft\.init_from='dpo': no dpo checkpoint in .*run/dpo/checkpoints yet; the "
                                    r"run's stages with checkpoints: .*run/sft: run `lmforge dpo run_dir="),
    ("grpo", "run", "", r"^no grpo checkpoint in .*run/grpo/checkpoints yet"),
    ("run/dpo", None, "", r"run/dpo/checkpoints holds no complete checkpoint yet"),
    ("only-sft", None, "", r"only-sft has no pretraining checkpoint .*stages with checkpoints: .*only-sft/sft"),
    ("", "only-sft", "dpo.init_from", r"dpo\.init_from='': no pretrain checkpoint in .*only-sft/checkpoints yet; "
                                      r"the run's stages with checkpoints: .*only-sft/sft"),
    ("", "nowhere", "", r"no pretrain checkpoint in .*nowhere/checkpoints yet"),
    ("empty", None, "", r"empty is neither a checkpoint \(no config\.json\) nor a run or stage folder"),
    ("file.txt", None, "", r"file\.txt is a file; a checkpoint is a folder"),
    ("", None, "", r"no checkpoint given"),
]


@pytest.mark.parametrize("target, run_dir, key, message", ERRORS)
def test_errors_say_what_to_fix(root, target, run_dir, key, message):
    path = str(root / target) if target not in ("", "dpo", "grpo") else target
    with pytest.raises(LmforgeError, match=message):
        resolve_checkpoint(path, root / run_dir if run_dir else None, key)


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    return e.value.code


@pytest.mark.parametrize("args", [
    ["generate", "dpo", "--prompt", "x"],
    ["chat", "dpo"],
    ["serve", "dpo", "--port", "0"],
    ["eval", "eval.checkpoint=dpo"],
    ["sft", "sft.init_from=dpo", "sft.data=[none.jsonl]"],
    ["generate", "generate.checkpoint=dpo", "--prompt", "x"],
])
def test_every_command_reads_a_stage_name_the_same_way(root, args, capsys):
    """A stage name is resolved against run_dir, by the same function and with the same error, in every command."""
    assert run_cli([*args, f"run_dir={root / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "no dpo checkpoint in" in err and "run/sft" in err and "Traceback" not in err


def test_every_command_takes_a_stage_folder(root, capsys):
    """RUN/sft gets past resolution everywhere: the error is now about the stand-in's empty files."""
    for args in (["generate", str(root / "run" / "sft"), "--prompt", "x"], ["export", "hf", str(root / "run" / "sft"),
                 str(root / "out")], ["merge", str(root / "run" / "sft"), str(root / "out")],
                 ["eval", f"eval.checkpoint={root / 'run' / 'sft'}", f"run_dir={root / 'run'}"]):
        assert run_cli(args) == 2
        err = capsys.readouterr().err
        assert "step_000005" in err and "does not exist" not in err and "no checkpoint" not in err, (args, err)
