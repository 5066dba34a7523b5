"""The packed one-token decoding step (infer/decode.py) against the model's own forward."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import make_model, one_thread  # noqa: F401 (fixture)

from lmforge.config import MoEConfig
from lmforge.infer import decode
from lmforge.infer.engine import generate_samples, prefill_prompts
from lmforge.infer.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "gqa": dict(),
    "mha-qknorm": dict(n_kv_head=4, qk_norm=True),
    "mqa-bias-relu2": dict(n_kv_head=1, bias=True, mlp="relu2", tie_embeddings=False),
    "gelu-softcap": dict(mlp="gelu", logit_softcap=10.0, attn_qkv_bias=True),
}
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [3], [20 + i for i in range(15)]]


def is_packed(step) -> bool:
    return isinstance(getattr(step, "__self__", None), decode.DenseStep)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_step_equals_the_forward_on_a_padded_batch(variant):
    model = make_model(300, **variant)
    step = decode.decode_step(model)
    assert is_packed(step)
    with torch.inference_mode():
        ours, _, _, _ = prefill_prompts(model, PROMPTS, 24, False)
        theirs, _, _, _ = prefill_prompts(model, PROMPTS, 24, False)
        assert ours.has_padding
        ids = torch.tensor([[1], [2], [3], [4]])
        lens = torch.tensor([[len(p)] for p in PROMPTS])
        for t in range(5):  # several steps, so a wrong cache write shows in the next step's logits
            a = step(ids, lens + t, ours)
            b = model(ids, positions=lens + t, cache=theirs)[:, -1]
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            ids = b.argmax(-1, keepdim=True)
        assert ours.length == theirs.length
        for layer in range(model.cfg.n_layer):
            torch.testing.assert_close(ours.k[layer], theirs.k[layer], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours.v[layer], theirs.v[layer], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_short_prompt_prefill_equals_the_forward(variant, monkeypatch):
    """prefill_prompts takes the packed step for short prompts: its cache, last logits and scored prompt
    logits (at the real, not the padding, positions) equal the forward's."""
    model = make_model(300, **variant)
    runs = {}
    for fast in ("1", "0"):
        monkeypatch.setenv("LMFORGE_FAST_DECODE", fast)
        with torch.inference_mode():
            runs[fast] = prefill_prompts(model, PROMPTS, 24, False, score_prompt=True)
    (ours, last, scored, _), (theirs, last_f, scored_f, _) = runs["1"], runs["0"]
    torch.testing.assert_close(last, last_f, rtol=1e-5, atol=1e-5)
    L = max(len(p) for p in PROMPTS)
    for b, p in enumerate(PROMPTS):
        torch.testing.assert_close(scored[b, L - len(p):], scored_f[b, L - len(p):], rtol=1e-5, atol=1e-5)
    assert ours.length == theirs.length == L
    for layer in range(model.cfg.n_layer):
        torch.testing.assert_close(ours.k[layer][:, :, :L], theirs.k[layer][:, :, :L], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.v[layer][:, :, :L], theirs.v[layer][:, :, :L], rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("LMFORGE_FAST_DECODE", "1")
    with torch.inference_mode():  # a one-token prompt has nothing else to score
        _, _, none_scored, _ = prefill_prompts(model, [[3], [4]], 4, False, score_prompt=True)
    assert none_scored.shape == (2, 0, model.cfg.vocab_size)


def test_generation_is_the_same_with_and_without_the_packed_step(monkeypatch):
    model = make_model(300)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, top_k=0, top_p=1.0)
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=3)
    first = generate_samples(model, PROMPTS, sampled, repeats=2)
    stop = max(set(t for s in first for t in s.tokens[1:-1]), key=lambda t: sum(s.tokens.count(t) for s in first))
    runs = {}
    for fast in ("1", "0"):
        monkeypatch.setenv("LMFORGE_FAST_DECODE", fast)
        assert is_packed(decode.decode_step(model)) == (fast == "1")
        runs[fast] = [[s.tokens for s in generate_samples(model, PROMPTS, p, stop_ids={stop}, repeats=2)]
                      for p in (greedy, sampled)]
    assert runs["1"] == runs["0"]
    assert any(len(t) < 16 for t in runs["1"][1])  # a stop id ended some rows early


def test_other_models_take_the_forward():
    from lmforge.infer.quant import quantize_model

    for variant in (dict(moe=MoEConfig(experts=4, top_k=2)), dict(sliding_window=4), dict(attention="mla")):
        assert not decode.eligible(make_model(300, **variant)), variant
    quantized = make_model(300)
    quantize_model(quantized, "int8")
    assert not decode.eligible(quantized)
    assert not decode.eligible(make_model(300).train())


def test_the_pack_is_reused_until_a_weight_changes():
    model = make_model(300)
    first = decode.decode_step(model)
    assert decode.decode_step(model).__self__ is first.__self__
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2.0)  # as an optimizer step would, in place
    second = decode.decode_step(model)
    assert second.__self__ is not first.__self__
    assert_step_follows_the_weights(model, second)


def assert_step_follows_the_weights(model, step) -> None:
    """One decoding step after a 2-prompt prefill gives the forward's logits on the model's current weights."""
    with torch.inference_mode():
        ours, _, _, _ = prefill_prompts(model, PROMPTS[:2], 12, False)
        theirs, _, _, _ = prefill_prompts(model, PROMPTS[:2], 12, False)
        ids, pos = torch.tensor([[1], [2]]), torch.tensor([[3], [9]])
        torch.testing.assert_close(step(ids, pos, ours), model(ids, positions=pos, cache=theirs)[:, -1],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "foreach-adamw"])
def test_an_optimizer_step_drops_the_pack(fused):
    """Fused AdamW updates weights without bumping their version counter; the step must still see them."""
    model = make_model(300)
    first = decode.decode_step(model).__self__
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=None if fused else True)
    model.train()
    model(torch.tensor([PROMPTS[1]]), labels=torch.tensor([PROMPTS[1]])).backward()
    opt.step()
    model.eval()
    step = decode.decode_step(model)
    assert step.__self__ is not first
    assert_step_follows_the_weights(model, step)


def test_no_pack_when_the_copy_does_not_fit(monkeypatch):
    monkeypatch.setattr(decode, "_free_bytes", lambda device: 1000)
    assert not is_packed(decode.decode_step(make_model(300)))


def test_a_packed_model_can_still_be_freed():
    import gc
    import weakref

    model = make_model(300)
    decode.decode_step(model)
    assert model in decode._PACKS
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the pack holds tensors, not the model, so the weak key lets it go


def test_packing_and_timing_leave_the_global_rng_alone():
    """A training run's mid-run sample must not change the run: the step draws from no global generator."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model = make_model(300)  # seeds itself; reseed after building
    torch.manual_seed(123)
    generate_samples(model, PROMPTS, SamplingParams(max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0))
    assert torch.equal(torch.rand(3), expected)
