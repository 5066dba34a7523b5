"""LoRA / QLoRA through peft: adapters saved on their own in PEFT's layout, the base untouched, a merged
checkpoint that gives the logits of base + adapter, QLoRA's NF4 base and its memory, DPO on adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from test_chat import tiny_checkpoint, write_jsonl
from test_sft import EXAMPLES, sft_config

from lmforge.checkpoint import load_model

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 12]])
LORA = ["sft.lora.enabled=true", "sft.lora.r=4", "sft.lora.alpha=8", "sft.lora.dropout=0.1",
        "sft.train.max_steps=10", "sft.train.lr=1e-2"]


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


def test_lora_adapters_saved_alone_peft_compatible_and_merge_matches(tmp_path):
    from lmforge.train.lora import cmd_merge, load_adapted
    from lmforge.train.sft import run_sft

    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", EXAMPLES)
    ckpt = run_sft(sft_config(tmp_path, base, data, *LORA, "sft.lora.target_modules=[q_proj,v_proj,down_proj]")
                   ).checkpoint
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == str(base)
    sd = load_file(ckpt / "adapter_model.safetensors")
    assert sd and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in sd)
    assert len(sd) == 2 * 3 * 2  # (A, B) x 3 targets x 2 layers
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k)  # the adapters learned something

    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 12]])
    adapted = load_adapted(ckpt, merge=False)
    # PEFT itself reads the folder (onto the base loaded by transformers) and agrees.
    by_peft = peft.AutoPeftModelForCausalLM.from_pretrained(str(ckpt)).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_peft(ids).logits, logits_of(adapted, ids), atol=2e-5, rtol=1e-4)
    # `lmforge merge` writes a plain checkpoint with the same logits as base + adapter.
    assert cmd_merge([str(ckpt), str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    torch.testing.assert_close(logits_of(merged, ids), logits_of(adapted, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits_of(merged, ids), logits_of(load_model(base), ids))
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_qlora_nf4_base_trains_and_saves_memory(tmp_path):
    from lmforge.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.train.lora import load_adapted, quantize_nf4
    from lmforge.train.sft import run_sft

    # The memory figure: block weights in NF4 take 4 bits plus ~0.5 bit of double-quantized scales.
    model = Transformer(ModelConfig(n_layer=2, n_embd=256, n_head=4, vocab_size=512, max_seq_len=64))
    mem = quantize_nf4(model)
    assert mem["linear_bytes_fp"] == 2 * (4 * 256 * 256 + 3 * 256 * 704) * 4
    assert mem["linear_bytes_nf4"] / mem["linear_bytes_fp"] < 0.15  # fp32 -> ~4.5 bits: 7x smaller

    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", EXAMPLES)
    result = run_sft(sft_config(tmp_path, base, data, *LORA, "sft.lora.quantize=nf4", "sft.train.max_steps=16",
                                "sft.train.log_every=8", "sft.lora.r=16", "sft.lora.alpha=32", "sft.train.lr=3e-3",
                                "sft.train.warmup_steps=2"))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[1] < losses[0] - 0.2  # the adapters learn on top of the frozen 4-bit base
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 12]])
    # The merge applies the adapters to the base as it was trained: NF4-rounded, dequantized.
    merged, adapted = load_adapted(result.checkpoint), load_adapted(result.checkpoint, merge=False)
    torch.testing.assert_close(logits_of(merged, ids), logits_of(adapted, ids), atol=1e-5, rtol=1e-5)


def test_dpo_with_lora_uses_the_base_as_reference(tmp_path):
    from test_dpo import PAIRS, dpo_config

    from lmforge.train.dpo import run_dpo

    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = run_dpo(dpo_config(tmp_path, base, data, "lora", "dpo.lora.enabled=true", "dpo.lora.r=4",
                                "dpo.train.max_steps=8", "dpo.train.eval_every=8", "dpo.train.lr=1e-2"))
    first = json.loads((tmp_path / "lora" / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at zero: policy == base
    assert result.metrics["val_loss"] < math.log(2)
    assert (result.checkpoint / "adapter_model.safetensors").is_file()


def test_adapter_checkpoint_finds_its_base_from_anywhere(tmp_path, monkeypatch):
    """Trained with relative paths; then merged from /, loaded by peft.AutoPeftModelForCausalLM, after the
    whole work folder moved, and with another base at the old absolute path (the relative one wins)."""
    import shutil

    from lmforge.cli import main as cli_main
    from lmforge.errors import LmforgeError
    from lmforge.train.lora import load_adapted, load_any
    from lmforge.train.sft import run_sft

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    tiny_checkpoint(Path("."))
    data = write_jsonl(Path("sft.jsonl"), EXAMPLES)
    rel = run_sft(sft_config(Path("."), Path("base/step_000000"), data, *LORA)).checkpoint
    ckpt = (work / rel).resolve()
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((work / "base" / "step_000000").resolve())
    assert cfg["task_type"] == "CAUSAL_LM"
    meta = json.loads((ckpt / "lmforge_adapter.json").read_text())
    assert meta == {"quantize": "", "base": "../../../../base/step_000000"}
    want = logits_of(load_adapted(ckpt, merge=False), IDS)

    monkeypatch.chdir("/")
    with pytest.raises(SystemExit) as e:
        cli_main(["merge", str(ckpt.parent.parent), str(tmp_path / "merged")])  # the stage folder: its latest
    assert e.value.code == 0
    torch.testing.assert_close(logits_of(load_model(tmp_path / "merged"), IDS), want, atol=1e-5, rtol=1e-5)
    by_peft = peft.AutoPeftModelForCausalLM.from_pretrained(str(ckpt)).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_peft(IDS).logits, want, atol=2e-5, rtol=1e-4)
    lone = tmp_path / "lone" / "step_000010"
    shutil.copytree(ckpt, lone)  # the adapter folder alone: found through the absolute path
    torch.testing.assert_close(logits_of(load_any(lone), IDS), want, atol=1e-5, rtol=1e-5)

    moved = tmp_path / "elsewhere" / "work"
    shutil.move(work, moved)
    ckpt = moved / "run" / "sft" / "checkpoints" / ckpt.name
    torch.testing.assert_close(logits_of(load_any(ckpt), IDS), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(LmforgeError, match="not where the adapter says"):
        load_any(lone)
    # A different base (same shape) at the old absolute path: the moved run still uses its own.
    tiny_checkpoint(work, seed=1)
    torch.testing.assert_close(logits_of(load_any(ckpt), IDS), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits_of(load_any(lone), IDS), want)  # the lone copy can only follow the absolute
    # A base that does not match what the adapters were trained on is refused, not silently used.
    shutil.rmtree(work)
    shutil.rmtree(moved / "base" / "step_000000")
    tiny_checkpoint(moved, n_kv_head=2)
    with pytest.raises(LmforgeError, match="is not the base these adapters were trained on"):
        load_any(ckpt)
