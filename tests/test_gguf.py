"""GGUF export: read the file back with gguf.GGUFReader and check metadata, tokenizer, every tensor,
and, through a small numpy forward pass with llama.cpp's RoPE conventions, that the model computes
the same logits as lmforge (which is what the q/k permutation is for)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from infer_helpers import make_checkpoint, make_model, one_thread  # noqa: F401 (fixture)

from lmforge.checkpoint import model_state, save_checkpoint
from lmforge.cli import main as cli_main
from lmforge.config import MoEConfig
from lmforge.errors import LmforgeError
from lmforge.export.gguf import export_gguf, tensor_names
from lmforge.model.moe import expert_dim
from lmforge.model.transformer import ffn_dim

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "llama": dict(),
    "llama-untied-mha": dict(tie_embeddings=False, n_kv_head=4, rope_theta=50000.0),
    "qwen3": dict(qk_norm=True),
    "qwen2": dict(attn_qkv_bias=True),
}
ARCH = {"llama": "llama", "llama-untied-mha": "llama", "qwen3": "qwen3", "qwen2": "qwen2"}


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def tensors(reader) -> dict[str, tuple[np.ndarray, Q, tuple]]:
    """name -> (values as float32 in numpy (rows, cols) order, type, GGUF shape)."""
    out = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
        out[t.name] = (values, t.tensor_type, tuple(t.shape.tolist()))
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation, written independently: row h*D + 2j + i <- h*D + i*D/2 + j."""
    D = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(D // 2):
            for i in range(2):
                out[h * D + i * D // 2 + j] = w[h * D + 2 * j + i]
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    made = {}
    for name, overrides in VARIANTS.items():
        root = tmp_path_factory.mktemp(name)
        ckpt, model, tok = make_checkpoint(root, **overrides)
        if name == "qwen2":
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.5)
            save_checkpoint(ckpt, model, tokenizer_dir=root / "tok")
        files = {kind: export_gguf(ckpt, root / f"model-{kind}.gguf", kind) for kind in ("f16", "q8_0", "q4_0")}
        made[name] = (ckpt, model, tok, files)
    return made


@pytest.mark.parametrize("name", list(VARIANTS))
def test_metadata_and_tokenizer(exported, name):
    ckpt, model, tok, files = exported[name]
    cfg = model.cfg
    r = gguf.GGUFReader(files["f16"])
    arch = ARCH[name]
    assert field(r, "general.architecture") == arch
    expect = {"context_length": cfg.max_seq_len, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
              "feed_forward_length": ffn_dim(cfg), "attention.head_count": cfg.n_head,
              "attention.head_count_kv": cfg.n_kv_head, "rope.dimension_count": 16, "attention.key_length": 16,
              "attention.value_length": 16, "vocab_size": cfg.vocab_size}
    for key, value in expect.items():
        assert field(r, f"{arch}.{key}") == value, key
    assert field(r, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "qwen2"
    data = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size
    assert all(tokens[i] == s for s, i in vocab.items())
    assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, cfg.vocab_size)]
    types = field(r, "tokenizer.ggml.token_type")
    assert types[tok.eot_id] == types[tok.im_end_id] == gguf.TokenType.CONTROL
    assert types[vocab["a"]] == gguf.TokenType.NORMAL and types[-1] == gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    assert field(r, "tokenizer.ggml.merges") == merges and merges
    assert field(r, "tokenizer.ggml.eos_token_id") == tok.eot_id == field(r, "tokenizer.ggml.bos_token_id")
    assert field(r, "tokenizer.ggml.eot_token_id") == tok.im_end_id
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.chat_template") == tok.chat_template


@pytest.mark.parametrize("kind, tol", [("f16", 2e-3), ("q8_0", 0.02), ("q4_0", 0.13)])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_tensor_round_trips(exported, name, kind, tol):
    ckpt, model, tok, files = exported[name]
    cfg = model.cfg
    got = tensors(gguf.GGUFReader(files[kind]))
    names = tensor_names(cfg)
    state = model_state(model)
    assert set(got) == {names[k] for k in state}
    for ours, t in state.items():
        values, qtype, shape = got[names[ours]]
        src = t.float().numpy()
        assert shape == tuple(reversed(src.shape))  # GGUF lists dimensions fastest-first
        if src.ndim == 1:
            assert qtype == Q.F32
        elif kind == "f16":
            assert qtype == Q.F16
        elif kind == "q4_0" and names[ours] not in ("token_embd.weight", "output.weight"):
            assert qtype == Q.Q4_0
        else:
            assert qtype == Q.Q8_0
        if ARCH[name] == "llama" and ".q_proj." in ours:
            values = unpermute(values, cfg.n_head)
        elif ARCH[name] == "llama" and ".k_proj." in ours:
            values = unpermute(values, cfg.n_kv_head)
        scale = np.abs(src).max(axis=-1, keepdims=True) if src.ndim == 2 else np.abs(src).max()
        assert np.all(np.abs(values - src) <= tol * scale + 1e-6), (ours, np.abs(values - src).max())


