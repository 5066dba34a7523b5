"""Sliding-window (local / global) attention: masks against brute force, the ring KV cache against full
recompute, the config's errors, training from the CLI, resume, and Hugging Face parity."""

from __future__ import annotations

import math

import pytest
import torch
from infer_helpers import one_thread  # noqa: F401 (fixture)
from spine import losses

from lmforge.config import ConfigError, ModelConfig, load_config
from lmforge.infer.engine import generate_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.model.transformer import Transformer
from lmforge.model.window import cache_bytes, layer_pattern, shortest_pattern

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_new_tokens=30, temperature=0.0, top_k=0, top_p=1.0)


def swa_model(window: int = 8, pattern: str = "SL", seed: int = 0, **overrides) -> Transformer:
    values = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=128, vocab_size=128, init_std=0.1,
                  sliding_window=window, window_pattern=pattern)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**values, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def reference_logits(model: Transformer, ids: torch.Tensor, positions: torch.Tensor,
                     doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The model's function with attention written out: softmax over the keys a loop allows."""
    B, T = ids.shape
    x = model.model.embed_tokens(ids)
    cos, sin = model.rope_cos[positions].unsqueeze(1), model.rope_sin[positions].unsqueeze(1)
    for layer in model.model.layers:
        a = layer.self_attn
        allowed = torch.zeros(B, T, T, dtype=torch.bool)
        cfg = model.cfg
        for b in range(B):
            for i in range(T):
                for j in range(T):
                    in_window = not a.window or j > i - a.window
                    same_doc = doc_ids is None or doc_ids[b, i] == doc_ids[b, j]
                    if a.kind == "B":  # block-sparse: blocks of the tokens' positions
                        qb, kb = int(positions[b, i]) // cfg.sparse_block, int(positions[b, j]) // cfg.sparse_block
                        in_window = qb - kb <= cfg.sparse_local or kb < cfg.sparse_global or \
                            bool(cfg.sparse_stride) and kb % cfg.sparse_stride == cfg.sparse_stride - 1
                    allowed[b, i, j] = j <= i and in_window and same_doc
        h = layer.input_layernorm(x)
        q, k, v = (p(h).view(B, T, -1, a.head_dim).transpose(1, 2) for p in a.qkv)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(a.head_dim)
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + a.o_proj(y)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.logits(model.model.norm(x))


# --- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["model.sliding_window=-1"], "model.sliding_window"),
    (["model.sliding_window=8", "model.window_pattern=SSXL"], "model.window_pattern"),
    (["model.window_pattern=SL"], "model.window_pattern"),
    (["model.sliding_window=8", "model.window_pattern=L"], "model.window_pattern"),
])
def test_bad_window_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert e.value.key == key and key in str(e.value)


def test_the_pattern_repeats_over_the_layers():
    m = load_config(overrides=["model.n_layer=6", "model.sliding_window=16", "model.window_pattern=SSL"]).model
    assert layer_pattern(m) == "SSLSSL"
    assert layer_pattern(load_config(overrides=["model.sliding_window=16"]).model) == "SSSS"  # default: all local
    assert layer_pattern(load_config().model) == "LLLL"
    assert shortest_pattern("SSSLSSSL") == "SSSL" and shortest_pattern("SSL") == "SSL"


# --- attention ---------------------------------------------------------------------------------------

def test_local_layers_match_brute_force_attention():
    model = swa_model(window=5)
    ids = torch.randint(0, 128, (2, 23))
    pos = torch.arange(23).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_logits(model, ids, pos), atol=1e-5, rtol=1e-5)
        # a window wider than the sequence is plain causal attention, bit for bit (the is_causal path)
        wide, dense = swa_model(window=64), swa_model(window=0, pattern="")
        assert torch.equal(wide(ids), dense(ids))


