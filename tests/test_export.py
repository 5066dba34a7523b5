"""Hugging Face export and import: transformers loads what we write, we load what it writes, and the
logits and greedy text agree to fp32 tolerance."""

from __future__ import annotations

import json

import pytest
import torch
from infer_helpers import make_checkpoint, make_model, make_tokenizer, one_thread  # noqa: F401 (fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.cli import main as cli_main
from lmforge.config import MoEConfig
from lmforge.errors import LmforgeError
from lmforge.export.hf import export_hf
from lmforge.export.hf_import import import_hf
from lmforge.infer.chat import render_messages
from lmforge.infer.engine import generate_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, top_k=0, top_p=1.0)
IDS = [[5, 17, 42, 7, 100, 3, 250, 64, 11]]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def assert_same_model(ours, theirs, stop_ids: set[int]):
    x = torch.tensor(IDS)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=2e-5, rtol=1e-4)
    assert hf_greedy(theirs, IDS[0], 12) == generate_ids(ours, IDS, GREEDY, stop_ids=stop_ids)[0]


VARIANTS = {
    "llama-gqa-tied": dict(),
    "llama-untied-theta": dict(tie_embeddings=False, rope_theta=500000.0, n_kv_head=4),
    "qwen3-qknorm": dict(qk_norm=True),
    "qwen2-qkv-bias": dict(attn_qkv_bias=True, n_kv_head=1),
    "llama-bias": dict(bias=True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_hf_loads_in_transformers(tmp_path, name):
    ckpt, model, tok = make_checkpoint(tmp_path, **VARIANTS[name])
    if name == "qwen2-qkv-bias":  # biases must be non-zero to be tested
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        save_checkpoint(ckpt, model, tokenizer_dir=tmp_path / "tok")
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    want_type = {"qwen3-qknorm": "qwen3", "qwen2-qkv-bias": "qwen2"}.get(name, "llama")
    assert config["model_type"] == want_type
    assert config["rope_parameters"]["rope_theta"] == model.cfg.rope_theta == config["rope_theta"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eot_id, tok.im_end_id]
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__.lower().startswith(want_type)
    assert_same_model(model, hf_model, {tok.eot_id, tok.im_end_id})

    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "Hello world, 中文 and code: def f(x): return x\n"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token == "<|endoftext|>"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == render_messages(tok, messages) == tok.render_chat(messages, add_generation_prompt=True)
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "chat_template.jinja").is_file()
    ids = generate_ids(model, [tok.encode("Hello")], GREEDY, stop_ids={tok.eot_id, tok.im_end_id})[0]
    assert hf_tok.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("overrides, key", [
    (dict(logit_softcap=30.0), "model.logit_softcap"),
    (dict(mlp="relu2"), "model.mlp"),
    (dict(norm="layernorm"), "model.norm"),
    (dict(qk_norm=True, bias=True), "model.bias"),
    (dict(arch="gpt2", pos="learned", mlp="gelu", norm="layernorm", bias=False), "model.bias"),
    # the families together: each export writes its own family only
    (dict(attention="mla", n_kv_head=0, moe=MoEConfig(experts=4, top_k=2)), "model.moe.experts"),
    (dict(qk_norm=True, sliding_window=8, moe=MoEConfig(experts=4, top_k=2)), "model.sliding_window"),
])
def test_export_hf_rejects_what_transformers_cannot_represent(tmp_path, overrides, key):
    model = make_model(300, **overrides)
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    with pytest.raises(LmforgeError, match=key.replace(".", r"\.")):
        export_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_cli_takes_a_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt, _, _ = make_checkpoint(tmp_path)
    import shutil

    shutil.copytree(ckpt, run / "checkpoints" / "step_000010")
    with pytest.raises(SystemExit) as e:
        cli_main(["export", "hf", str(run), str(tmp_path / "hf")])
    assert e.value.code == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as e:
        cli_main(["export", "hf", str(tmp_path / "missing"), str(tmp_path / "x")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


# --- import ---------------------------------------------------------------------------------------

def tiny_hf(kind: str, vocab: int, tie: bool, seed: int = 0, head_dim: int = 16):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  rope_theta=20000.0)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind]
    extra = {"head_dim": head_dim} if kind == "qwen3" else {}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**common, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms and biases: make them matter
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind, tie, head_dim", [("llama", False, 16), ("qwen2", True, 16), ("qwen3", True, 16),
                                                 ("qwen3", False, 16), ("qwen3", True, 24)])
