"""Frozen-weight linear layers for CPU inference, run by oneDNN on a weight packed once at load.

Why: PyTorch's default CPU matmul (MKL sgemm) repacks the weight on every call and, for the
2-32 rows of a token tree, takes a slow path on this project's AMD CPU. oneDNN with the weight
reordered into its blocked layout once runs the same products 2-3x faster (measured with 2
threads on 2-32 rows: a 3072x576 projection 0.74 -> 0.33 ms at 8 rows, the 49k-row LM head
32.6 -> 12.4 ms at 8 rows). A single row keeps MKL's matrix-vector product, which is as fast.

Only float32 weights on CPU are packed; anything else (CUDA, half precision) and
`SPECDEC_ONEDNN=0` use `F.linear`. Packed layers have no gradient: inference only. The packed
copy is extra memory (the target's float32 weights once more).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def packing_enabled(weight: torch.Tensor) -> bool:
    """Whether `weight` gets a oneDNN-packed copy (float32 on CPU, oneDNN built in, not off)."""
    return (
        os.environ.get("SPECDEC_ONEDNN", "1") != "0"
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


class PackedLinear(nn.Module):
    """y = x @ weight.T (+ bias) for a frozen weight; x is [..., in]. The weight stays a buffer
    under the same name as in `nn.Linear`, so state dicts (and saved heads) are unchanged."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self._pack()

    def _pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None) if packing_enabled(self.weight) else None

    def _apply(self, fn, recurse=True):
        """Repack after `.to()` and friends, so the packed copy never goes stale."""
        super()._apply(fn, recurse)
        self._pack()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.numel() == x.shape[-1]:
            # One row: MKL's matrix-vector product is as fast or faster (measured at one thread:
            # a full one-token forward 81 vs 96 ms), so plain decoding keeps its fastest path.
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(module: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` inside `module` with a `PackedLinear` of the same weights (in
    place; for inference only). Returns `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
        else:
            pack_linears(child)
    return module
