"""Context parallel: each of `cp` ranks holds a part of every sequence, and attention runs as a ring.

The sequence is cut into 2*cp equal chunks and rank r keeps chunks r and 2*cp-1-r (head and tail), so
under the causal mask every rank has the same work: a rank with an early chunk, whose queries see few
keys, also holds a late one, whose queries see many. Everything but attention is per token and needs
nothing from the other ranks; RoPE (or learned positions) gets the tokens' global positions.

Attention passes the keys and values around the cp ranks: at each of cp steps a rank attends its
queries to the block it holds while sending that block on to the next rank. The partial outputs are
merged by their log-sum-exp (softmax over the union of two key sets, from each set's own softmax), which
the CPU flash kernel returns with its output. Between two chunks the causal mask is whole, triangular
(a chunk with itself) or empty, so no explicit mask is ever built and empty pairs are skipped. Backward
runs the ring again with the merged output and log-sum-exp, and each block's key and value gradients
travel on with it until they reach the rank that owns the block.

torch's own `context_parallel` has no sharding rule for the CPU kernel (torch 2.13), hence this ring.
On other devices each block is computed with PyTorch's own ops (`_math_block`: the same output,
log-sum-exp and gradients, tested against the CPU kernel), which hold a block pair's scores at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward



def _math_block(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """One block's attention output and log-sum-exp (B, H, Tq) in fp32 with plain ops, any device."""
    rep = q.shape[1] // k.shape[1]
    kx, vx = (t.float().repeat_interleave(rep, dim=1) for t in (k, v))
    s = _scores(q, kx, causal)
    lse = s.logsumexp(-1)
    return (torch.exp(s - lse.unsqueeze(-1)) @ vx).to(q.dtype), lse


def _math_block_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The block's share of dq, dk, dv given the merged output and log-sum-exp (flash attention's backward:
    dS = P * (dP - rowsum(dO * O)), P = exp(S - lse))."""
    rep = q.shape[1] // k.shape[1]
    kx, vx = (t.float().repeat_interleave(rep, dim=1) for t in (k, v))
    do = dout.float()
    p = torch.exp(_scores(q, kx, causal) - lse.unsqueeze(-1))
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ vx.transpose(-1, -2) - (do * out.float()).sum(-1, keepdim=True))
    scale = q.shape[-1] ** -0.5
    dq, dk = scale * ds @ kx, scale * ds.transpose(-1, -2) @ q.float()
    if rep > 1:  # a key head's gradient is the sum over the query heads that share it
        b, _, t, d = dk.shape
        dk, dv = (g.view(b, -1, rep, t, d).sum(2) for g in (dk, dv))
    return dq, dk, dv


def _scores(q: Tensor, kx: Tensor, causal: bool) -> Tensor:
    s = (q.float() @ kx.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:  # a chunk with itself: query i sees keys 0..i
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _kernels(q: Tensor, math: bool) -> tuple:
    """(block forward, block backward): the CPU flash kernel on a CPU, PyTorch's ops elsewhere (or if asked)."""
    if q.device.type == "cpu" and not math:
        return (lambda q, k, v, causal: _flash(q, k, v, 0.0, causal),
                lambda do, q, k, v, o, lse, causal: _flash_backward(do, q, k, v, o, lse, 0.0, causal))
    return _math_block, _math_block_backward


# Tags keep the blocks and their gradients apart when both are in flight to the same rank (a ring of two).
_BLOCK_TAG, _GRAD_TAG = 1, 2


@dataclass(frozen=True)
class SequenceSplit:
    """This rank's part of every sequence: chunks `rank` and `2*size-1-rank` of 2*size equal chunks."""

    rank: int
    size: int

    def positions(self, seq_len: int, device: torch.device | str = "cpu") -> Tensor:
        """The global positions of this rank's tokens, in the order it holds them (T/size of them)."""
        n = seq_len // (2 * self.size)
        head, tail = self.rank * n, (2 * self.size - 1 - self.rank) * n
        return torch.cat([torch.arange(head, head + n, device=device), torch.arange(tail, tail + n, device=device)])

    def cut(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs, labels, positions) of this rank's tokens of a (B, T) micro-batch."""
        pos = self.positions(x.shape[1], x.device)
        return x[:, pos], y[:, pos], pos.expand(x.shape[0], -1)


