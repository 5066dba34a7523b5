"""Multi-head latent attention (model/mla.py): against a plain reference, its latent cache, its config keys."""

from __future__ import annotations

import json
import math

import pytest
import torch
from infer_helpers import one_thread  # noqa: F401 (fixture)
from spine import TINY, assert_resume_exact, copy_run, lmforge, lmforge_batch, losses, prepared_run
from transformers import AutoModelForCausalLM, DeepseekV3Config

from lmforge.checkpoint import latest_checkpoint, load_model, save_checkpoint
from lmforge.config import ConfigError, ModelConfig, load_config
from lmforge.errors import LmforgeError
from lmforge.export.gguf import gguf_arch
from lmforge.export.hf import export_hf
from lmforge.export.hf_import import import_hf
from lmforge.infer.engine import generate_ids
from lmforge.infer.quant import quantize_model
from lmforge.infer.sampling import SamplingParams
from lmforge.model.mla import LatentCache, kv_cache_bytes_per_token, mla_dims
from lmforge.model.presets import model_config
from lmforge.model.transformer import Transformer
from lmforge.train.parallelize import Layout, parallelize_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

MLA = dict(attention="mla", vocab_size=128, n_layer=2, n_embd=64, n_head=4, max_seq_len=64, kv_lora_rank=24,
           qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=20)


def mla_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**MLA, **kw}))
    with torch.no_grad():  # non-trivial norm gains, so a misplaced latent norm is caught
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.normal_(0, 0.1)
    return model.eval()


def rope_ref(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE written out: pairs (i, i + D/2) turned by pos * theta^(-2i/D)."""
    D = x.shape[-1]
    freq = theta ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2 / D)
    ang = pos[:, None].double() * freq[None]
    cos, sin = ang.cos().float(), ang.sin().float()
    a, b = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def attention_ref(attn, x: torch.Tensor, theta: float) -> torch.Tensor:
    """DeepSeek-V2's equations, one head at a time, with an explicit causal softmax."""
    d = attn.dims
    B, T, _ = x.shape
    if d.q_lora:
        q = rms(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight, 1e-6) @ attn.q_b_proj.weight.T
    else:
        q = x @ attn.q_proj.weight.T
    kv = x @ attn.kv_a_proj_with_mqa.weight.T
    c, k_r = rms(kv[..., :d.kv_lora], attn.kv_a_layernorm.weight, 1e-6), kv[..., d.kv_lora:]
    pos = torch.arange(T)
    k_r = rope_ref(k_r, pos, theta)
    heads = []
    for h in range(attn.n_head):
        qh = q[..., h * d.qk:(h + 1) * d.qk]
        q_nope, q_rope = qh[..., :d.nope], rope_ref(qh[..., d.nope:], pos, theta)
        wk = attn.kv_b_proj.weight[h * (d.nope + d.v):h * (d.nope + d.v) + d.nope]
        wv = attn.kv_b_proj.weight[h * (d.nope + d.v) + d.nope:(h + 1) * (d.nope + d.v)]
        scores = (q_nope @ (c @ wk.T).transpose(1, 2) + q_rope @ k_r.transpose(1, 2)) / math.sqrt(d.qk)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        heads.append(scores.softmax(-1) @ (c @ wv.T))
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("q_lora", [0, 16])
def test_attention_equals_the_reference(q_lora):
    model = mla_model(q_lora_rank=q_lora)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 11, 64)
    rope = (model.rope_cos[:11], torch.cat([-model.rope_sin[:11, :4], model.rope_sin[:11, 4:]], -1))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope, None, None), attention_ref(attn, x, 10000.0), atol=1e-5, rtol=1e-4)
    names = set(model.state_dict())
    want = {"q_a_proj", "q_a_layernorm", "q_b_proj"} if q_lora else {"q_proj"}
    for n in want | {"kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"}:
        assert f"model.layers.1.self_attn.{n}.weight" in names


def test_latent_cache_equals_full_recompute_and_holds_only_latents():
    model = mla_model(q_lora_rank=16)
    x = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 32)
        parts = [model(x[:, :9], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(9, 20)]
    assert isinstance(cache, LatentCache)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    # per layer and position: the 24-wide latent and the 8-wide RoPE key, nothing per head
    assert cache.nbytes() == 2 * 3 * 32 * (24 + 8) * 4
    assert kv_cache_bytes_per_token(model.cfg, 4) == 2 * (24 + 8) * 4


def test_cached_greedy_equals_uncached_greedy_in_a_padded_batch():
    model = mla_model(seed=3)
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [3]]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, top_k=0, top_p=1.0)
    wants = []
    for prompt, got in zip(prompts, generate_ids(model, prompts, params)):
        ids, want = list(prompt), []
        for _ in range(10):  # no cache: the whole sequence again at every step
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            want.append(nxt)
        assert got == want
        wants.append(want)
    # a row that stops early leaves the cache (LatentCache.select); the others go on unchanged
    stop = wants[0][2]
    stopped = generate_ids(model, prompts, params, stop_ids={stop})
    for want, got in zip(wants, stopped):
        assert got == (want[:want.index(stop) + 1] if stop in want else want)
    assert len({len(g) for g in stopped}) > 1  # rows did finish at different steps


