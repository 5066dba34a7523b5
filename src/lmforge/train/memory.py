"""Memory a training step needs, measured the same way on a CPU as on a GPU.

A CPU has no caching allocator to ask for a peak, so these count from first principles: the tensors
autograd keeps from forward to backward, and the profiler's allocation events replayed in order.
Both are exact and independent of other processes' load. `bench/train.py` reports them and the
tests assert on them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
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


def reuse_freed_cpu_memory() -> bool:
    """Have glibc's malloc keep freed memory and hand it out again, instead of mapping fresh pages.

    A CPU training step allocates and frees the same large tensors every step (activations, their
    gradients, the loss's chunks). glibc serves blocks above its mmap threshold with a fresh mmap
    and returns them to the kernel on free, and trims the heap top on free as well, so each step
    page-faults its working set in again: at the `tiny` preset that is ~30,000 faults (~120 MB)
    per step, with the kernel zeroing every page. Fixing the threshold at its 32 MiB maximum and
    trimming only above 2 GiB keeps those pages in the process (no faults after the first step); the cost is
    that the process holds on to its peak heap. jemalloc/tcmalloc via LD_PRELOAD do the same, but
    need a restart and a package. Returns whether the setting took (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