def test_the_window_intersects_the_packed_document_mask():
    model = swa_model(window=4)
    doc_ids = torch.tensor([[0] * 9 + [1] * 3 + [2] * 11, [0] * 2 + [1] * 21])
    starts = torch.cat([torch.zeros(2, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)
    pos = torch.stack([torch.cat([torch.arange(n) for n in torch.unique_consecutive(row, return_counts=True)[1]])
                       for row in doc_ids])
    assert starts.sum() == 3
    ids = torch.randint(0, 128, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, positions=pos, doc_ids=doc_ids),
                                   reference_logits(model, ids, pos, doc_ids), atol=1e-5, rtol=1e-5)


# --- generation ----------------------------------------------------------------------------------------

def greedy_recompute(model: Transformer, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_cached_greedy_equals_full_recompute_past_the_window():
    model = swa_model(window=8)
    prompts = [[5, 17, 42, 7, 100], [3, 9, 11, 2, 77, 41, 8, 19, 23, 1, 6, 90, 4], [64, 12]]
    # one by one: a short prompt decodes across the window's edge; a long one is prefilled past it
    for p in prompts:
        assert generate_ids(model, [p], GREEDY)[0] == greedy_recompute(model, p, 30)
    # batched with left padding: the ring's masks keep each row's padding out
    assert generate_ids(model, prompts, GREEDY) == [greedy_recompute(model, p, 30) for p in prompts]
    # a row that finishes early is dropped from the rings too; the others go on as alone
    want = [greedy_recompute(model, p, 30) for p in prompts]
    counts = [0, 0, 0]

    def stop_row_1_at_5(row: int, _token: int) -> bool:
        counts[row] += 1
        return row == 1 and counts[row] == 5

    assert generate_ids(model, prompts, GREEDY, on_token=stop_row_1_at_5) == [want[0], want[1][:5], want[2]]


def test_a_chunk_past_the_window_sees_the_ring_and_itself():
    model = swa_model(window=8)
    x = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        cache = model.new_cache(2, 40)
        out = [model(x[:, :5], cache=cache), model(x[:, 5:12], cache=cache)]
        out += [model(x[:, t:t + 1], cache=cache) for t in range(12, 30)]
        out.append(model(x[:, 30:], cache=cache))
        torch.testing.assert_close(torch.cat(out, 1), model(x), atol=1e-5, rtol=1e-5)


def test_local_layers_cache_stops_growing_at_the_window():
    W, length = 16, 64  # 4x the window
    sizes = {}
    for name, window, pattern in (("dense", 0, ""), ("local", W, "S"), ("SL", W, "SL")):
        model = swa_model(window=window, pattern=pattern, max_seq_len=length)
        cache = model.new_cache(1, length)
        with torch.no_grad():
            model(torch.randint(0, 128, (1, 3)), cache=cache)
            for _ in range(length - 3):
                model(torch.randint(0, 128, (1, 1)), cache=cache)
        sizes[name] = cache_bytes(cache)
    per_position = 2 * 2 * 16 * 4  # k and v, 2 kv heads x 16 dims, fp32
    assert sizes == {"dense": 2 * length * per_position, "local": 2 * W * per_position,
                     "SL": (W + length) * per_position}
    assert model.new_cache(1, length).rings is not None
    assert swa_model(window=0, pattern="").new_cache(1, length).rings is None  # the dense cache is unchanged


# --- parallelism -----------------------------------------------------------------------------------------

def test_context_parallel_refuses_a_window():
    """The ring attention splits every sequence over ranks with causal blocks only; a band would be lost."""
    from lmforge.errors import LmforgeError
    from lmforge.train.parallelize import Layout, apply_cp

    model = swa_model()
    with pytest.raises(LmforgeError, match=r"parallel\.cp=2 with model\.sliding_window=8"):
        apply_cp(list(model.model.layers), Layout(cp=2), model.cfg, 32, torch.device("cpu"))


# --- Hugging Face ------------------------------------------------------------------------------------------

LONG = [[(7 * i + 3) % 300 for i in range(40)]]  # 5x the window


@pytest.mark.parametrize("overrides, model_type", [
    (dict(), "ministral"),
    (dict(qk_norm=True, window_pattern="LS"), "qwen3"),
    (dict(attn_qkv_bias=True, window_pattern="SL"), "qwen2"),
])
def test_export_matches_transformers_past_the_window(tmp_path, overrides, model_type):
    import json

    from infer_helpers import make_checkpoint
    from transformers import AutoModelForCausalLM

    from lmforge.checkpoint import load_model
    from lmforge.export.hf import export_hf
    from lmforge.export.hf_import import import_hf

    ckpt, model, tok = make_checkpoint(tmp_path, sliding_window=8, **overrides)
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and config["sliding_window"] == 8
    assert config["layer_types"] == ["sliding_attention" if k == "S" else "full_attention"
                                     for k in layer_pattern(model.cfg)]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor(LONG)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0, top_k=0, top_p=1.0)
    prompt = LONG[0][:12]
    theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 12, dtype=torch.long),
                         do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    assert theirs[0, 12:].tolist() == generate_ids(model, [prompt], greedy)[0]
    # and back: the exported folder imports as the same model
    back = load_model(import_hf(out, tmp_path / "back"))
    assert (back.cfg.sliding_window, layer_pattern(back.cfg)) == (8, layer_pattern(model.cfg))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-5)