def test_cache_bytes_against_gqa_of_a_similar_budget():
    mla, gqa = model_config("mla-small"), model_config("small", n_kv_head=4)
    with torch.device("meta"):
        n_mla, n_gqa = (Transformer(ModelConfig(**{**vars(c), "vocab_size": 50304})).num_params() for c in (mla, gqa))
    assert abs(n_mla - n_gqa) / n_gqa < 0.1  # within 10% in parameters
    # bf16, all 12 layers: (256 + 32) x 2 B = 576 B a layer, against 2 x 4 heads x 64 x 2 B = 1024 B
    assert kv_cache_bytes_per_token(mla) == 12 * 576
    assert kv_cache_bytes_per_token(gqa) == 12 * 1024


def test_checkpoint_keeps_the_mla_keys(tmp_path):
    model = mla_model(q_lora_rank=16)
    loaded = load_model(save_checkpoint(tmp_path / "ckpt", model))
    assert mla_dims(loaded.cfg) == mla_dims(model.cfg) and loaded.cfg.attention == "mla"
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_mla_keys_derive_from_the_head_width():
    cfg = load_config(overrides=["model.attention=mla", "model.n_embd=256", "model.n_head=4"]).model
    d = mla_dims(cfg)
    assert (d.kv_lora, d.q_lora, d.nope, d.rope, d.v) == (256, 0, 64, 32, 64)


@pytest.mark.parametrize("overrides, key", [
    (["model.attention=mla", "model.qk_rope_head_dim=7"], "model.qk_rope_head_dim"),
    (["model.attention=mla", "model.n_embd=24", "model.n_head=4"], "model.qk_rope_head_dim"),  # 24/4/2 = 3
    (["model.attention=mla", "model.kv_lora_rank=-1"], "model.kv_lora_rank"),
    (["model.attention=mla", "model.n_embd=100", "model.n_head=3"], "model.kv_lora_rank"),  # nothing to derive from
    (["model.attention=mla", "model.n_kv_head=2"], "model.n_kv_head"),
    (["model.attention=mla", "model.head_dim=32"], "model.head_dim"),
    (["model.attention=mla", "model.qk_norm=true"], "model.qk_norm"),
    (["model.attention=mla", "model.arch=gpt2"], "model.pos"),
    (["model.kv_lora_rank=64"], "model.kv_lora_rank"),  # an MLA key without attention=mla
    (["model.attention=gqa"], "model.attention"),
])
def test_bad_mla_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides)


@pytest.mark.parametrize("key", ["tp", "cp"])
def test_tensor_and_context_parallel_are_refused(key):
    cfg = load_config()
    with pytest.raises(LmforgeError, match=rf"parallel\.{key}=2 with model\.attention=mla"):
        parallelize_decoder(mla_model(), Layout(**{key: 2}), cfg.parallel, cfg.train, torch.device("cpu"), None)


# --- Hugging Face: DeepseekV3ForCausalLM, every layer dense --------------------------------------------

def assert_same_as_hf(ours: Transformer, theirs) -> None:
    x = torch.randint(0, 128, (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=1e-4, rtol=1e-4)
    prompt = [5, 17, 42, 7, 100, 3]
    out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                          do_sample=False, max_new_tokens=8)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0)
    assert out[0, 6:].tolist() == generate_ids(ours, [prompt], params)[0]


@pytest.mark.parametrize("kw", [dict(q_lora_rank=16), dict(tie_embeddings=False, rope_theta=50000.0)])
def test_export_loads_as_deepseek_v3_with_equal_logits(tmp_path, kw):
    model = mla_model(**kw)
    out = export_hf(save_checkpoint(tmp_path / "ckpt", model), tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in theirs.model.layers)
    assert_same_as_hf(model, theirs)