def test_import_hf_matches_the_source_model(tmp_path, kind, tie, head_dim):
    # head_dim 24 with hidden 64 and 4 heads: real Qwen3 models keep head_dim 128 at any width.
    tok = make_tokenizer(tmp_path / "tok")
    hf_model = tiny_hf(kind, tok.vocab_size, tie, head_dim=head_dim)
    src = tmp_path / "src"
    hf_model.save_pretrained(src)
    tok.save(src)
    out = import_hf(src, tmp_path / "ckpt")
    ours = load_model(out)
    assert ours.cfg.attn_qkv_bias == (kind == "qwen2") and ours.cfg.qk_norm == (kind == "qwen3")
    assert ours.cfg.vocab_size == tok.vocab_size and ours.cfg.max_seq_len == 96
    assert ours.cfg.head_dim == (head_dim if head_dim != 16 else 0)
    assert Tokenizer.load(out).hash == tok.hash  # tokenizer files came along
    assert_same_model(ours, hf_model, {tok.eot_id, tok.im_end_id})
    # the imported checkpoint is a valid transformers folder itself, and exports back losslessly
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again) is type(hf_model)
    back = AutoModelForCausalLM.from_pretrained(export_hf(out, tmp_path / "hf")).eval()
    assert_same_model(ours, back, {tok.eot_id, tok.im_end_id})


def test_import_errors_name_the_key(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    src = tmp_path / "src"
    tiny_hf("llama", tok.vocab_size, False).save_pretrained(src)
    config = json.loads((src / "config.json").read_text())

    def attempt(**changes):
        (src / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(LmforgeError) as e:
            import_hf(src, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return str(e.value)

    assert "rope_type='llama3'" in attempt(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0})
    assert "rope_scaling" in attempt(rope_scaling={"type": "linear", "factor": 2.0})
    assert "model_type='mistral'" in attempt(model_type="mistral")
    assert "head_dim=7" in attempt(head_dim=7)
    assert "hidden_act" in attempt(hidden_act="gelu")
    assert "layer_types" in attempt(model_type="ministral", sliding_window=4, layer_types=["chunked_attention"] * 2)
    assert "sliding_window=-1" in attempt(model_type="ministral", sliding_window=-1)
    assert "mlp_bias" in attempt(attention_bias=True, mlp_bias=False)
    assert "missing" in attempt(num_hidden_layers=3)
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").unlink()
    with pytest.raises(LmforgeError, match="no model.safetensors"):
        import_hf(src, tmp_path / "out")
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(LmforgeError, match="pickle"):
        import_hf(src, tmp_path / "out")


def test_export_hf_gpt2_variant_loads_as_gpt2lmheadmodel(tmp_path):
    """`lmforge export hf` on a GPT-2-architecture checkpoint: GPT2LMHeadModel, no custom code, same logits."""
    from lmforge.config import load_config
    from lmforge.model.transformer import Transformer

    cfg = load_config(overrides=["model.arch=gpt2", "model.vocab_size=448", "model.n_layer=2", "model.n_embd=64",
                                 "model.n_head=4", "model.max_seq_len=64"]).model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tok = make_tokenizer(tmp_path / "tok")
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer_dir=tmp_path / "tok")
    out = export_hf(ckpt, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = torch.tensor([tok.encode("def f(x): return x + 1")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)


def test_checkpoint_from_training_stops_at_im_end_in_transformers(tmp_path):
    """A checkpoint folder as `lmforge sft` saved it (no export) carries generation_config.json and the token
    ids, so transformers' generate ends a chat reply at <|im_end|> instead of running to max_new_tokens."""
    from test_chat import tiny_checkpoint, write_jsonl
    from test_sft import EXAMPLES, sft_config

    from lmforge.train.sft import run_sft

    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", EXAMPLES)
    ckpt = run_sft(sft_config(tmp_path, base, data)).checkpoint  # 60 steps: it reproduces the replies
    tok = Tokenizer.load(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (None, tok.eot_id, tok.eot_id)
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == [tok.eot_id, tok.im_end_id]

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    hf_tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.im_end_id in model.generation_config.eos_token_id
    messages = EXAMPLES[0]["messages"][:2]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = hf_tok(text, add_special_tokens=False)["input_ids"]
    new = hf_greedy(model, prompt, 40)
    assert new[-1] == tok.im_end_id and len(new) < 40
    assert hf_tok.decode(new, skip_special_tokens=True) == EXAMPLES[0]["messages"][2]["content"]
