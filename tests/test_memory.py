"""Memory: what a step keeps, measured, and the planner's arithmetic (model/fit.py) held to it.

Counted with saved_tensors_hooks (the tensors autograd keeps from forward to backward, parameters
left out), which is exact and independent of the allocator, so it holds on a CPU without
torch.cuda's memory statistics; and the loss's peak from the profiler's allocation events.
"""

from __future__ import annotations

import pytest
import torch
from spine import lmforge

from lmforge.errors import LmforgeError
from lmforge.model import cpu_kernels, fit
from lmforge.model.fit import (
    Layout,
    block_activation_bytes,
    param_counts,
    parse_memory,
    plan,
    rank,
    training_memory,
)
from lmforge.model.loss import AUTO_CHUNK, _ce_sum, cross_entropy_sum, free_cpu_logits_buffer
from lmforge.model.presets import model_config
from lmforge.model.transformer import Transformer
from lmforge.train.memory import peak_allocated_bytes, saved_tensor_bytes
from lmforge.train.parallelize import apply_activation_checkpointing


def _model(vocab: int = 2048) -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config("tiny", n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, max_seq_len=128)).train()


def _saved_bytes(model: Transformer, fn) -> int:
    loss, n = saved_tensor_bytes(model, fn)
    loss.backward()
    return n


def _batch(vocab: int, b: int = 4, t: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def test_fused_loss_keeps_no_logits():
    model = _model()
    x, y = _batch(2048)
    fused = _saved_bytes(model, lambda: cross_entropy_sum(model, model(x, return_hidden=True), y, 128))
    plain = _saved_bytes(model, lambda: _ce_sum(model, model(x, return_hidden=True), y))
    logits = x.numel() * 2048 * 4
    # The unfused path keeps the fp32 log-softmax of every logit; the fused one only the gradients
    # of h and of the head (vocab x C), formed in its forward pass.
    assert plain - fused > 0.8 * logits


def test_activation_checkpointing_keeps_only_block_inputs():
    model = _model()
    x, y = _batch(2048)
    full = _saved_bytes(model, lambda: cross_entropy_sum(model, model(x, return_hidden=True), y))
    apply_activation_checkpointing(list(model.model.layers))
    ckpt = _saved_bytes(model, lambda: cross_entropy_sum(model, model(x, return_hidden=True), y))
    assert ckpt < full / 3


def test_fused_loss_peak_is_a_fraction_of_the_logits():
    vocab, n, c = 8192, 1024, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, n, c, generator=g, requires_grad=True)
    head = torch.nn.Linear(c, vocab, bias=False)
    y = torch.randint(0, vocab, (1, n), generator=g)
    model = type("Head", (torch.nn.Module,), {"logits": lambda self, x: self.lm_head(x)})()
    model.lm_head = head
    plain = peak_allocated_bytes(lambda: _ce_sum(model, h, y).backward())
    free_cpu_logits_buffer()  # the chunk buffer it keeps between calls is counted, not taken as given
    fused = peak_allocated_bytes(lambda: cross_entropy_sum(model, h, y, chunk=128).backward())
    logits = n * vocab * 4
    assert plain > 2 * logits  # logits, log-softmax and their gradient
    assert fused < logits / 2  # one 128-token chunk at a time, plus the head's gradient



# --- the planner's arithmetic -----------------------------------------------------------------------

GiB = 2**30
VOCAB = 50304  # what `model info` assumes


def _preset(name: str):
    return model_config(name, vocab_size=VOCAB)


def test_loss_term_is_one_chunk_whatever_the_batch():
    assert fit.AUTO_CHUNK == AUTO_CHUNK  # the planner's copy of train.loss_chunk=0's meaning
    xl = _preset("xl")
    one_chunk = training_memory(xl, 1, 1024)["loss_chunk"]  # exactly train.loss_chunk's 1024 tokens
    at_16x2048 = training_memory(xl, 16, 2048)["loss_chunk"]
    assert at_16x2048 == one_chunk
    # one chunk's fp32 logits and log-softmax, the head's fp32 gradient and its bf16 cast
    assert one_chunk == 8 * 1024 * VOCAB + (4 + 2) * VOCAB * 2048
    # the full fp32 logits and their gradient, which the old estimate counted: 12.3 GiB here
    full = 16 * 2048 * VOCAB * 4 * 2
    assert full > 12 * GiB and at_16x2048 < full / 12
    assert training_memory(xl, 1, 512)["loss_chunk"] < one_chunk  # fewer tokens than a chunk
    assert training_memory(xl, 16, 2048, loss_chunk=256)["loss_chunk"] < one_chunk


