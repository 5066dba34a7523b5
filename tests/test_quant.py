"""Weight-only INT8 / INT4: layer exactness, logits close to fp32, perplexity barely moves."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from infer_helpers import make_model, one_thread  # noqa: F401 (fixture)

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.infer.engine import generate_ids
from lmforge.infer.quant import Int4Linear, Int8Linear, quantize_model, weight_bytes
from lmforge.infer.sampling import SamplingParams
from lmforge.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cls, bound", [(Int8Linear, 0.5 / 127), (Int4Linear, 0.5 / 15)])
def test_layers_compute_with_their_dequantized_weight(cls, bound):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True)
    q = cls(lin)
    w = lin.weight.detach()
    if cls is Int8Linear:
        err_bound = w.abs().amax(1, keepdim=True) * bound
    else:  # per group of 32 columns: half a step of (max - min) / 15
        g = w.reshape(40, 3, 32)
        err_bound = ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) * bound).expand(-1, -1, 32).reshape(40, 96)
    assert torch.all((q.dequantize() - w).abs() <= err_bound * 1.01 + 1e-7)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize(), lin.bias), atol=1e-5, rtol=1e-5)


def test_quantize_model_replaces_block_linears_and_saves_memory():
    model = make_model(300)
    before = weight_bytes(model)
    linear_bytes = sum(m.weight.numel() * 4 for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    quantize_model(model, "int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    assert isinstance(model.lm_head, torch.nn.Linear)  # head (tied to the embedding) stays full precision
    assert before - weight_bytes(model) >= 0.7 * linear_bytes  # int8: ~1/4 of fp32, plus one scale per row
    with pytest.raises(LmforgeError, match="int8, int4"):
        quantize_model(make_model(300), "int3")


@pytest.mark.parametrize("mode, max_rel, agree", [("int8", 0.03, 0.95), ("int4", 0.35, 0.5)])
def test_quantized_logits_stay_close(mode, max_rel, agree):
    """Relative RMS error of the logits of a random-weight model (the harshest case: no structure)."""
    ref = make_model(300)
    q = quantize_model(make_model(300), mode)
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(x), q(x)
    rel = (a - b).norm() / a.norm()
    assert rel < max_rel, (mode, float(rel))
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= agree
    # the quantized model runs through the engine (KV cache, batching) like any other
    params = SamplingParams(max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0)
    out = generate_ids(q, [[1, 2, 3], [4, 5, 6, 7, 8]], params)
    assert out == [generate_ids(q, [p], params)[0] for p in ([1, 2, 3], [4, 5, 6, 7, 8])]


def stdlib_bytes(module: str, n: int) -> torch.Tensor:
    """Real, varied text every machine has: the source of a standard-library module, as bytes."""
    import importlib
    import inspect

    return torch.tensor(list(inspect.getsource(importlib.import_module(module)).encode("utf-8")[:n]))


def perplexity(model, data: torch.Tensor, T: int = 64) -> float:
    x = data[: (len(data) - 1) // T * T + 1]
    inp, tgt = x[:-1].view(-1, T), x[1:].view(-1, T)
    with torch.no_grad():
        loss = F.cross_entropy(model(inp).flatten(0, 1), tgt.flatten())
    return math.exp(loss.item())


def test_perplexity_change_on_a_trained_tiny_model():
    """Train a byte-level model for a few seconds; int8 must barely move perplexity, int4 a little."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, vocab_size=256, max_seq_len=64, init_std=0.02)
    model = Transformer(cfg)
    data, held = stdlib_bytes("argparse", 60_000), stdlib_bytes("textwrap", 8_000)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        starts = torch.randint(0, len(data) - 65, (16,), generator=gen)
        batch = torch.stack([data[s:s + 65] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    base = perplexity(model, held)
    assert base < 16  # it learned something (uniform would be 256)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ppl = {}
    for mode in ("int8", "int4"):
        m = Transformer(cfg)
        m.load_state_dict(state)
        ppl[mode] = perplexity(quantize_model(m.eval(), mode), held)
    print(f"perplexity fp32 {base:.3f}  int8 {ppl['int8']:.3f} ({ppl['int8'] / base - 1:+.2%})  "
          f"int4 {ppl['int4']:.3f} ({ppl['int4'] / base - 1:+.2%})")
    assert abs(ppl["int8"] / base - 1) < 0.01
    assert abs(ppl["int4"] / base - 1) < 0.08