class RingAttention:
    """Causal attention over the sequence held in parts by the ranks of `group` (see the module's docstring).

    Called as `attend(q, k, v)` on this rank's (B, H, T/cp, D) queries and (B, Hkv, T/cp, D) keys and values
    (fewer key heads: grouped-query attention, which the kernel handles), in the SequenceSplit's order.
    """

    def __init__(self, group: dist.ProcessGroup, math: bool = False):
        self.group = group
        self.math = math  # PyTorch's ops for the blocks even on a CPU (what other devices use)

    @torch.compiler.disable  # point-to-point sends inside: a compiled block runs this part eagerly
    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _Ring.apply(q, k, v, self.group, self.math)


class _Shift:
    """Send a tensor to the next rank of the ring and receive the previous rank's, without waiting."""

    def __init__(self, t: Tensor, group: dist.ProcessGroup, tag: int):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.buf = torch.empty_like(t)
        ops = [dist.P2POp(dist.isend, t, group=group, group_peer=(rank + 1) % size, tag=tag),
               dist.P2POp(dist.irecv, self.buf, group=group, group_peer=(rank - 1) % size, tag=tag)]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> Tensor:
        for w in self.works:
            w.wait()
        return self.buf


def _merge(out: Tensor, lse: Tensor, o: Tensor, lse_o: Tensor) -> None:
    """In place: the softmax-weighted output over both key sets, from each set's output and log-sum-exp."""
    new = torch.logaddexp(lse, lse_o)
    out.mul_(torch.exp(lse - new).unsqueeze(-1)).add_(o.float() * torch.exp(lse_o - new).unsqueeze(-1))
    lse.copy_(new)


class _Ring(torch.autograd.Function):
    """At step s a rank holds the block of rank src = rank - s. With chunks (a, b) = (rank, 2c-1-rank) for
    queries and (src, 2c-1-src) for keys: s = 0 is causal over the rank's own two chunks (a before b); a
    block from an earlier rank is seen whole by both query chunks through its head chunk only (its tail
    lies after b); a block from a later rank is seen whole by the tail query chunk b only."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, math: bool) -> Tensor:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        block_fn, _ = _kernels(q, math)
        half = q.shape[2] // 2
        block = torch.stack([k, v])  # one message a step
        out = lse = None
        for step in range(size):
            shift = _Shift(block, group, _BLOCK_TAG) if step < size - 1 else None
            src = (rank - step) % size
            kb, vb = block[0], block[1]
            if step == 0:
                o, lse_o = block_fn(q, kb, vb, True)
                out, lse = o.float(), lse_o.clone()
            elif src < rank:
                o, lse_o = block_fn(q, kb[:, :, :half], vb[:, :, :half], False)
                _merge(out, lse, o, lse_o)
            else:
                o, lse_o = block_fn(q[:, :, half:], kb, vb, False)
                _merge(out[:, :, half:], lse[:, :, half:], o, lse_o)
            if shift is not None:
                block = shift.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.math = group, math
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        _, backward_fn = _kernels(q, ctx.math)
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        half = q.shape[2] // 2
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        block = torch.stack([k, v])
        grads = None  # the gradients of the block this rank last held, on their way to its owner
        for step in range(size):
            shift = _Shift(block, group, _BLOCK_TAG) if step < size - 1 else None
            src = (rank - step) % size
            kb, vb = block[0], block[1]
            dblock = torch.zeros_like(block, dtype=torch.float32)
            if step == 0:
                gq, gk, gv = backward_fn(dout, q, kb, vb, out, lse, True)
                dq += gq
                dblock[0] += gk
                dblock[1] += gv
            elif src < rank:
                gq, gk, gv = backward_fn(dout, q, kb[:, :, :half], vb[:, :, :half], out, lse, False)
                dq += gq
                dblock[0, :, :, :half] += gk
                dblock[1, :, :, :half] += gv
            else:
                gq, gk, gv = backward_fn(dout[:, :, half:], q[:, :, half:], kb, vb, out[:, :, half:],
                                         lse[:, :, half:], False)
                dq[:, :, half:] += gq
                dblock[0] += gk
                dblock[1] += gv
            if grads is not None:  # the earlier ranks' share of this block's gradients
                dblock += grads.wait()
            grads = _Shift(dblock, group, _GRAD_TAG)
            if shift is not None:
                block = shift.wait()
        dkv = grads.wait()  # after a full turn: this rank's own block, with every rank's share
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None
