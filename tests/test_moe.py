"""Mixture of experts (model/moe.py): routing paths agree, transformers' Qwen3-MoE computes the same logits,
training from the CLI falls and resumes bit for bit, and aux-free balancing evens out the load."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from infer_helpers import make_checkpoint, one_thread  # noqa: F401 (fixture)
from spine import TINY, assert_resume_exact, copy_run, prepared_run
from test_pretrain import metrics

from lmforge.checkpoint import load_model, read_model_config
from lmforge.config import ConfigError, ModelConfig, MoEConfig, load_config
from lmforge.errors import LmforgeError
from lmforge.export.hf import export_hf
from lmforge.export.hf_import import import_hf
from lmforge.model.moe import MoE, load_metrics, moe_layers, update_after_step
from lmforge.model.transformer import Transformer
from lmforge.train.muon import build_muon

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = ["model.qk_norm=true", "model.moe.experts=8", "model.moe.top_k=2"]
IDS = torch.tensor([[5, 17, 42, 7, 100, 3, 250, 64, 11]])


def tiny(seed: int = 0, **moe) -> Transformer:
    cfg = ModelConfig(vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, qk_norm=True, max_seq_len=64,
                      moe=MoEConfig(**{"experts": 8, "top_k": 2, **moe}))
    torch.manual_seed(seed)
    return Transformer(cfg)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return prepared_run(tmp_path_factory.mktemp("moe"))


def test_grouped_matmul_equals_the_loop_over_experts():
    model = tiny(shared_experts=1, first_dense_layers=1).train()
    x = torch.randint(0, 256, (2, 16))
    grads = []
    for grouped in (None, False):
        for m in moe_layers(model):
            m.experts.grouped = grouped
        model.zero_grad()
        loss = model(x, labels=x)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = grads
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-5, rtol=1e-4, msg=n)
    assert isinstance(model.model.layers[1].mlp, MoE) and not isinstance(model.model.layers[0].mlp, MoE)


def test_router_losses_reach_the_loss_as_a_per_token_mean():
    model = tiny(aux_coef=0.5, z_loss=0.1).train()
    x = torch.randint(0, 256, (2, 16))
    with_router = model(x, labels=x)
    model.eval()
    plain = model(x, labels=x)  # evaluation leaves the router losses out
    extra = (with_router - plain).item() / x.numel()
    # aux >= top_k (its value when balanced) times the coefficient, averaged over layers; plus the z-loss
    assert 0.5 * 2 <= extra < 0.5 * 8 + 1


def test_sigmoid_router_bias_chooses_but_never_weighs():
    model = tiny(router="sigmoid", balance="aux_free")
    moe = model.model.layers[0].mlp
    h = torch.randn(32, 64)
    _, idx, w = moe.route(h)
    torch.testing.assert_close(w.sum(-1), torch.ones(32))  # normalised over the chosen experts
    with torch.no_grad():
        moe.gate.e_score_correction_bias[3] = 10.0  # expert 3 now wins every token...
    logits, idx2, w2 = moe.route(h)
    assert (idx2 == 3).any(-1).all()
    scores = logits.float().sigmoid()
    torch.testing.assert_close(w2, scores.gather(1, idx2) / scores.gather(1, idx2).sum(-1, keepdim=True))  # ...unbiased


def test_bad_moe_settings_name_the_key():
    with pytest.raises(ConfigError, match="model.moe.top_k"):
        load_config(overrides=["model.moe.experts=4", "model.moe.top_k=5"])
    with pytest.raises(ConfigError, match="model.moe.first_dense_layers"):
        load_config(overrides=["model.moe.experts=4", "model.n_layer=2", "model.moe.first_dense_layers=2"])
    with pytest.raises(ConfigError, match="model.mlp"):
        load_config(overrides=["model.moe.experts=4", "model.mlp=gelu"])
    with pytest.raises(ConfigError, match="model.moe.router"):
        load_config(overrides=["model.moe.router=topk"])


@pytest.mark.parametrize("norm", [False, True])
def test_export_to_qwen3_moe_and_import_back(tmp_path, norm):
    from transformers import AutoModelForCausalLM

    ckpt, model, _ = make_checkpoint(tmp_path, qk_norm=True, tie_embeddings=False,
                                     moe=MoEConfig(experts=8, top_k=2, first_dense_layers=1, norm_topk_prob=norm))
    assert read_model_config(ckpt).moe == model.cfg.moe  # the nested section survives the checkpoint
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["mlp_only_layers"] == [0]
    hf = AutoModelForCausalLM.from_pretrained(export_hf(ckpt, tmp_path / "hf")).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS), atol=1e-4, rtol=1e-4)
    hf.save_pretrained(tmp_path / "hf2")  # as transformers writes it (num_local_experts, fused experts)
    back = load_model(import_hf(tmp_path / "hf2", tmp_path / "imported"))
    assert back.cfg.moe.experts == 8 and back.cfg.moe.first_dense_layers == 1
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), model(IDS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("moe, why", [(dict(shared_experts=1), "shared_experts"), (dict(router="sigmoid",
                         balance="aux_free"), "router=sigmoid"), (dict(balance="aux_free"), "aux_free")])
def test_export_refuses_what_qwen3_moe_cannot_hold(tmp_path, moe, why):
    ckpt, _, _ = make_checkpoint(tmp_path, qk_norm=True, moe=MoEConfig(experts=4, **moe))
    assert "model_type" not in json.loads((ckpt / "config.json").read_text())
    with pytest.raises(LmforgeError, match=why):
        export_hf(ckpt, tmp_path / "hf")


def test_muon_orthogonalises_each_expert():
    model = tiny()
    opt = build_muon(model, load_config().train)
    muon = next(g for g in opt.param_groups if g["kind"] == "muon")
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert any(p is experts for p in muon["params"])
    x = torch.randint(0, 256, (2, 16))
    model(x, labels=x).backward()
    before = experts.detach().clone()
    opt.step()
    step = (before - experts.detach()) / (muon["lr"] * (experts.shape[1] / experts.shape[2]) ** 0.5)
    for e in range(2):  # each expert's update is near-orthogonal on its own: its singular values near 1
        s = torch.linalg.svdvals(step[e])  # (an expert that saw few tokens has a low-rank gradient: zeros stay)
        s = s[s > 1e-3]
        assert len(s) and 0.5 < s.min() and s.max() < 1.5, s


def _byte_stream() -> torch.Tensor:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes()
    return torch.tensor(list(text[:40000]), dtype=torch.long)


def _imbalance_after(balance: str, steps: int = 80) -> tuple[float, float]:
    """max/mean tokens per expert (worst layer) over the first and the last 10 steps of a small run."""
    model = tiny(seed=1, balance=balance, bias_update_rate=0.01).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data, g = _byte_stream(), torch.Generator().manual_seed(0)
    first = last = 0.0
    for step in range(steps):
        starts = torch.randint(0, data.numel() - 33, (8,), generator=g)
        batch = torch.stack([data[s:s + 33] for s in starts])
        model(batch[:, :-1], labels=batch[:, 1:]).div(batch[:, 1:].numel()).backward()
        opt.step()
        opt.zero_grad()
        load = update_after_step(model)
        if step < 10:
            first = first + load
        elif step >= steps - 10:
            last = last + load
    worst = lambda t: load_metrics([0, 1], t)["moe_imbalance_max"]  # noqa: E731
    return worst(first), worst(last)


def test_aux_free_bias_evens_the_load():
    _, unbalanced = _imbalance_after("none")
    first, balanced = _imbalance_after("aux_free")
    print(f"max/mean load over the last 10 of 80 steps: none {unbalanced:.2f}, aux_free {balanced:.2f} "
          f"(first 10 steps {first:.2f})")
    assert balanced < unbalanced and balanced < first


# The first 10 losses of a seeded 2-layer, 8-expert top-2 model on the spine corpus (fp32, CPU).
GOLDEN = [6.226090908050537, 6.260886192321777, 6.284327983856201, 6.248190402984619, 6.208581924438477,
          6.177244186401367, 6.07357931137085, 6.073042392730713, 5.94656229019165, 5.846667289733887]


def test_cli_training_falls_logs_load_and_resumes_bit_exact(base_run, tmp_path):
    common = [*TINY, *MOE, "model.moe.balance=aux_free", "model.moe.bias_update_rate=0.01", "model.moe.z_loss=1e-3",
              "train.max_steps=24", "train.save_every=8"]
    straight, killed = assert_resume_exact(base_run, tmp_path, common, 13, 24)
    rows = [m for m in metrics(straight) if "loss" in m]
    losses = [m["loss"] for m in rows]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5, losses
    assert losses[:10] == pytest.approx(GOLDEN, abs=1e-4)
    assert "moe_imbalance_max" in rows[-1] and len(rows[-1]["moe_tokens_per_expert"]) == 2
    assert sum(rows[-1]["moe_tokens_per_expert"][0]) == 4 * 32 * 2  # every token in two experts, one step a row
    bias = load_model(killed / "checkpoints" / "step_000024").state_dict()
    assert bias["model.layers.0.mlp.gate.e_score_correction_bias"].abs().sum() > 0  # it moved, and was saved


def test_gguf_and_model_parallel_refuse_what_they_cannot_hold(tmp_path):
    from lmforge.export.gguf import export_gguf
    from lmforge.train.parallelize import parallelize_decoder

    ckpt, model, _ = make_checkpoint(tmp_path, qk_norm=True, moe=MoEConfig(experts=4, first_dense_layers=1))
    with pytest.raises(LmforgeError, match="model.moe.first_dense_layers=1"):  # qwen3moe: every layer sparse
        export_gguf(ckpt, tmp_path / "m.gguf")

    class Sizes:  # the layout fields parallelize_decoder reads before it refuses
        tp, pp, dp_world = 2, 1, 1

    with pytest.raises(LmforgeError, match="parallel.tp=2 with model.moe.experts=4"):
        parallelize_decoder(model, Sizes(), None, None, torch.device("cpu"), None)


def test_data_parallel_equals_one_process(base_run, tmp_path):
    """FSDP2, DDP and context parallel on 2 gloo processes follow the one-process run: the aux-free biases
    move from the load summed over ranks, and the router losses are weighted by tokens as accumulation weighs
    them."""
    from spine import lmforge_batch

    common = [*TINY, *MOE, "model.moe.balance=aux_free", "model.moe.bias_update_rate=0.01", "model.moe.z_loss=1e-2",
              "model.moe.shared_experts=1", "train.max_steps=8", "train.save_every=8", "train.micro_batch=2",
              "train.batch_tokens=256", "train.sample_every=0"]
    runs = {n: copy_run(base_run, tmp_path / n) for n in ("one", "fsdp", "ddp", "cp")}
    jobs = lambda names, extra: {n: ["pretrain", f"run_dir={runs[n]}", *common, *extra.get(n, [])]  # noqa: E731
                                 for n in names}
    for rc, err in lmforge_batch(jobs(["one"], {})).values():
        assert rc == 0, err[-3000:]
    two = {"ddp": ["parallel.dp_replicate=2"], "cp": ["parallel.cp=2"]}
    for rc, err in lmforge_batch(jobs(["fsdp", "ddp", "cp"], two), torchrun=2).values():
        assert rc == 0, err[-3000:]
    ref = {m["step"]: m["loss"] for m in metrics(runs["one"]) if "loss" in m}
    final = lambda n: load_model(runs[n] / "checkpoints" / "step_000008").state_dict()  # noqa: E731
    for n in ("fsdp", "ddp", "cp"):
        got = {m["step"]: m["loss"] for m in metrics(runs[n]) if "loss" in m}
        assert list(got.values()) == pytest.approx(list(ref.values()), rel=1e-5), n
        for k, v in final("one").items():
            torch.testing.assert_close(final(n)[k], v, atol=1e-5, rtol=1e-4, msg=f"{n}: {k}")


def test_model_info_shows_total_and_active_parameters(capsys):
    from lmforge.cli import _run

    assert _run("model", ["info", "moe-small"]) == 0
    out = capsys.readouterr().out
    assert "parameters             549.7 M" in out and "active parameters      153.4 M" in out
    dense = Transformer(load_config(overrides=["model.preset=moe-tiny", "model.vocab_size=256"]).model)
    per_expert = 3 * 64 * 96  # gate, up and down of one 96-wide expert
    assert dense.num_params() - dense.num_params(active=True) == 2 * (8 - 2) * per_expert


def test_lora_default_adapts_what_is_linear_and_names_the_experts_it_leaves(tmp_path, capsys):
    """The default targets name the MLP projections, which an MoE layer holds as stacked 3-D experts: the
    default adapts attention and the dense first layer, and says so; named explicitly, experts are refused."""
    from lmforge.config import LoRAConfig
    from lmforge.train.lora import apply_lora

    wrapped = apply_lora(tiny(experts=4, top_k=2, first_dense_layers=1), LoRAConfig(enabled=True, r=4), tmp_path)
    adapted = {n.split(".lora_A")[0] for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert any(".layers.0.mlp.gate_proj" in n for n in adapted)  # the dense layer's MLP
    assert not any(".layers.1.mlp." in n for n in adapted) and any(".layers.1.self_attn.q_proj" in n for n in adapted)
    assert "mixture-of-experts MLPs hold their experts as stacked weights" not in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="gate_proj"):
        apply_lora(tiny(experts=4, top_k=2), LoRAConfig(enabled=True, r=4, target_modules=["gate_proj"]), tmp_path)
    apply_lora(tiny(experts=4, top_k=2), LoRAConfig(enabled=True, r=4), tmp_path)
    assert "mixture-of-experts MLPs hold their experts as stacked weights" in capsys.readouterr().err
