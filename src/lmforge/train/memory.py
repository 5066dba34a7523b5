"""Memory a training step needs, measured the same way on a CPU as on a GPU.

A CPU has no caching allocator to ask for a peak, so these count from first principles: the tensors
autograd keeps from forward to backward, and the profiler's allocation events replayed in order.
Both are exact and independent of other processes' load. `bench/train.py` reports them and the
tests assert on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.profiler import profile


def saved_tensor_bytes(model: nn.Module, forward: Callable[[], Any]) -> tuple[Any, int]:
    """(forward's result, bytes of the tensors autograd saves for backward while it runs).

    The model's parameters are left out (they stay whatever the step does); storages are counted
    once however many saved tensors view them.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(seen.values())


def peak_allocated_bytes(fn: Callable[[], Any]) -> int:
    """The highest total that fn's allocations reach above where they start (profiler events replayed)."""
    with profile(profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak

