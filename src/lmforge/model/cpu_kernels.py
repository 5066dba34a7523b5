"""Fused fp32 CPU kernels for RMSNorm, RoPE, SwiGLU and the softmax cross-entropy (cpu_kernels.c).

On a CPU the small model's step is mostly matmuls and attention that every implementation shares;
what is left is elementwise work, and eager PyTorch spends it in separate passes over memory (an
RMSNorm backward alone is pow, mean, rsqrt, four muls, two sums). These kernels do each job in one
pass, in C with OpenMP, compiled on first use with the machine's C compiler (about a second) and
cached under ~/.cache/lmforge. Without a compiler, or with LMFORGE_CPU_KERNELS=0, or for other
dtypes, devices or under torch.compile (inductor fuses these itself), the same functions fall back
to the plain PyTorch formulas below, which the tests hold the kernels to.

Nothing here needs torch's C++ headers: the kernels take raw pointers through ctypes, which
releases the GIL for the call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.console import log

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_lib: ctypes.CDLL | None = None
_tried = False
enabled = os.environ.get("LMFORGE_CPU_KERNELS", "1") != "0"

_f, _i64, _i32, _p = ctypes.c_float, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "rmsnorm_fwd": [_p, _p, _p, _p, _i64, _i64, _f, _i32],
    "rmsnorm_bwd": [_p, _p, _p, _p, _p, _p, _i64, _i64, _i32],
    "swiglu_fwd": [_p, _p, _p, _i64, _i32],
    "swiglu_bwd": [_p, _p, _p, _p, _p, _i64, _i32],
    "swiglu_rows": [_p, _p, _i64, _i64],
    "rope": [_p, _i64, _p, _p, _p, _i64, _i64, _i64, _i64, _i32, _i32],
    "xent_fwd_bwd": [_p, _p, _p, _i64, _i64, _i64, _i32],
}


def _cpu_tag() -> str:
    """The CPU's feature flags: the library is built with -march=native, so a shared home folder
    on a cluster of different machines must not hand one machine another's build."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def _build() -> ctypes.CDLL:
    """Compile (once per source, compiler and CPU) and load the kernels; OSError says why not."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if platform.system() != "Linux":
        raise OSError(f"built on Linux only, not {platform.system()}")
    if cc is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    # -fno-math-errno and -fno-trapping-math let floorf/expf-style code vectorize; neither changes
    # a result (unlike -ffast-math, which would also reorder sums and drop NaN handling).
    flags = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "kernels"
    lib = cache / f"cpu_kernels-{key}-{_cpu_tag()}.so"
    if not lib.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            out = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                 timeout=120)
            if out.returncode != 0:
                raise OSError(f"{cc} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}")
            os.replace(tmp, lib)  # atomic: a concurrent build never loads half a file
        finally:
            Path(tmp).unlink(missing_ok=True)
    dll = ctypes.CDLL(str(lib))
    for name, args in _SIGNATURES.items():
        fn = getattr(dll, name)
        fn.argtypes = args
        fn.restype = None
    return dll


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first call; None where they cannot be used."""
    global _lib, _tried
    if not _tried and enabled:
        _tried = True
        try:
            _lib = _build()
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            log(f"[yellow]fused CPU kernels unavailable[/] ({e}); using PyTorch ops, which is slower on a CPU")
    return _lib if enabled else None


# Below this many elements a ctypes call plus an OpenMP fork costs more than the passes it saves:
# decoding one token at a time was 3-4 % slower with the kernels (bench/generate.py).
MIN_ELEMENTS = 1 << 16
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def usable(*tensors: Tensor) -> bool:
    """True when the kernels apply: large fp32 CPU tensors, eager mode, and a built library.

    Plain tensors only: a tensor subclass (a tensor-parallel DTensor, whose data pointer is one rank's
    shard and whose ops must go through its dispatch) takes the PyTorch formulas.
    """
    if not all(type(t) in _PLAIN for t in tensors):
        return False
    if not enabled or torch.compiler.is_compiling() or tensors[0].numel() < MIN_ELEMENTS:
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return library() is not None


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