def test_import_reads_qwen3_layer_types(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3Config

    from lmforge.checkpoint import load_model
    from lmforge.export.hf_import import import_hf

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=96, use_sliding_window=True,
                      sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "src")
    ours = load_model(import_hf(tmp_path / "src", tmp_path / "ckpt"))
    assert (ours.cfg.sliding_window, ours.cfg.window_pattern, ours.cfg.qk_norm) == (6, "SL", True)
    x = torch.tensor([[(5 * i + 1) % 128 for i in range(30)]])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_export_refuses_a_window_the_target_cannot_hold(tmp_path):
    from lmforge.checkpoint import hf_config, save_checkpoint
    from lmforge.errors import LmforgeError
    from lmforge.export.gguf import gguf_arch
    from lmforge.export.hf import export_hf

    model = swa_model(bias=True, vocab_size=320)
    assert "model_type" not in hf_config(model.cfg)  # the checkpoint's own config.json does not pretend
    with pytest.raises(LmforgeError, match=r"model\.sliding_window=8 with model\.bias=true"):
        export_hf(save_checkpoint(tmp_path / "ckpt", model), tmp_path / "out")
    with pytest.raises(LmforgeError, match=r"model\.sliding_window=8"):
        gguf_arch(swa_model().cfg)


# --- training from the CLI ----------------------------------------------------------------------------------

SWA = ["model.preset=swa-tiny", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2",
       "model.max_seq_len=64", "model.sliding_window=8", "model.window_pattern=SL"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from spine import prepared_run

    return prepared_run(tmp_path_factory.mktemp("swa"))


def test_model_info_shows_the_pattern_and_the_cache(capsys):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["model", "info", "swa-small"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "window 1024, pattern SSSL: SSSLSSSLSSSL (9 local, 3 global layers)" in out
    # per token at 4096: 3 global layers x 4096 + 9 local x 1024 positions, 2 x 4 kv heads x 64 dims x 2 bytes
    assert f"{(3 * 4096 + 9 * 1024) * 1024 / 4096 / 1024:.1f} KiB" in out


# The first ten losses of this seeded swa-tiny run (fp32 on a CPU); a change to the masks moves them.
GOLDEN = [6.253906, 6.254191, 6.231071, 6.206040, 6.088558, 5.986108, 5.909173, 5.805699, 5.761292, 5.730140]


SPARSE = ["model.preset=swa-tiny", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2",
          "model.max_seq_len=64", "model.sliding_window=0", "model.sparse_block=4", "model.sparse_local=1",
          "model.window_pattern=BL"]  # at train.seq_len=32: 8 blocks, a query sees at most 3 of them
# The first ten losses of this seeded block-sparse run (fp32 on a CPU), as GOLDEN above.
GOLDEN_SPARSE = [6.254311, 6.25463, 6.233286, 6.206196, 6.092539, 5.993951, 5.911874, 5.80986, 5.761186, 5.731615]

# (settings, golden losses, the overrides that make the same model dense)
LOCAL = {"swa": (SWA, GOLDEN, ["model.sliding_window=0", "model.window_pattern="]),
         "block-sparse": (SPARSE, GOLDEN_SPARSE, ["model.sparse_block=0", "model.window_pattern="])}


@pytest.mark.parametrize("kind", list(LOCAL))
def test_local_layers_train_from_the_cli(base_run, tmp_path, kind):
    from spine import TINY, copy_run, lmforge

    settings, golden, dense_overrides = LOCAL[kind]
    run = copy_run(base_run, tmp_path / kind)
    r = lmforge("pretrain", f"run_dir={run}", *TINY, *settings, "train.max_steps=80", "train.micro_batch=8",
                "train.save_every=80")
    assert r.returncode == 0, r.stderr
    got = losses(run)
    first = [got[s] for s in range(1, 11)]
    assert got[80] < got[1] - 1.0, got
    assert first == pytest.approx(golden, abs=1e-4)
    # the mask matters: the same weights with full attention give other losses from the first step
    dense = copy_run(base_run, tmp_path / "dense")
    r = lmforge("pretrain", f"run_dir={dense}", *TINY, *settings, *dense_overrides,
                "train.max_steps=10", "train.micro_batch=8", "train.save_every=10")
    assert r.returncode == 0, r.stderr
    other = losses(dense)
    assert all(abs(other[s] - got[s]) > 1e-4 for s in range(1, 11)), (other, got)


@pytest.mark.parametrize("kind", list(LOCAL))
def test_local_layers_resume_after_kill_bit_exact(base_run, tmp_path, kind):
    from spine import TINY, assert_resume_exact

    settings = LOCAL[kind][0]
    assert_resume_exact(base_run, tmp_path, [*TINY, *settings, "train.max_steps=16", "train.save_every=8"], 11, 16)


def test_a_pipeline_stage_applies_the_window():
    """Pipeline stages run the blocks themselves: their local layers get the band mask as the whole model's do."""
    from torch import nn

    from lmforge.train.pipeline import DecoderStage

    model = swa_model(window=5)
    x = torch.randint(0, 128, (2, 23))
    with torch.no_grad():
        want = model.hidden_states(x)
        model.model.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(model.model.layers)})
        first, last = DecoderStage(model, [0], True, False), DecoderStage(model, [1], False, True)
        torch.testing.assert_close(last(first(x)), want, atol=1e-6, rtol=1e-6)


