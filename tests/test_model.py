"""The model against transformers, the KV cache against full recompute, packing against separate runs."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.config import ModelConfig, load_config
from lmforge.model.transformer import Transformer, ffn_dim


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=96, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def hf_twin(cfg: ModelConfig):
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=ffn_dim(cfg),
              num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
              num_key_value_heads=cfg.n_kv_head or cfg.n_head, max_position_embeddings=cfg.max_seq_len,
              rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.qk_norm:
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=cfg.n_embd // cfg.n_head, **kw))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))


@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=True), dict(n_kv_head=1), dict(tie_embeddings=False),
                                dict(rope_theta=500000.0, n_kv_head=4)])
def test_logits_equal_transformers(kw):
    torch.manual_seed(0)
    cfg = tiny(**kw)
    ours = Transformer(cfg).eval()
    theirs = hf_twin(cfg).eval()
    theirs.load_state_dict(ours.state_dict(), strict=not cfg.tie_embeddings)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, rtol=1e-5, atol=1e-5)


def test_parameter_names_are_hugging_face():
    names = set(Transformer(tiny(qk_norm=True, tie_embeddings=False)).state_dict())
    for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.1.self_attn.k_norm.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.norm.weight", "lm_head.weight"):
        assert n in names


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_equals_full_recompute(arch):
    torch.manual_seed(1)
    cfg = load_config(overrides=[f"model.arch={arch}", "model.vocab_size=96", "model.n_layer=2", "model.n_embd=64",
                                 "model.n_head=4", "model.max_seq_len=64"]).model
    m = Transformer(cfg).eval()
    x = torch.randint(0, 96, (3, 20))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(3, 32)
        parts = [m(x[:, :9], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(9, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_packed_documents_do_not_attend_across():
    """Two documents packed in one row give the logits each gets on its own."""
    torch.manual_seed(2)
    m = Transformer(tiny()).eval()
    a, b = torch.randint(0, 96, (1, 7)), torch.randint(0, 96, (1, 11))
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 11])
    positions = torch.cat([torch.arange(7), torch.arange(11)]).unsqueeze(0)
    with torch.no_grad():
        out = m(packed, positions=positions, doc_ids=doc_ids)
        torch.testing.assert_close(out[:, :7], m(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 7:], m(b), rtol=1e-5, atol=1e-5)


def test_context_overflow_is_an_error():
    m = Transformer(tiny(max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("preset,lo,hi", [("tiny", 2e6, 18e6), ("small", 110e6, 140e6), ("medium", 330e6, 380e6),
                                          ("large", 720e6, 800e6), ("xl", 1.2e9, 1.45e9)])
def test_preset_sizes(preset, lo, hi):
    cfg = load_config(overrides=[f"model.preset={preset}", "model.vocab_size=50304"]).model
    with torch.device("meta"):
        n = Transformer(cfg).num_params()
    assert lo <= n <= hi, n


def test_weight_decay_only_on_matrices():
    from lmforge.config import TrainConfig
    from lmforge.train.optim import build_optimizer

    opt = build_optimizer(Transformer(tiny()), TrainConfig())
    decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    plain = [p for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert all(p.dim() == 2 for p in decayed) and all(p.dim() == 1 for p in plain) and plain
