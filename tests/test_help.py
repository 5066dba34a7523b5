"""`lmforge <command> --help` lists the config keys the command reads, straight from the config dataclasses."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from spine import lmforge

from lmforge import cli
from lmforge.config import Config, ModelConfig, StageTrain, TrainConfig, field_docs

STAGES = ["tokenizer", "prepare", "pretrain", "sft", "dpo", "rm", "grpo", "eval", "generate", "chat", "serve",
          "run", "quickstart"]


def help_text(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key, per-stage train overrides left out (they mirror train.*)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp is StageTrain:
            continue
        if dataclasses.is_dataclass(tp):
            out += leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_every_config_key_is_in_some_commands_help(capsys):
    texts = {name: help_text(name, capsys) for name in cli.COMMANDS if cli.COMMANDS[name].keys}
    assert set(STAGES) <= set(texts), "every stage lists its keys"
    lines = {line.split(":")[0].strip() for text in texts.values() for line in text.splitlines()}
    missing = [k for k in leaf_keys() if k not in lines]
    assert not missing, f"keys no command's --help lists: {missing}"
    for stage in ("sft", "dpo", "rm", "grpo"):
        assert f"{stage}.train.<key>" in texts[stage]  # per-stage train overrides are named


def test_pretrain_help_shows_each_described_key_with_type_default_and_description():
    r = lmforge("pretrain", "--help")  # the real CLI, as a user types it
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        docs = field_docs(cls)
        assert docs, cls
        assert f"{section}:" in lines
        for name, doc in docs.items():
            line = next((x for x in lines if x.strip().startswith(f"{section}.{name}:")), None)
            assert line is not None, f"{section}.{name} missing from pretrain --help"
            assert doc in line, (name, line)
    line = next(x for x in lines if x.strip().startswith("train.precision:"))
    assert "train.precision: auto|fp32|bf16|fp16 = auto" in line  # Literal choices, default
    assert "train.lr: float = 0.0003" in r.stdout and "train.compile: bool = false" in r.stdout
    assert "run_dir: str = runs/default" in r.stdout
    assert "sft." not in r.stdout  # only the sections pretraining reads


def test_stage_help_lists_its_sections(capsys):
    text = help_text("sft", capsys)
    for heading in ("top-level:", "sft:", "sft.lora:", "sft.train:", "train:"):
        assert f"\n{heading}\n" in text, heading
    assert 'sft.lora.quantize: ""|nf4 = ""' in text
    assert "dpo.loss" not in text and "model.n_layer" not in text
    gen = help_text("generate", capsys)
    assert "generate.temperature: float = 0.8" in gen and "--prompt" in gen  # keys and flags together
    assert "train." not in gen


def test_quickstart_help_shows_its_recipes_values(capsys):
    text = help_text("quickstart", capsys)
    assert "defaults as quickstart.yaml sets them" in text
    assert "run_dir: str = runs/quickstart" in text and "train.seq_len: int = 256" in text
    assert "model.preset: str = tiny" in text


def test_wrapped_help_keeps_every_description_word():
    text = cli.keys_help(("train",), width=80)
    assert max(len(line) for line in text.splitlines() if not line.startswith("  train.schedule")) <= 80
    words = " ".join(text.split())
    assert "recompute each block in backward: less memory, ~30% more compute" in words
