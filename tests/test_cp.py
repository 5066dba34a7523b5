"""Context parallel on CPU with gloo: the ring attention against plain attention over the whole sequence."""

from __future__ import annotations

import os
import subprocess
import sys

# Run under torchrun with 4 processes: rings of 4 (the whole world) and of 2 (two pairs), each rank holding
# its head and tail chunks. The ring's output and the gradients of q, k and v equal plain causal attention's
# over the whole sequence at this rank's positions; so do a whole model's loss and weight gradients.
CP_CHECK = """
import torch, torch.distributed as dist
import torch.nn.functional as F
from lmforge.config import load_config
from lmforge.model.transformer import Transformer
from lmforge.train.context import RingAttention, SequenceSplit
from lmforge.train.parallelize import apply_activation_checkpointing

dist.init_process_group("gloo")
rank = dist.get_rank()
pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
rings = {4: dist.group.WORLD, 2: pairs[rank // 2]}

for size, group in rings.items():
    split = SequenceSplit(dist.get_rank(group), size)
    ring = RingAttention(group)
    for h, hkv, d in ((4, 4, 8), (4, 2, 8), (6, 2, 5)):  # plain, grouped-query, an odd head size
        torch.manual_seed(h * 10 + hkv + d)  # the same whole tensors on every rank
        q, k, v = torch.randn(2, h, 32, d), torch.randn(2, hkv, 32, d), torch.randn(2, hkv, 32, d)
        dout = torch.randn(2, h, 32, d)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != h).backward(dout)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != h)
        pos = split.positions(32)
        ql, kl, vl = (t.detach()[:, :, pos].clone().requires_grad_() for t in (q, k, v))
        out = ring(ql, kl, vl)
        out.backward(dout[:, :, pos])
        torch.testing.assert_close(out, want.detach()[:, :, pos], rtol=1e-5, atol=1e-5)
        for name, a, b in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
            torch.testing.assert_close(a.grad, b.grad[:, :, pos], rtol=1e-5, atol=1e-5, msg=f"{size} {h} {hkv} {name}")
    # bf16 (train.precision=bf16 on a CPU): the ring merges in fp32, close to the kernel over the whole sequence
    q, k, v = (torch.randn(2, 4, 32, 8).bfloat16() for _ in range(3))
    pos = split.positions(32)
    got = ring(q[:, :, pos], k[:, :, pos], v[:, :, pos])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, pos], rtol=2e-2,
                               atol=2e-2)

    variants = {"llama": [], "qwen3": ["model.qk_norm=true", "model.tie_embeddings=false"],
                "gpt2": ["model.arch=gpt2", "model.norm=layernorm", "model.pos=learned", "model.mlp=gelu",
                         "model.bias=true"]}
    for name, extra in variants.items():
        cfg = load_config(overrides=["model.vocab_size=128", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
                                     "model.n_kv_head=2", "model.max_seq_len=64", *extra]).model
        torch.manual_seed(0)
        ref, cp = Transformer(cfg), Transformer(cfg)
        cp.load_state_dict(ref.state_dict())
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


def test_ring_attention_equals_attention_over_the_whole_sequence(tmp_path):
    script = tmp_path / "cp_check.py"
    script.write_text(CP_CHECK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                        str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("ring ok") == 4, r.stderr[-3000:]
