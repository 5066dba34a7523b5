"""Context parallel (parallel.cp) on CPU with gloo: the ring attention against plain attention over the whole
sequence, and pretraining under cp against the single-process run on the same global batch (golden losses
and final weights, as tests/test_parallel.py holds every other layout to)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from spine import TINY, copy_run, lmforge, prepared_run, run_check

STEPS = 20
# test_parallel's settings, longer: 4 micro-batches of 2 x 32 tokens a step, each sequence in 4 chunks of 8
# under parallel.cp=2; validation at steps 10 and 20.
COMMON = [*TINY, f"train.max_steps={STEPS}", "train.save_every=5", "train.micro_batch=2", "train.batch_tokens=256",
          "train.eval_every=10"]

# Run under torchrun with 4 processes: rings of 4 (the whole world) and of 2 (two pairs), each rank holding
# its head and tail chunks. The ring's output and the gradients of q, k and v equal plain causal attention's
# over the whole sequence at this rank's positions; so do a whole model's loss and weight gradients.
CP_CHECK = """
import torch, torch.distributed as dist
import torch.nn.functional as F
from spine import VARIANTS, tiny_model
from lmforge.train.context import RingAttention, SequenceSplit
from lmforge.train.parallelize import apply_activation_checkpointing

dist.init_process_group("gloo")
rank = dist.get_rank()
pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
rings = {4: dist.group.WORLD, 2: pairs[rank // 2]}

for size, group in rings.items():
    split = SequenceSplit(dist.get_rank(group), size)
    ring = RingAttention(group)
    cases = [(r, h, hkv, d) for r in (ring, RingAttention(group, math=True))  # the CPU kernel; PyTorch's ops
             for h, hkv, d in ((4, 4, 8), (4, 2, 8), (6, 2, 5))]  # plain, grouped-query, an odd head size
    for r, h, hkv, d in cases:
        torch.manual_seed(h * 10 + hkv + d)  # the same whole tensors on every rank
        q, k, v = torch.randn(2, h, 32, d), torch.randn(2, hkv, 32, d), torch.randn(2, hkv, 32, d)
        dout = torch.randn(2, h, 32, d)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != h).backward(dout)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != h)
        pos = split.positions(32)
        ql, kl, vl = (t.detach()[:, :, pos].clone().requires_grad_() for t in (q, k, v))
        out = r(ql, kl, vl)
        out.backward(dout[:, :, pos])
        torch.testing.assert_close(out, want.detach()[:, :, pos], rtol=1e-5, atol=1e-5)
        for name, a, b in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
            torch.testing.assert_close(a.grad, b.grad[:, :, pos], rtol=1e-5, atol=1e-5,
                                       msg=f"{size} {r.math} {h} {hkv} {name}")
    # bf16 (train.precision=bf16 on a CPU): the ring merges in fp32, close to the kernel over the whole sequence
    q, k, v = (torch.randn(2, 4, 32, 8).bfloat16() for _ in range(3))
    pos = split.positions(32)
    got = ring(q[:, :, pos], k[:, :, pos], v[:, :, pos])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, pos], rtol=2e-2,
                               atol=2e-2)

    for name in VARIANTS:
        ref, cp = tiny_model(name)
        for block in cp.model.layers:
            block.self_attn.attend = ring
        if name == "qwen3":  # the ring runs again when backward recomputes a block
            apply_activation_checkpointing(list(cp.model.layers))
        x, y = torch.randint(0, 128, (2, 32)), torch.randint(0, 128, (2, 32))
        want = ref(x, labels=y)
        want.backward()
        xl, yl, positions = split.cut(x, y)
        got = cp(xl, labels=yl, positions=positions)
        got.backward()
        whole = got.detach().clone()
        dist.all_reduce(whole, group=group)
        torch.testing.assert_close(whole, want.detach(), rtol=1e-5, atol=1e-5)
        for (n, a), (_, b) in zip(ref.named_parameters(), cp.named_parameters()):
            g = b.grad.clone()
            dist.all_reduce(g, group=group)  # what FSDP's reduction adds up (before it averages)
            torch.testing.assert_close(g, a.grad, rtol=1e-5, atol=1e-5, msg=f"{size} {name} {n}")
        cp.eval()
        with torch.inference_mode():  # generation (a cache) never goes through the ring: rank 0 alone here
            if rank == 0:
                c = cp.new_cache(2, 16)
                ref.eval()
                torch.testing.assert_close(cp(x[:, :9], cache=c), ref(x[:, :9], cache=ref.new_cache(2, 16)))