@pytest.mark.parametrize("preset", ["tiny", "gpt2-small"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("ac", [False, True])
def test_activations_are_what_autograd_saves(monkeypatch, preset, precision, ac):
    """The planner's activations against the tensors the model really keeps for backward.

    On PyTorch's own ops (the CUDA path: the fused CPU kernels keep less), in bf16 autocast and fp32,
    Llama and GPT-2 blocks, with and without activation checkpointing.
    """
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    cfg = model_config(preset, n_layer=2, n_embd=128, n_head=4, n_kv_head=4, vocab_size=512, max_seq_len=128)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    if ac:
        apply_activation_checkpointing(list(model.model.layers))
    b, t = 4, 128
    x = torch.randint(0, 512, (b, t), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return cross_entropy_sum(model, model(x, return_hidden=True), x)

    saved = _saved_bytes(model, step)
    mem = training_memory(cfg, b, t, precision, layout=Layout(activation_checkpointing=ac))
    # Saved for backward: the activations, less the one block recomputed in backward under
    # checkpointing; the weight copies (none kept under checkpointing); the head's gradient.
    recompute = b * t * block_activation_bytes(cfg, precision) if ac else 0
    expected = mem["activations"] - recompute + (0 if ac else mem["copies"]) + 4 * 512 * 128
    assert expected == pytest.approx(saved, rel=0.02)


def test_fsdp_on_two_shards_halves_weights_grads_and_optimizer():
    xl = _preset("xl")
    one = training_memory(xl, 8, 2048)
    n = param_counts(xl).total
    assert one["weights"] + one["grads"] + one["optimizer"] == 16 * n  # fp32 weights and grads, two moments
    fsdp = training_memory(xl, 8, 2048, layout=Layout(dp_shard=2))
    for key in ("weights", "grads", "optimizer"):
        assert fsdp[key] == pytest.approx(one[key] / 2, abs=1)
    assert fsdp["activations"] == one["activations"]  # each shard still runs its own micro-batch
    ddp = training_memory(xl, 8, 2048, layout=Layout(dp_replicate=2))
    assert ddp["grads"] == 2 * one["grads"]  # DDP's buckets are as large as the gradients
    muon = training_memory(xl, 8, 2048, optimizer="muon")
    p = param_counts(xl)
    assert muon["optimizer"] == 4 * 24 * p.block_matrices + 8 * (n - 24 * p.block_matrices)


def test_tensor_parallel_two_halves_state_and_activations():
    xl = _preset("xl")
    one = training_memory(xl, 8, 2048)
    tp = training_memory(xl, 8, 2048, layout=Layout(tp=2))
    for key in ("weights", "grads", "optimizer", "activations", "copies", "loss_chunk"):
        assert tp[key] == pytest.approx(one[key] / 2, abs=1), key
    cp = training_memory(xl, 8, 2048, layout=Layout(cp=2))
    assert cp["activations"] == pytest.approx(one["activations"] / 2, abs=1)


def test_pipeline_counts_its_worst_stage_and_offload_moves_state_to_the_host():
    xl, p = _preset("xl"), param_counts(_preset("xl"))
    pp = training_memory(xl, 8, 2048, layout=Layout(pp=2))
    # The first stage is the worse one: 12 blocks and the embedding, and under 1F1B two of the eight
    # one-sequence micro-batches in flight (the last stage holds one, plus the head and the loss).
    assert pp["weights"] == 4 * (12 * p.block + p.embed) and pp["loss_chunk"] == 0
    assert pp["activations"] == int(2 * 2048 * 12 * block_activation_bytes(xl, "bf16"))
    gpipe = training_memory(xl, 8, 2048, layout=Layout(pp=2, pp_schedule="gpipe"))
    assert gpipe["activations"] > 3 * pp["activations"]  # GPipe keeps all eight
    ac = training_memory(xl, 8, 2048, layout=Layout(dp_shard=8, cpu_offload=True, activation_checkpointing=True))
    assert ac["weights"] == ac["grads"] == ac["optimizer"] == 0
    assert ac["host"] == pytest.approx(16 * p.total / 8, abs=8)


def test_parse_memory():
    assert parse_memory("24GB") == parse_memory("24GiB") == parse_memory("24") == parse_memory("24 G") == 24 * GiB
    assert parse_memory("80G") == 80 * GiB and parse_memory("512MB") == 512 * 2**20
    with pytest.raises(LmforgeError, match="--gpu-mem"):
        parse_memory("lots")


def test_planner_small_on_one_24gb_gpu_needs_nothing_but_the_gpu():
    small = _preset("small")
    result = plan(small, 1, parse_memory("24GB"), 8, 1024)
    assert result.best.layout == Layout() and result.best_batch == 8
    n = param_counts(small).total
    total = result.best.memory["total"]
    # 16 B/param of state (2 GiB) and 8 x 1024 tokens through 12 blocks of 55C bytes each
    assert 16 * n + 8 * 1024 * 12 * 55 * 768 < total < 0.9 * 24 * GiB


def test_planner_xl_on_one_16gb_gpu_fits_only_with_its_state_in_host_memory():
    xl = _preset("xl")
    n = param_counts(xl).total
    usable = 0.9 * 16 * GiB
    assert 16 * n > usable  # fp32 weights, gradients and AdamW's moments alone do not fit
    result = plan(xl, 1, 16 * GiB, 8, 2048)
    assert {r.layout.name for r in result.rows} >= {"1 GPU", "1 GPU + AC"}
    assert all(r.layout.cpu_offload for r in result.rows if r.fits)
    floor = training_memory(xl, 1, 2048, layout=Layout(activation_checkpointing=True))["total"]
    assert floor > usable  # not even one sequence with checkpointing
    best = result.best
    assert best.layout.cpu_offload and best.layout.activation_checkpointing and best.memory["total"] <= usable
    assert best.memory["host"] == pytest.approx(16 * n, abs=8)


def test_planner_xl_on_eight_16gb_gpus_shards():
    xl = _preset("xl")
    result = plan(xl, 8, parse_memory("16GB"), 8, 2048)
    rows = {r.layout.name: r for r in result.rows}
    usable = 0.9 * 16 * GiB
    assert not rows["DDP 8"].fits and not rows["DDP 8 + AC"].fits  # every GPU holds all 16 B/param
    assert rows["DDP 8 + AC"].memory["total"] > 16 * param_counts(xl).total
    # 8 x 2048 tokens through 24 blocks of 55C bytes: ~42 GiB of activations unless checkpointed
    assert rows["FSDP 8"].memory["activations"] > 8 * 2048 * 24 * 55 * 2048 > usable
    assert result.best.layout == Layout(dp_shard=8, activation_checkpointing=True)
    assert result.best.memory["total"] <= usable and result.best_batch == 8


def test_planner_order():
    names = [lay.name for lay in sorted({r.layout for r in plan(_preset("small"), 8, 80 * GiB, 8, 1024).rows},
                                        key=lambda lay: rank(lay, False))]
    assert names[:6] == ["DDP 8", "FSDP 8", "HSDP 2x4", "DDP 8 + AC", "FSDP 8 + AC", "HSDP 2x4 + AC"]
    assert names.index("TP 2 + FSDP 4") < names.index("PP 2 + FSDP 4") < names.index("FSDP 8 + offload")
    across = [r.layout.name for r in plan(_preset("small"), 16, 80 * GiB, 8, 1024).rows]
    assert across[:3] == ["DDP 16", "HSDP 2x8", "FSDP 16"]  # across nodes, HSDP keeps the gathers on a node


def test_model_info_plans_eight_gpus():
    r = lmforge("model", "info", "xl", "--gpus", "8", "--gpu-mem", "16GB")
    assert r.returncode == 0, r.stderr
    rows = {line.split("  ")[1].strip(): line.split() for line in r.stdout.splitlines()
            if line.startswith("  ") and line.split()[-1] in ("yes", "no")}
    assert rows["DDP 8"][-1] == "no" and rows["FSDP 8 + AC"][-1] == "yes" and rows["TP 8"][-1] == "yes"
    cells = [float(v) for v in rows["FSDP 8 + AC"][-9:-1]]
    assert sum(cells[:6]) == pytest.approx(cells[6], abs=0.03)  # the parts add up to the total
    assert "suggested: FSDP 8 + AC" in r.stdout
    assert "torchrun --nproc_per_node=8 -m lmforge pretrain RECIPE parallel.dp_replicate=1 parallel.dp_shard=8 " \
           "train.activation_checkpointing=true" in r.stdout
    r = lmforge("model", "info", "xl", "--gpus", "8")
    assert r.returncode != 0 and "--gpu-mem" in r.stderr
