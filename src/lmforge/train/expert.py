"""Expert parallel: each MoE layer's experts split across the `ep` ranks, tokens sent to them and back.

The mesh is torchtitan's: expert-parallel ranks are data-parallel ranks too (each reads its own slice
of the global batch and FSDP2 shards the dense weights over all of them), and the experts live on a
second, "sparse" mesh (efsdp, ep) over the same processes, efsdp = dp_shard / ep. Along `ep` each rank
holds experts / ep whole experts (a Shard(0) DTensor, so checkpoints gather and reshard them like any
sharded weight); along `efsdp` FSDP2 shards those, as it shards the dense weights along dp_shard.

The model's MoE hands its Experts module the tokens sorted by expert and the count per expert
(model/moe.py); expert parallel wraps that call from outside with two all-to-alls, dropless:

    dispatch: the counts go to every rank (all-to-all of E/ep numbers each), then the tokens, each rank
              its share for every rank's experts (variable splits), regrouped by local expert;
    combine:  the expert outputs take the same way back, into the order the model handed in.

all_to_all_single's autograd form sends the gradients back the same way. An expert's weight gradient
therefore sums the contributions of every rank's tokens: it is already a sum over the data-parallel
ranks, where a dense weight's is one rank's part that FSDP averages. The experts' FSDP unit divides by
the whole data-parallel size instead of its own (efsdp) size, so both come out as the one-process mean.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.nn.functional import all_to_all_single
from torch.distributed.tensor import DTensor, Shard

from lmforge.errors import LmforgeError
from lmforge.model.moe import Experts, MoE


def check_ep(experts: int, ep: int) -> None:
    if not experts:
        raise LmforgeError(f"parallel.ep={ep} with a dense model (model.moe.experts=0): expert parallel splits the "
                           "experts of mixture-of-experts layers; set model.moe.experts or parallel.ep=1")
    if experts % ep:
        raise LmforgeError(f"parallel.ep={ep} must divide model.moe.experts={experts}: each rank holds the same "
                           "number of whole experts")


class Dispatch:
    """The forward pre-hook and hook of one Experts module: tokens to the ranks holding their experts, and back.

    The pre-hook keeps the splits and the regrouping of the last call for the hook that follows it (the
    same forward; activation checkpointing's recompute calls both again, in the same order)."""

    def __init__(self, group: tdist.ProcessGroup, ep: int, experts: int):
        self.group, self.ep, self.local = group, ep, experts // ep
        self.saved: tuple[list[int], list[int], Tensor] | None = None
        self.whole = False  # inside whole_experts: every rank holds every expert and computes its own tokens

    def before(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.whole:
            return None
        xs, counts = args
        ep, local = self.ep, self.local
        send = counts.view(ep, local).contiguous()  # tokens for each rank's experts, in expert order already
        recv = torch.empty_like(send)
        tdist.all_to_all_single(recv, send, group=self.group)  # recv[r, l]: rank r's tokens for my expert l
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        got = all_to_all_single(xs.new_empty(sum(recv_splits), xs.shape[1]), xs.contiguous(), recv_splits,
                                send_splits, group=self.group)
        # `got` is grouped by (source rank, local expert); the experts want (local expert, source rank).
        sizes = recv.reshape(-1)
        starts = sizes.cumsum(0) - sizes
        by_expert = torch.arange(ep * local, device=sizes.device).view(ep, local).T.reshape(-1)
        lengths, firsts = sizes[by_expert], starts[by_expert]
        n = int(lengths.sum())
        within = torch.arange(n, device=sizes.device) - (lengths.cumsum(0) - lengths).repeat_interleave(lengths)
        perm = firsts.repeat_interleave(lengths) + within
        self.saved = (send_splits, recv_splits, perm)
        return got[perm], recv.sum(0)

    def after(self, module: nn.Module, args: tuple, ys: Tensor) -> Tensor | None:
        if self.whole:
            return None
        send_splits, recv_splits, perm = self.saved
        self.saved = None
        back = torch.empty_like(ys).index_put((perm,), ys)  # (source rank, local expert) order again
        return all_to_all_single(ys.new_empty(sum(send_splits), ys.shape[1]), back, send_splits, recv_splits,
                                 group=self.group)


def apply_ep(blocks: list[nn.Module], ep_mesh: DeviceMesh) -> list[Experts]:
    """Keep this rank's experts of every MoE layer (a Shard(0) DTensor on `ep_mesh`) and route tokens to
    them by all-to-all. Returns the Experts modules, for FSDP2 to shard along efsdp."""
    rank, ep = ep_mesh.get_local_rank(), ep_mesh.size()
    out = []
    for block in blocks:
        moe = getattr(block, "mlp", None)
        if not isinstance(moe, MoE):
            continue
        experts = moe.experts
        for name, p in list(experts.named_parameters(recurse=False)):
            part = p.detach().chunk(ep, dim=0)[rank].clone()  # every rank holds the same whole weights
            experts.register_parameter(name, nn.Parameter(DTensor.from_local(part, ep_mesh, [Shard(0)],
                                                                             run_check=False),
                                                          requires_grad=p.requires_grad))
        hook = Dispatch(ep_mesh.get_group(), ep, moe.n)
        experts.register_forward_pre_hook(hook.before)
        experts.register_forward_hook(hook.after)
        _DISPATCH[experts] = hook
        out.append(experts)
    return out


_DISPATCH: weakref.WeakKeyDictionary[nn.Module, Dispatch] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def whole_experts(model: nn.Module) -> Iterator[None]:
    """Every expert whole on every rank, and no all-to-all, while inside (parallelize.gathered's reason:
    evaluation and sampling run a different number of forward passes on each rank, and rank 0 alone
    samples, so no forward may wait on another rank). Every rank must enter it together; under FSDP2,
    after the units are gathered. Forward only: the whole copies take no gradient."""
    saved = []
    for experts in model.modules():
        hook = _DISPATCH.get(experts)
        if hook is None:
            continue
        for name, p in list(experts.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                saved.append((experts, name, p))
                experts._parameters[name] = nn.Parameter(p.detach().full_tensor(), requires_grad=False)
        hook.whole = True
        saved.append((experts, None, hook))
    try:
        yield
    finally:
        for experts, name, p in reversed(saved):
            if name is None:
                p.whole = False
            else:
                experts._parameters[name] = p