# --- RMSNorm ---------------------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x = x.contiguous()
        c = x.shape[-1]
        n = x.numel() // c
        y = torch.empty_like(x)
        rstd = torch.empty(n, dtype=torch.float32)
        library().rmsnorm_fwd(_ptr(x), _ptr(weight.contiguous()), _ptr(y), _ptr(rstd), n, c, eps, _threads())
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, rstd = ctx.saved_tensors
        g = g.contiguous()
        c = x.shape[-1]
        nt = _threads()
        gx = torch.empty_like(x)
        part = torch.zeros(nt, c, dtype=torch.float32)
        library().rmsnorm_bwd(_ptr(g), _ptr(x), _ptr(weight.contiguous()), _ptr(rstd), _ptr(gx), _ptr(part),
                              x.numel() // c, c, nt)
        return gx, part.sum(0), None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """F.rms_norm(x, (C,), weight, eps) over the last dimension."""
    if usable(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


# --- SwiGLU ----------------------------------------------------------------------------------------
class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        a, b = a.contiguous(), b.contiguous()
        h = torch.empty_like(a)
        library().swiglu_fwd(_ptr(a), _ptr(b), _ptr(h), a.numel(), _threads())
        ctx.save_for_backward(a, b)
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):
        a, b = ctx.saved_tensors
        dh = dh.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        library().swiglu_bwd(_ptr(dh), _ptr(a), _ptr(b), _ptr(da), _ptr(db), a.numel(), _threads())
        return da, db


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b, keeping only a and b for backward (eager keeps silu(a) too)."""
    if usable(a, b) and a.shape == b.shape:
        return _SwiGLU.apply(a, b)
    return F.silu(a) * b


# --- RoPE ------------------------------------------------------------------------------------------
def rope_reference(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin on (B, H, T, D), with the table's sign moved (see transformer.py)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((x2, x1), dim=-1) * sin_signed).to(x.dtype)


def _rope_call(x: Tensor, cos: Tensor, sin: Tensor, inverse: int) -> Tensor:
    """x: (B, T, H, D) with contiguous heads (token stride may be wider); cos/sin: (T, D) contiguous."""
    B, T, H, D = x.shape
    out = torch.empty((B, T, H, D), dtype=x.dtype)
    library().rope(_ptr(x), x.stride(1), _ptr(cos), _ptr(sin), _ptr(out), B * T, T, H, D, inverse, _threads())
    return out


def _rows_of_heads(x: Tensor) -> bool:
    """(B, T, H, D) whose heads lie back to back and whose tokens are evenly spaced: what the kernel reads."""
    B, T, H, D = x.shape
    return x.stride(3) == 1 and x.stride(2) == D and (B == 1 or x.stride(0) == T * x.stride(1))


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rope_call(x, cos, sin, 0)

    @staticmethod
    def backward(ctx, g: Tensor):
        cos, sin = ctx.saved_tensors
        return _rope_call(g.contiguous(), cos, sin, 1), None, None


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """RoPE on x given as (B, H, T, D); returns (B, H, T, D).

    The kernel reads the projections' own (B, T, H, D) memory layout, which `x` (a transposed view
    of it, possibly a slice of a fused q/k/v output) usually has, so nothing is copied first.
    """
    bthd = x.transpose(1, 2)
    if (cos.dim() == 2 and _rows_of_heads(bthd) and usable(x, cos, sin_signed)
            and cos.shape == (x.shape[2], x.shape[3]) and x.shape[3] % 2 == 0):
        return _RoPE.apply(bthd, cos.contiguous(), sin_signed.contiguous()).transpose(1, 2)
    return rope_reference(x, cos, sin_signed)


# --- a few rows at a time, for decoding ------------------------------------------------------------
def _small_ok(*tensors: Tensor) -> bool:
    """Plain contiguous-row fp32 CPU tensors and a built library, whatever their size (see rows_rms_norm)."""
    return (enabled and all(type(t) in _PLAIN and t.device.type == "cpu" and t.dtype == torch.float32
                            and t.stride(-1) == 1 for t in tensors) and library() is not None)


_rstd_scratch = torch.empty(0)  # rows_rms_norm's per-row 1/rms, written and never read


def usable_small(*tensors: Tensor) -> bool:
    """Whether the few-row kernels below apply to these fp32 CPU tensors (and the library is built)."""
    return _small_ok(*tensors)


def rows_rms_norm(x: Tensor, weight: Tensor, eps: float, checked: bool = True) -> Tensor | None:
    """Inference RMSNorm over the last dimension of a few contiguous rows, in one single-threaded call.

    A decoding step normalises a handful of rows: eager's decomposed formula is eight small ops and
    the OpenMP-parallel kernel's fork costs more than the work, so this runs the same kernel on one
    thread. None where the kernels do not apply (the caller then uses F.rms_norm). checked=False skips
    the checks for a caller that has made them once (fp32 CPU tensors, contiguous x, a built library):
    at a few microseconds a call they were a third of its cost.
    """
    global _rstd_scratch
    if checked and not (_small_ok(x, weight) and x.is_contiguous() and weight.is_contiguous()):
        return None
    c = x.shape[-1]
    n = x.numel() // c
    y = torch.empty_like(x)
    if _rstd_scratch.numel() < n:
        _rstd_scratch = torch.empty(max(n, 64), dtype=torch.float32)
    _lib.rmsnorm_fwd(_ptr(x), _ptr(weight), _ptr(y), _ptr(_rstd_scratch), n, c, eps, 1)
    return y


def rows_swiglu(a: Tensor, checked: bool = True) -> Tensor | None:
    """silu(gate) * up for the rows of a = [gate | up] (B, 2F), the fused gate/up product's output; (B, F).
    Single-threaded, for decoding; None where the kernel does not apply (checked=False: as rows_rms_norm)."""
    if checked and not (_small_ok(a) and a.dim() == 2 and a.is_contiguous() and a.shape[1] % 2 == 0):
        return None
    n, f = a.shape[0], a.shape[1] // 2
    h = torch.empty((n, f), dtype=a.dtype)
    _lib.swiglu_rows(_ptr(a), _ptr(h), n, f)
    return h


def rows_rope(x: Tensor, cos: Tensor, sin_signed: Tensor, checked: bool = True) -> Tensor | None:
    """RoPE on x (N, H, D), each of its N rows at its own position: cos / sin_signed (N, D), one row per x
    row; returns a contiguous (N, H, D). Single-threaded, for decoding; None where the kernel does not apply
    (checked=False: as rows_rms_norm)."""
    N, H, D = x.shape
    if checked and not (_small_ok(x, cos, sin_signed) and x.stride(1) == D and cos.is_contiguous()
                        and sin_signed.is_contiguous() and cos.shape == (N, D) and D % 2 == 0):
        return None
    out = torch.empty((N, H, D), dtype=x.dtype)
    _lib.rope(_ptr(x), x.stride(0), _ptr(cos), _ptr(sin_signed), _ptr(out), N, N, H, D, 0, 1)
    return out


# --- cross-entropy over a chunk of logits ----------------------------------------------------------
def softmax_xent_(z: Tensor, targets: Tensor, ignore_index: int) -> Tensor | None:
    """In place: z (n, V) fp32 becomes softmax(z) - onehot(targets) (zero rows for ignored targets).

    Returns the summed loss (fp32 scalar), or None when the kernel does not apply (the caller then
    uses log_softmax). One pass of z through the cache instead of log_softmax's three plus exp.
    """
    if not (usable(z) and z.is_contiguous() and targets.dtype == torch.int64 and z.dim() == 2):
        return None
    t = targets.contiguous()
    bad = (t >= z.shape[1]) | ((t < 0) & (t != ignore_index))
    if bool(bad.any()):  # what F.cross_entropy would refuse, refused here too
        raise IndexError(f"target {int(t[bad][0])} is out of bounds for a vocabulary of {z.shape[1]}")
    nt = _threads()
    part = torch.zeros(nt, dtype=torch.float64)
    library().xent_fwd_bwd(_ptr(z), _ptr(t), _ptr(part), z.shape[0], z.shape[1], ignore_index, nt)
    return part.sum().float()
