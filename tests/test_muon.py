"""Muon: the orthogonalisation, the parameter split, the schedule hook, and bit-exact resume."""

from __future__ import annotations

import io

import torch

from lmforge.config import TrainConfig
from lmforge.model.loss import cross_entropy_sum
from lmforge.model.presets import model_config
from lmforge.model.transformer import Transformer
from lmforge.train.muon import Muon, orthogonalize
from lmforge.train.optim import build_optimizer, lr_factor, set_lr

CFG = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02, warmup_steps=2, max_steps=6)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config("tiny", n_layer=2, n_embd=32, n_head=4, vocab_size=64, max_seq_len=16))


def _train(model: Transformer, opt: torch.optim.Optimizer, steps: range, fixed: bool = False) -> list[float]:
    losses = []
    for step in steps:
        set_lr(opt, lr_factor(step, CFG.max_steps, CFG))
        g = torch.Generator().manual_seed(0 if fixed else step)
        x = torch.randint(0, 64, (4, 16), generator=g)
        loss = cross_entropy_sum(model, model(x, return_hidden=True), x.roll(-1, 1)) / x.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CFG.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_newton_schulz_pushes_singular_values_near_one():
    for shape in [(3, 48, 16), (16, 40)]:  # batched and tall; wide goes through the same transpose
        s = torch.linalg.svdvals(orthogonalize(torch.randn(*shape)))
        assert s.min() > 0.6 and s.max() < 1.3


def test_matrices_of_the_blocks_go_to_muon_the_rest_to_adamw():
    model = _model()
    opt = build_optimizer(model, CFG)
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    kinds = {names[id(p)]: g["kind"] for g in opt.param_groups for p in g["params"]}
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "muon"
    assert kinds["model.layers.1.mlp.down_proj.weight"] == "muon"
    assert kinds["model.embed_tokens.weight"] == "adamw"  # the tied head too
    assert kinds["model.layers.0.input_layernorm.weight"] == "adamw"
    assert len(kinds) == len(names)
    set_lr(opt, 0.5)  # the loop's schedule scales each group's own peak rate
    assert {g["kind"]: g["lr"] for g in opt.param_groups} == {"muon": 0.01, "adamw": 1.5e-3}


def test_muon_fits_a_batch():
    model = _model()
    losses = _train(model, build_optimizer(model, CFG), range(6), fixed=True)
    assert losses[-1] < losses[0] - 0.3


def test_state_dict_round_trip_resumes_bit_for_bit():
    straight = _model()
    reference = _train(straight, build_optimizer(straight, CFG), range(6))

    first = _model()
    opt = build_optimizer(first, CFG)
    _train(first, opt, range(3))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = _model()
    resumed.load_state_dict(first.state_dict())
    opt2 = build_optimizer(resumed, CFG)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert _train(resumed, opt2, range(3, 6)) == reference[3:]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