@pytest.mark.parametrize("name", ["llama"])
def test_file_size_follows_the_type(exported, name):
    _, model, _, files = exported[name]
    n = sum(t.numel() for t in model_state(model).values())
    size = {k: p.stat().st_size for k, p in files.items()}
    header = size["f16"] - 2 * n  # metadata (tokenizer included) is the same in all three
    assert 0 < header < 40_000
    assert abs((size["q8_0"] - header) / n - 34 / 32) < 0.05  # 34 bytes per 32 values
    assert size["q4_0"] < size["q8_0"] < size["f16"]
    embed = model.model.embed_tokens.weight.numel()
    assert abs((size["q4_0"] - header - embed * 34 / 32) / (n - embed) - 18 / 32) < 0.05  # 18 bytes per 32


# --- what llama.cpp computes, in numpy ------------------------------------------------------------

def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, pos, base, neox):
    """x: (T, H, D). llama.cpp's `llama` graph rotates adjacent pairs; `qwen2`/`qwen3` (NEOX) halves."""
    D = x.shape[-1]
    theta = pos[:, None] * base ** (-np.arange(0, D, 2) / D)  # (T, D/2)
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
    a, b = (x[..., : D // 2], x[..., D // 2:]) if neox else (x[..., 0::2], x[..., 1::2])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if neox:
        out[..., : D // 2], out[..., D // 2:] = ra, rb
    else:
        out[..., 0::2], out[..., 1::2] = ra, rb
    return out


def gguf_forward(path, ids: list[int]) -> np.ndarray:
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")
    W = {k: v[0].astype(np.float64) for k, v in tensors(r).items()}
    get = lambda key: field(r, f"{arch}.{key}")
    n_head, n_kv, eps, base = get("attention.head_count"), get("attention.head_count_kv"), \
        get("attention.layer_norm_rms_epsilon"), get("rope.freq_base")
    x = W["token_embd.weight"][ids]
    T, C = x.shape
    D = C // n_head
    pos = np.arange(T, dtype=np.float64)
    causal = np.tril(np.ones((T, T), dtype=bool))
    for i in range(get("block_count")):
        p = f"blk.{i}."
        h = rms(x, W[p + "attn_norm.weight"], eps)
        q, k, v = (h @ W[p + f"attn_{n}.weight"].T + W.get(p + f"attn_{n}.bias", 0.0) for n in "qkv")
        q, k, v = q.reshape(T, n_head, D), k.reshape(T, n_kv, D), v.reshape(T, n_kv, D)
        if p + "attn_q_norm.weight" in W:
            q, k = rms(q, W[p + "attn_q_norm.weight"], eps), rms(k, W[p + "attn_k_norm.weight"], eps)
        q, k = rope(q, pos, base, arch != "llama"), rope(k, pos, base, arch != "llama")
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
        s = np.where(causal, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(T, C) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"], eps)
        if p + "ffn_gate_inp.weight" in W:
            x = x + moe_ffn(h, W, p, field(r, f"{arch}.expert_used_count"))
            continue
        g = h @ W[p + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
    out = W.get("output.weight", W["token_embd.weight"])
    return rms(x, W["output_norm.weight"], eps) @ out.T


def moe_ffn(h: np.ndarray, W: dict, p: str, k: int) -> np.ndarray:
    """llama.cpp's build_moe_ffn as qwen3moe calls it: softmax gating over ffn_gate_inp, the top k experts,
    their weights renormalised to sum to 1, each a SwiGLU of ffn_{gate,up,down}_exps (3-D: expert first)."""
    logits = h @ W[p + "ffn_gate_inp.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(h)
    for t in range(h.shape[0]):
        top = np.argsort(-probs[t])[:k]
        for e, wt in zip(top, probs[t, top] / probs[t, top].sum()):
            g, u = W[p + "ffn_gate_exps.weight"][e] @ h[t], W[p + "ffn_up_exps.weight"][e] @ h[t]
            out[t] += wt * (W[p + "ffn_down_exps.weight"][e] @ ((g / (1 + np.exp(-g))) * u))
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_llama_cpp_semantics_give_our_logits(exported, name):
    _, model, _, files = exported[name]
    ids = [5, 17, 42, 7, 100, 3, 250, 64, 11, 99, 12]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    theirs = gguf_forward(files["f16"], ids)
    assert np.abs(theirs - ours).max() < 0.02 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.9


def test_unpermuted_llama_would_be_wrong(exported, tmp_path, monkeypatch):
    """Guard the guard: skipping the permutation makes the llama-arch forward disagree."""
    import lmforge.export.gguf as mod

    ckpt, model, _, _ = exported["llama"]
    monkeypatch.setattr(mod, "rope_permute", lambda w, n: w)
    wrong = export_gguf(ckpt, tmp_path / "wrong.gguf", "f16")
    ids = [5, 17, 42, 7, 100, 3, 250, 64, 11, 99, 12]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    assert np.abs(gguf_forward(wrong, ids) - ours).max() > 0.05 * np.abs(ours).max()


def test_cli_and_errors(tmp_path, exported, capsys):
    ckpt = exported["llama"][0]
    with pytest.raises(SystemExit) as e:
        cli_main(["export", "gguf", str(ckpt), str(tmp_path / "m.gguf"), "--type", "q8_0"])
    assert e.value.code == 0 and (tmp_path / "m.gguf").stat().st_size > 0
    bad = save_checkpoint(tmp_path / "bad", make_model(300, logit_softcap=15.0), tokenizer_dir=ckpt)
    with pytest.raises(LmforgeError, match=r"model\.logit_softcap"):
        export_gguf(bad, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob(".bad.gguf*"))
    no_tok = save_checkpoint(tmp_path / "notok", make_model(300))
    with pytest.raises(LmforgeError, match="tokenizer.json"):
        export_gguf(no_tok, tmp_path / "x.gguf")


def adopted_checkpoint(root, from_file, **tokenizer_keys):
    """A checkpoint whose tokenizer lmforge adopted from another format (tests/tokenizer_fixtures.py)."""
    from infer_helpers import make_model

    from lmforge.config import Config
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    cfg = Config(run_dir=str(root / "run"))
    cfg.tokenizer.from_file = str(from_file)
    for k, v in tokenizer_keys.items():
        setattr(cfg.tokenizer, k, v)
    train_tokenizer(cfg)
    tok_dir = root / "run" / "tokenizer"
    tok = Tokenizer.load(tok_dir)
    return save_checkpoint(root / "ckpt", make_model(tok.vocab_size), tokenizer_dir=tok_dir), tok


def test_adopted_llama3_tokenizer_keeps_its_split_rule_and_specials(tmp_path):
    """llama.cpp re-implements split rules by name: Llama-3's regex is "llama-bpe", and its BOS is added."""
    from tokenizer_fixtures import llama3_folder

    ckpt, tok = adopted_checkpoint(tmp_path, llama3_folder(tmp_path / "l3"))
    r = gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf"))
    assert field(r, "tokenizer.ggml.pre") == "llama-bpe"
    tokens = field(r, "tokenizer.ggml.tokens")
    assert tokens[field(r, "tokenizer.ggml.bos_token_id")] == "<|begin_of_text|>" == tok.bos_token
    assert tokens[field(r, "tokenizer.ggml.eos_token_id")] == "<|end_of_text|>" == tok.eos_token
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    assert "tokenizer.ggml.eot_token_id" not in r.fields  # no <|im_end|> without tokenizer.add_chat_tokens


def test_tokenizers_llama_cpp_cannot_be_told_are_refused(tmp_path):
    from tokenizer_fixtures import LLAMA2_SPM, sentencepiece_model

    ckpt, _ = adopted_checkpoint(tmp_path, sentencepiece_model(tmp_path / "sp.model", **LLAMA2_SPM))
    with pytest.raises(LmforgeError, match="not a byte-level BPE tokenizer.*convert_hf_to_gguf"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# --- mixture of experts: llama.cpp's qwen3moe ---------------------------------------------------------

@pytest.fixture(scope="module")
def moe_exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3moe")
    ckpt, model, tok = make_checkpoint(root, qk_norm=True, tie_embeddings=False, moe=MoEConfig(experts=4, top_k=2))
    return model, {kind: export_gguf(ckpt, root / f"m-{kind}.gguf", kind) for kind in ("f16", "q8_0", "q4_0")}


def test_moe_metadata_is_what_the_converter_writes_for_qwen3_moe(moe_exported):
    model, files = moe_exported
    cfg = model.cfg
    r = gguf.GGUFReader(files["f16"])
    assert field(r, "general.architecture") == "qwen3moe"
    hidden = expert_dim(cfg, ffn_dim(cfg))
    expect = {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": hidden,
              "feed_forward_length": ffn_dim(cfg), "block_count": cfg.n_layer, "embedding_length": cfg.n_embd,
              "attention.head_count": cfg.n_head, "attention.head_count_kv": cfg.n_kv_head,
              "context_length": cfg.max_seq_len, "rope.dimension_count": 16, "attention.key_length": 16,
              "attention.value_length": 16, "vocab_size": cfg.vocab_size}
    for key, value in expect.items():
        assert field(r, f"qwen3moe.{key}") == value, key
    names = {t.name: tuple(t.shape.tolist()) for t in r.tensors}
    C, E, V = cfg.n_embd, 4, cfg.vocab_size
    want = {"token_embd.weight": (C, V), "output.weight": (C, V), "output_norm.weight": (C,)}
    for i in range(cfg.n_layer):  # GGUF shapes fastest-first, as llama.cpp's loader asks for them
        want.update({f"blk.{i}.attn_norm.weight": (C,), f"blk.{i}.ffn_norm.weight": (C,),
                     f"blk.{i}.attn_q.weight": (C, C), f"blk.{i}.attn_k.weight": (C, 32),
                     f"blk.{i}.attn_v.weight": (C, 32), f"blk.{i}.attn_output.weight": (C, C),
                     f"blk.{i}.attn_q_norm.weight": (16,), f"blk.{i}.attn_k_norm.weight": (16,),
                     f"blk.{i}.ffn_gate_inp.weight": (C, E), f"blk.{i}.ffn_gate_exps.weight": (C, hidden, E),
                     f"blk.{i}.ffn_up_exps.weight": (C, hidden, E), f"blk.{i}.ffn_down_exps.weight": (hidden, C, E)})
    assert names == want


@pytest.mark.parametrize("kind, tol", [("f16", 2e-3), ("q8_0", 0.02), ("q4_0", 0.13)])
def test_moe_every_tensor_round_trips(moe_exported, kind, tol):
    model, files = moe_exported
    got = tensors(gguf.GGUFReader(files[kind]))
    state = model_state(model)
    seen = set()
    for ours, t in state.items():
        src = t.float().numpy()
        i = ours.split(".")[2] if ours.startswith("model.layers.") else None
        if ours.endswith("mlp.experts.gate_up_proj"):  # gate rows first, then up rows (transformers' layout)
            h = src.shape[1] // 2
            pairs = [(f"blk.{i}.ffn_gate_exps.weight", src[:, :h]), (f"blk.{i}.ffn_up_exps.weight", src[:, h:])]
        else:
            pairs = [(tensor_names(model.cfg)[ours], src)]
        for name, want in pairs:
            values, qtype, _ = got[name]
            seen.add(name)
            assert qtype == (Q.F32 if want.ndim == 1 else Q.F16 if kind == "f16" else
                             Q.Q8_0 if kind == "q8_0" or name in ("token_embd.weight", "output.weight") else Q.Q4_0)
            scale = np.abs(want).max(axis=-1, keepdims=True) if want.ndim > 1 else np.abs(want).max()
            assert np.all(np.abs(values - want) <= tol * scale + 1e-6), (name, np.abs(values - want).max())
    assert seen == set(got)


def test_moe_llama_cpp_semantics_give_our_logits(moe_exported):
    model, files = moe_exported
    ids = [5, 17, 42, 7, 100, 3, 250, 64, 11, 99, 12]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    theirs = gguf_forward(files["f16"], ids)
    assert np.abs(theirs - ours).max() < 0.02 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("moe, why", [
    (dict(first_dense_layers=1), r"model.moe.first_dense_layers=1: llama.cpp's qwen3moe graph makes every layer"),
    (dict(norm_topk_prob=False), r"model.moe.norm_topk_prob=false"),
    (dict(shared_experts=1), r"model.moe.shared_experts=1"),
    (dict(router="sigmoid"), r"model.moe.router=sigmoid"),
])
def test_moe_gguf_refuses_what_qwen3moe_cannot_run(tmp_path, moe, why):
    ckpt, _, _ = make_checkpoint(tmp_path, qk_norm=True, moe=MoEConfig(experts=4, **moe))
    with pytest.raises(LmforgeError, match=why):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