def test_import_of_a_deepseek_v3_folder(tmp_path):
    """A transformers-built DeepSeek-V3 (interleaved RoPE, as released) imports with its logits, and exports back."""
    hf_cfg = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24,
                              q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=20,
                              first_k_dense_replace=2, n_routed_experts=4, n_group=1, topk_group=1,
                              num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                              rope_interleave=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    theirs = AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.2) if p.dim() == 1 else p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "src")
    ours = load_model(import_hf(tmp_path / "src", tmp_path / "ckpt"))
    assert ours.cfg.attention == "mla" and mla_dims(ours.cfg).q_lora == 16 and ours.cfg.norm_eps == 1e-5
    assert_same_as_hf(ours, theirs)
    back = AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "ckpt", tmp_path / "hf")).eval()
    assert back.config.rope_interleave is False
    assert_same_as_hf(ours, back)

    config = json.loads((tmp_path / "src" / "config.json").read_text())
    for change, key in ((dict(first_k_dense_replace=1), "first_k_dense_replace"),
                        (dict(attention_bias=True), "attention_bias"),
                        (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling")):
        (tmp_path / "src" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(LmforgeError, match=key):
            import_hf(tmp_path / "src", tmp_path / "bad")


def test_export_refuses_what_deepseek_v3_cannot_represent(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt", mla_model(logit_softcap=30.0))
    with pytest.raises(LmforgeError, match=r"model\.logit_softcap"):
        export_hf(ckpt, tmp_path / "out")
    with pytest.raises(LmforgeError, match=r"model\.attention=mla"):
        gguf_arch(mla_model().cfg)


# --- training from the command line ----------------------------------------------------------------------

# mla-tiny as the CLI trains it; the train keys are the spine's (tests/spine.py TINY).
MLA_TINY = ["model.preset=mla-tiny", "model.max_seq_len=64", *[k for k in TINY if k.startswith("train.")]]
# The first 10 losses of the seeded run below. They change only if the model's numerics (or the spine's data,
# tokenizer or optimizer) change; then look why before pinning new ones.
GOLDEN = [6.216516971588135, 6.254363059997559, 6.212457656860352, 6.143241882324219, 5.9399309158325195,
          5.864523410797119, 5.594535827636719, 5.730737209320068, 5.566287040710449, 5.475794792175293]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return prepared_run(tmp_path_factory.mktemp("spine"))


def test_pretrain_mla_tiny_loss_falls_and_matches_golden(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "r")
    r = lmforge("pretrain", f"run_dir={run}", *MLA_TINY, "train.max_steps=60", "train.save_every=60")
    assert r.returncode == 0, r.stderr
    got = losses(run)
    first, last = got[1], sum(got[s] for s in range(51, 61)) / 10
    assert first > math.log(512) - 0.5 and last < first - 0.8, (first, last)  # an MHA twin: 6.21 -> 5.22
    assert [got[s] for s in range(1, 11)] == pytest.approx(GOLDEN, abs=1e-4), [got[s] for s in range(1, 11)]
    model = load_model(latest_checkpoint(run / "checkpoints"))
    assert model.cfg.attention == "mla" and "self_attn.kv_b_proj" in str(dict(model.named_modules()).keys())


def test_kill_and_resume_is_bit_exact(base_run, tmp_path):
    assert_resume_exact(base_run, tmp_path, [*MLA_TINY, "train.max_steps=16", "train.save_every=8"], 11, 16)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_mla_decodes_as_it_recomputes(mode):
    """The absorbed decode reads kv_b_proj's matrix; a quantized kv_b_proj must give the same as recomputing."""
    model = quantize_model(mla_model(seed=2, kv_lora_rank=32), mode)
    assert type(model.model.layers[0].self_attn.kv_b_proj).__name__ != "Linear"
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 12)
        parts = [model(x[:, :5], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_model_info_shows_the_latent_cache(capsys):
    from lmforge.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["model", "info", "mla-small"])
    assert e.value.code == 0
    assert "KV cache / token         6.8 KiB" in capsys.readouterr().out  # "small": 36.0 KiB
    with pytest.raises(SystemExit):  # the planner offers no tensor-parallel layout for MLA
        cli_main(["model", "info", "mla-small", "--gpus", "8", "--gpu-mem", "16GB"])
    assert "TP 2" not in capsys.readouterr().out


def test_fsdp_and_pipeline_match_one_process(base_run, tmp_path):
    """MLA's blocks under FSDP2 and in pipeline stages, on 2 gloo processes, follow the one-process run."""
    common = [*MLA_TINY, "train.max_steps=8", "train.save_every=8", "train.micro_batch=2", "train.batch_tokens=256",
              "model.tie_embeddings=false"]
    jobs = {"fsdp": ["parallel.dp_shard=2"], "pp": ["parallel.pp=2"]}
    runs = {n: copy_run(base_run, tmp_path / n) for n in ("single", *jobs)}
    r = lmforge("pretrain", f"run_dir={runs['single']}", *common)
    assert r.returncode == 0, r.stderr
    done = lmforge_batch({n: ["pretrain", f"run_dir={runs[n]}", *common, *extra] for n, extra in jobs.items()},
                         torchrun=2)
    want = losses(runs["single"])
    for name in jobs:
        assert done[name][0] == 0, done[name][1][-3000:]
        got = losses(runs[name])
        assert got.keys() == want.keys() and list(got.values()) == pytest.approx(list(want.values()), rel=1e-5)


def test_lora_default_targets_the_latent_projections_and_decodes(tmp_path):
    from lmforge.config import LoRAConfig
    from lmforge.train.lora import apply_lora

    wrapped = apply_lora(mla_model(q_lora_rank=16), LoRAConfig(enabled=True, r=4), tmp_path)
    names = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert names == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"}
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # adapters that change the function, so the absorbed decode must read them
    base = wrapped.eval().get_base_model()
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        full = base(x)
        cache = base.new_cache(2, 10)
        parts = [base(x[:, :4], cache=cache)] + [base(x[:, i:i + 1], cache=cache) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
