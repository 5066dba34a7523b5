"""Weight-only INT8 / INT4 quantization of the Transformer's linear layers, for inference.

Why our own and not torchao: torchao 0.18's int8 weight-only path runs here, but its int4 path
needs a separate GPU kernel package (it fails on CPU), and importing torchao pulls native
libraries built for other Python versions. These two layers are plain PyTorch, identical on CPU
and CUDA, and small enough to read:

- int8: symmetric, one scale per output channel. y = (x @ q^T) * scale, so the scale is applied
  to the output and the int8 matrix is only cast, never rescaled, per call.
- int4: asymmetric (scale + zero point) per group of 32 input columns, two values per byte. The
  weight is dequantized on the fly for each call (shift, mask, one multiply, one subtract). On this
  project's CPUs that is as fast as PyTorch's private `_weight_int4pack_mm_for_cpu` (which needs its
  own packing), and plain cast-then-matmul beat the private `_weight_int8pack_mm` by 3x for int8.

Both keep activations in the model's dtype. They save memory (int8: 4x vs fp32 weights; int4
about 6x with the group scales) rather than time on CPU, where the cast/unpack costs about what
the smaller read saves. The token embedding and the LM head stay in full precision: they are the
most sensitive matrices (llama.cpp's quantizer also keeps the output layer at higher precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import LmforgeError

MODES = ("int8", "int4")
INT4_GROUP = 32


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantize(self) -> Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP):
        super().__init__()
        out_f, in_f = linear.weight.shape
        if in_f % group_size:
            group_size = in_f  # one group per row when the width is not a multiple of the group
        if in_f % 2:
            raise LmforgeError(f"int4 needs an even input width, got {in_f}")
        w = linear.weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = (torch.round(w / scale) + zero).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        self.register_buffer("packed", q[:, 0::2] | (q[:, 1::2] << 4))  # low nibble: even column
        # w = q * scale - offset, with offset = zero * scale: two in-place passes when dequantizing
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("offset", (zero * scale).to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("shifts", torch.tensor([0, 4], dtype=torch.uint8), persistent=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        q = (self.packed.unsqueeze(-1) >> self.shifts) & 0xF  # (out, in/2, 2): even, odd column
        w = q.view(self.out_features, -1, self.group_size).to(dtype)
        w = w.mul_(self.scale.to(dtype)).sub_(self.offset.to(dtype))
        return w.view(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace every nn.Linear inside the Transformer blocks in place; returns the model."""
    if mode not in MODES:
        raise LmforgeError(f"--quantize must be one of {', '.join(MODES)}, got '{mode}'")
    layer_cls = Int8Linear if mode == "int8" else Int4Linear
    blocks = model.blocks() if hasattr(model, "blocks") else model.model.layers  # t5: both stacks' blocks
    for block in blocks:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, layer_cls(child))
    model.quantization = mode
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