# --- block-sparse layers, and FlexAttention for every mask ---------------------------------------------------

def sparse_model(pattern: str = "SBL", seed: int = 0, **overrides) -> Transformer:
    """One layer of each kind: a window of 6, block-sparse in blocks of 4 (1 local and 1 global block), global."""
    return swa_model(window=6, pattern=pattern, seed=seed, n_layer=3, sparse_block=4, sparse_local=1,
                     sparse_global=1, **overrides)


def test_the_block_sparse_pattern_by_hand():
    from lmforge.model import masks
    from lmforge.model.window import attention_span

    m = masks.dense(masks.block_sparse(2, 1, 1, 0), 1, 11, 11, "cpu")[0, 0]
    seen = {q: m[q].nonzero().flatten().tolist() for q in (5, 7, 9, 10)}
    # blocks of 2: query 9 is in block 4 and sees it, block 3 before it, and block 0 (global); 10 is alone in 5
    assert seen == {5: [0, 1, 2, 3, 4, 5], 7: [0, 1, 4, 5, 6, 7], 9: [0, 1, 6, 7, 8, 9], 10: [0, 1, 8, 9, 10]}
    strided = masks.dense(masks.block_sparse(2, 1, 1, 2), 1, 11, 11, "cpu")[0, 0]
    assert strided[9].nonzero().flatten().tolist() == [0, 1, 2, 3, 6, 7, 8, 9]  # block 1 is the last of its 2
    # FLOPs count exactly the pairs the pattern computes
    assert masks.sparse_visible(2, 1, 1, 0, 11) == int(m.sum())
    cfg = ModelConfig(n_layer=2, sparse_block=2, sparse_local=1, sparse_global=1, window_pattern="BL")
    assert attention_span(cfg, 11) == pytest.approx(int(m.sum()) / 11 + 11)


@pytest.mark.parametrize("overrides, key", [
    (["model.window_pattern=BL"], "model.window_pattern"),
    (["model.sliding_window=8", "model.sparse_block=4"], "model.window_pattern"),
    (["model.sparse_block=-1"], "model.sparse_block"),
    (["model.sparse_block=4", "model.window_pattern=L"], "model.window_pattern"),
    (["model.sparse_block=4", "model.attention=mla"], "model.sparse_block"),
])
def test_bad_block_sparse_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert e.value.key == key and key in str(e.value)


