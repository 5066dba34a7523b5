"""Model FLOPs utilisation: achieved model FLOP/s as a fraction of this device's measured matmul rate.

The 100 % is measured, not looked up in a table, so MFU means the same on a laptop CPU and on an
H100. A measurement taken while another process had the cores reads low (a progress line once
showed MFU 130 %); so the ceiling is the highest rate ever seen: when a ratio would pass 100 %, the
probe runs again and the higher value is kept, and if training itself still ran faster, that rate
becomes the ceiling. MFU therefore never exceeds 100 %.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lmforge.console import log


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float:
    """Measured dense matmul rate of this device (FLOP/s).

    On a CPU each product is timed alone and the fastest counts: a ceiling should not read low
    because another process (or a compiler's worker pool) took a core for a moment.
    """
    n = 2048 if device.type == "cuda" else 1024
    dt = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            a @ b
        torch.cuda.synchronize()
        return 2 * n**3 * 50 / (time.perf_counter() - t0)
    best = float("inf")
    for _ in range(8):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def bf16_speedup(rows: int, inner: int, outer: int) -> float:
    """How many times faster this CPU multiplies a (rows x inner) @ (inner x outer) product in bf16 than in fp32.

    Measured, not read from CPU flags: with AMX or AVX512-BF16 bf16 products run several times faster,
    without them PyTorch emulates bf16 and it is several times slower; and at small widths even native
    bf16 can lose to fp32. The shape is the model's own MLP product, so the answer is for this model.
    Each timing repeats the product for at least 2 ms (a small model's product takes microseconds, and a
    single one measured 0.94x and 1.11x on one machine in one minute), and the fastest of five counts
    (another process may take a core for a moment).
    """
    def best(dtype: torch.dtype) -> float:
        a = torch.randn(rows, inner, dtype=dtype)
        b = torch.randn(inner, outer, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        a @ b
        reps = min(1000, max(1, int(2e-3 / max(time.perf_counter() - t0, 1e-7)) + 1))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            times.append((time.perf_counter() - t0) / reps)
        return min(times)

    with torch.random.fork_rng(devices=[]):  # the probe must not move the training RNG
        return best(torch.float32) / best(torch.bfloat16)


def format_flops(rate: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6), ("kFLOP/s", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.3g} {unit}"
    return f"{rate:.3g} FLOP/s"


class MatmulCeiling:
    """The highest matmul rate seen on this device, and MFU as a fraction of it."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None,
                 measure: Callable[[torch.device, torch.dtype | None], float] | None = None):
        self.device, self.dtype, self.measure = device, dtype, measure
        self.flops = self._probe()

    def _probe(self) -> float:
        measure = self.measure or peak_flops
        # The probe's randn must not move the training RNG (resume is bit-exact).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return float(measure(self.device, self.dtype))

    @property
    def kind(self) -> str:
        return str(self.dtype or torch.float32).removeprefix("torch.").replace("bfloat16", "bf16") \
            .replace("float32", "fp32").replace("float16", "fp16")

    def describe(self) -> str:
        return f"MFU against a measured {self.kind} matmul peak of {format_flops(self.flops)}"

    def mfu(self, achieved: float) -> float:
        """achieved FLOP/s / ceiling, raising the ceiling first if the ratio would pass 1."""
        if achieved <= self.flops or achieved <= 0:
            return achieved / self.flops if self.flops > 0 else 0.0
        before = self.flops
        self.flops = max(self.flops, self._probe())
        why = "re-measured"
        if achieved > self.flops:
            self.flops = achieved
            why = "training ran faster than the probe, so its own rate is the new peak"
        log(f"[dim]MFU ceiling raised from {format_flops(before)} to {format_flops(self.flops)} ({why}); "
            f"now {self.describe()}[/]")
        return achieved / self.flops
