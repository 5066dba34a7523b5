"""The GPT-2 variant: preset sizes, and export to transformers' GPT2LMHeadModel with equal logits."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.export.gpt2 import gpt2_state_dict, write_gpt2
from lmforge.model.presets import model_config
from lmforge.model.transformer import Transformer


@pytest.mark.parametrize("preset, expected", [("gpt2-small", 124_439_808), ("gpt2-medium", 354_823_168),
                                              ("gpt2-large", 774_030_080)])
def test_gpt2_presets_match_openai_sizes(preset, expected):
    """OpenAI's released GPT-2 sizes at vocab 50257 (tied head, learned positions, biases)."""
    with torch.device("meta"):
        model = Transformer(model_config(preset, vocab_size=50257))
    assert model.num_params() == expected


def test_arch_gpt2_brings_its_block_choices():
    cfg = load_config(overrides=["model.arch=gpt2"]).model
    assert (cfg.norm, cfg.pos, cfg.mlp, cfg.bias, cfg.norm_eps, cfg.tie_embeddings) == \
        ("layernorm", "learned", "gelu", True, 1e-5, True)


def _tiny_gpt2(tie: bool) -> Transformer:
    cfg = model_config("gpt2-small", n_layer=2, n_embd=64, n_head=4, vocab_size=96, max_seq_len=32,
                       tie_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial gains and biases, so a swapped or untransposed tensor shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_export_gives_gpt2lmheadmodel_with_equal_logits(tmp_path, tie):
    from transformers import GPT2LMHeadModel

    model = _tiny_gpt2(tie)
    write_gpt2(model, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.model_type == "gpt2" and hf.config.tie_word_embeddings == tie
    x = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=1e-5)


def test_conv1d_layout_is_transposed():
    sd = gpt2_state_dict(_tiny_gpt2(True))
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (64, 3 * 64)  # (in, out)
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (64, 256)
    assert "lm_head.weight" not in sd  # tied: transformers re-ties it to wte


def test_llama_model_is_refused_with_the_keys_to_change():
    with pytest.raises(LmforgeError, match="model.norm=rmsnorm"):
        gpt2_state_dict(Transformer(model_config("tiny", vocab_size=64)))