def test_block_sparse_layers_match_brute_force_attention():
    model = sparse_model()
    assert layer_pattern(model.cfg) == "SBL"
    ids = torch.randint(0, 128, (2, 23))
    pos = torch.arange(23).expand(2, -1)
    doc_ids = torch.tensor([[0] * 14 + [1] * 9, [0] * 2 + [1] * 21])
    packed = torch.stack([torch.cat([torch.arange(n) for n in torch.unique_consecutive(r, return_counts=True)[1]])
                          for r in doc_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_logits(model, ids, pos), atol=1e-5, rtol=1e-5)
        # packed documents: each restarts at position 0, so its blocks do too
        torch.testing.assert_close(model(ids, positions=packed, doc_ids=doc_ids),
                                   reference_logits(model, ids, packed, doc_ids), atol=1e-5, rtol=1e-5)
        # a sequence of no more blocks than the pattern spans is plain causal attention, bit for bit
        short = ids[:, :12]
        assert torch.equal(model(short), sparse_model(pattern="SLL")(short))


def test_block_sparse_cached_greedy_equals_full_recompute():
    model = sparse_model()
    prompts = [[5, 17, 42, 7, 100], [3, 9, 11, 2, 77, 41, 8, 19, 23, 1, 6, 90, 4], [64, 12]]
    want = [greedy_recompute(model, p, 30) for p in prompts]
    assert [generate_ids(model, [p], GREEDY)[0] for p in prompts] == want
    # left-padded: each row's blocks follow its own positions, not the cache's slots
    assert generate_ids(model, prompts, GREEDY) == want
    x = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        cache = model.new_cache(2, 40)
        out = [model(x[:, :5], cache=cache), model(x[:, 5:13], cache=cache)]
        out += [model(x[:, t:t + 1], cache=cache) for t in range(13, 30)]
        out.append(model(x[:, 30:], cache=cache))
        torch.testing.assert_close(torch.cat(out, 1), model(x), atol=1e-5, rtol=1e-5)


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention unfused (no compile: the same numbers in a second), with its calls counted."""
    from lmforge.model import masks

    monkeypatch.setattr(masks, "COMPILE", False)
    calls = []
    real = masks.flex

    def counted(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(masks, "flex", counted)
    return calls


@pytest.mark.parametrize("n_kv_head", [2, 4], ids=["gqa", "mha"])
def test_flex_attention_equals_sdpa_for_every_mask(eager_flex, n_kv_head):
    """Windows, block-sparse layers and packed documents: FlexAttention's block masks against SDPA's dense
    masks, built from the same mask functions (model/masks.py)."""
    sdpa = sparse_model(n_kv_head=n_kv_head, attn_impl="sdpa")
    flex = sparse_model(n_kv_head=n_kv_head, attn_impl="flex")
    ids = torch.randint(0, 128, (2, 37))
    doc_ids = torch.tensor([[0] * 20 + [1] * 17, [0] * 3 + [1] * 34])
    packed = torch.stack([torch.cat([torch.arange(n) for n in torch.unique_consecutive(r, return_counts=True)[1]])
                          for r in doc_ids])
    with torch.no_grad():
        torch.testing.assert_close(flex(ids), sdpa(ids), atol=1e-5, rtol=1e-5)
        assert len(eager_flex) == 2  # the S and B layers; the global layer keeps SDPA's causal path
        torch.testing.assert_close(flex(ids, positions=packed, doc_ids=doc_ids),
                                   sdpa(ids, positions=packed, doc_ids=doc_ids), atol=1e-5, rtol=1e-5)
        assert len(eager_flex) == 5  # documents: every layer is masked
        torch.testing.assert_close(flex(ids), reference_logits(flex, ids, torch.arange(37).expand(2, -1)),
                                   atol=1e-5, rtol=1e-5)


def test_flex_training_on_a_cpu_stays_on_sdpa_with_the_same_gradients(eager_flex):
    """PyTorch's FlexAttention has no CPU backward: with gradients the masked layers take SDPA."""
    sdpa, flex = sparse_model(attn_impl="sdpa").train(), sparse_model(attn_impl="flex").train()
    ids = torch.randint(0, 128, (2, 37))
    for m in (sdpa, flex):
        m(ids, labels=ids).backward()
    assert not eager_flex
    for a, b in zip(sdpa.parameters(), flex.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_compiled_flex_attention_on_a_cpu():
    """The compiled kernel itself (a C++ compile on a CPU, once): the same logits as SDPA."""
    from lmforge.model import masks

    if not masks._works("cpu", True):
        pytest.skip("FlexAttention does not compile here")
    sdpa, flex = sparse_model(attn_impl="sdpa"), sparse_model(attn_impl="flex")
    ids = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(flex(ids), sdpa(ids), atol=1e-5, rtol=1e-5)


def test_export_refuses_block_sparse_layers(tmp_path):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.errors import LmforgeError
    from lmforge.export.gguf import gguf_arch
    from lmforge.export.hf import export_hf

    model = sparse_model()
    with pytest.raises(LmforgeError, match=r"model\.sparse_block=4"):
        export_hf(save_checkpoint(tmp_path / "ckpt", model), tmp_path / "out")
    with pytest.raises(LmforgeError, match=r"model\.sparse_block=4"):
        gguf_arch(model.cfg)