print("ring ok")
"""


@pytest.mark.parametrize("h,hkv,d,causal", [(4, 4, 8, True), (4, 2, 8, False), (6, 2, 5, True)])
def test_the_blocks_in_pytorch_ops_equal_the_cpu_kernel(h, hkv, d, causal):
    """What the ring runs per block off a CPU: output, log-sum-exp and, from a merged output and log-sum-exp
    (here the block's own), the gradients equal the CPU flash kernel's and plain attention's."""
    from lmforge.train.context import _flash, _flash_backward, _math_block, _math_block_backward

    torch.manual_seed(h + hkv + d)
    q, k, v = torch.randn(2, h, 16, d), torch.randn(2, hkv, 12 if not causal else 16, d), None
    v = torch.randn_like(k)
    dout = torch.randn(2, h, 16, d)
    out, lse = _math_block(q, k, v, causal)
    want_out, want_lse = _flash(q, k, v, 0.0, causal)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    got = _math_block_backward(dout, q, k, v, want_out, want_lse, causal)
    want = _flash_backward(dout, q, k, v, want_out, want_lse, 0.0, causal)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, enable_gqa=h != hkv).backward(dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want, (qq.grad, kk.grad, vv.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5, msg=name)


def test_ring_attention_equals_attention_over_the_whole_sequence(tmp_path):
    script = tmp_path / "cp_check.py"
    script.write_text(CP_CHECK)
    r = run_check(script, 4)
    assert r.returncode == 0 and r.stdout.count("ring ok") == 4, r.stderr[-3000:]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return prepared_run(tmp_path_factory.mktemp("spine"))


@pytest.fixture(scope="module")
def single(base_run, tmp_path_factory) -> Path:
    """The reference: one process, the same global batch."""
    run = copy_run(base_run, tmp_path_factory.mktemp("single") / "one")
    r = lmforge("pretrain", f"run_dir={run}", *COMMON)
    assert r.returncode == 0, r.stderr
    (run / "stderr.log").write_text(r.stderr)  # the sample drawn at the end is printed there
    return run


def _rows(run: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m[key] for m in rows if key in m}


def _sample(stderr: str) -> str:
    """The text sampled at the end of a run (printed between its header and the last line)."""
    return stderr.split(f"sample at step {STEPS}:", 1)[1].rsplit("done", 1)[0].strip()


def _val_loss(run: Path) -> float:
    """The validation loss of a run's final weights, evaluated here on one process."""
    from lmforge.checkpoint import load_model
    from lmforge.train.objectives import LMObjective

    model = load_model(run / "checkpoints" / f"step_{STEPS:06d}").eval()
    objective = LMObjective(run / "data", seq_len=32, micro_batch=2, seed=0)
    objective.setup(model, torch.device("cpu"), 0, 1, 1)
    return objective.evaluate(model)["val_loss"]


def test_cp_matches_one_process_across_layouts_and_resumes(base_run, single, tmp_path):
    """parallel.cp=2 alone (FSDP2 over the cp ranks) for steps 1-12, killed and resumed from step 10 under
    cp=2 x dp_shard=2 (FSDP2 over the flattened dp_shard x cp ranks), killed at 17 and finished from step 15
    under cp=2 x tp=2: losses step by step, gradient norms (clipping is on), validation losses, the final
    weights and the end-of-run sample (rank 0 alone, through the plain kernel) equal the one-process run's."""
    run = copy_run(base_run, tmp_path / "cp")
    r = lmforge("pretrain", f"run_dir={run}", *COMMON, "parallel.cp=2", torchrun=2, env={"LMFORGE_FAULT": "step:12"})
    assert r.returncode != 0 and "(cp 2)" in r.stderr, r.stderr[-3000:]
    assert (run / "checkpoints" / "step_000010" / "trainer_state.json").is_file()
    r = lmforge("pretrain", f"run_dir={run}", *COMMON, "parallel.cp=2", "parallel.dp_shard=2", torchrun=4,
                env={"LMFORGE_FAULT": "step:17"})
    assert r.returncode != 0 and "(dp_shard 2, cp 2)" in r.stderr and "written by 2 processes" in r.stderr, \
        r.stderr[-3000:]
    assert (run / "checkpoints" / "step_000015" / "trainer_state.json").is_file()
    # The run remembers dp_shard 2 (RUN/lmforge.yaml); the parallel.* keys given replace that layout whole, so
    # dp_shard takes what cp x tp leave, one.
    r = lmforge("pretrain", f"run_dir={run}", *COMMON, "parallel.cp=2", "parallel.tp=2", torchrun=4)
    assert r.returncode == 0 and "step_000015" in r.stderr and "(cp 2, tp 2)" in r.stderr, r.stderr[-3000:]
    assert "remembers another parallel section" in r.stderr

    for key in ("loss", "grad_norm", "val_loss"):
        a, b = _rows(run, key), _rows(single, key)
        assert a.keys() == b.keys() and len(a) == (2 if key == "val_loss" else STEPS), key
        assert list(a.values()) == pytest.approx(list(b.values()), rel=1e-5), key
    wa = load_file(run / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors")
    wb = load_file(single / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k] - wb[k]).abs().max().item()
        assert diff <= 1e-5 + 1e-5 * wb[k].abs().max().item(), f"{k}: max difference {diff:.2e}"
    assert _rows(run, "val_loss")[STEPS] == pytest.approx(_val_loss(run), rel=1e-5)
    assert _sample(r.stderr) == _sample((single / "stderr.log").read_text())


def test_cp_refuses_what_it_does_not_cover():
    from lmforge.config import load_config
    from lmforge.errors import LmforgeError
    from lmforge.model.transformer import Transformer
    from lmforge.train.parallelize import Layout, apply_cp, check_supported

    for layout in (Layout(cp=2), Layout(cp=2, dp_shard=2), Layout(cp=2, dp_replicate=2), Layout(cp=2, tp=2),
                   Layout(cp=2, dp_replicate=2, tp=2)):
        check_supported(layout, "lm")
    for objective in ("sft", "dpo", "rm", "grpo"):
        why = rf"parallel.cp=2: context parallel trains pretraining only; {objective} needs whole sequences"
        with pytest.raises(LmforgeError, match=why):
            check_supported(Layout(cp=2), objective)
    with pytest.raises(LmforgeError, match=r"parallel.cp=2 with parallel.pp=2: context parallel inside pipeline"):
        check_supported(Layout(cp=2, pp=2), "lm")
    cfg = load_config(overrides=["model.vocab_size=128", "model.n_layer=1"]).model
    blocks = list(Transformer(cfg).model.layers)
    with pytest.raises(LmforgeError, match=r"train.seq_len=36 must be a multiple of 2 x parallel.cp = 8"):
        apply_cp(blocks, Layout(cp=4), cfg, 36, torch.device("cpu"))
    dropout = load_config(overrides=["model.vocab_size=128", "model.n_layer=1", "model.dropout=0.1"]).model
    with pytest.raises(LmforgeError, match=r"parallel.cp=2 with model.dropout=0.1"):
        apply_cp(blocks, Layout(cp=2), dropout, 32, torch.device("cpu"))
