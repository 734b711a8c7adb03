"""The target's linear layers on the GGUF file's own quantized blocks (Q4_1, Q8_0), on CPU.

Why: the default target *is* a 4-bit model (its GGUF stores every projection in Q4_1 and the
tied embedding/LM head in Q8_0); transformers dequantizes it to float32, and reading those
540 MB per token bounds plain decoding here. The C++ kernel (`kernels/gguf_blocks.h`, AVX2)
reads the blocks themselves, 4-5x fewer bytes, and decodes each weight exactly as the
dequantization does (w = d*q + m for Q4_1, w = d*q for Q8_0, float32, one rounding) right
before multiplying it with float32 activations. The weights are therefore bit-identical to
the float32 model's and only the summation order differs: the output is the float32 model's
up to float near-ties (tests compare both paths token for token). A row's result does not
depend on the other rows of the call, which the C++ decoder stack (`specdec.llama`) builds on
to make a token's logits in a tree forward equal those of a one-token step bit for bit.

Opt-in (`int8_activations`, `TargetRunner.load(activations="int8")`): x is rounded to int8 per
block of 32 first, as llama.cpp runs a GGUF, and each block's products are exact integer sums
(one AVX-512 VNNI instruction for two blocks where the CPU has it, AVX2 otherwise, with the
same results). Two to three times faster for one row, about 1.5x for a tree's rows, and no
longer the float32 model's numbers; rows stay independent of each other, so greedy
speculative decoding still equals plain decoding on that runner exactly.

Each layer checks at load that its decoded blocks equal the float32 weight exactly (finding
the row order where the two differ: llama.cpp stores q/k rows permuted for its rotary layout,
and a loader may or may not undo that) and keeps float32 for anything that does not match.
Inputs of more than `max_rows` rows (prefill) run on the float32 weights, where oneDNN's
blocked matmul is faster. The extension (`kernels/`) compiles once on first use (about a
minute, cached by torch under ~/.cache/torch_extensions); without a compiler or AVX2
everything stays float32. `SPECDEC_GGUF_KERNELS=0` turns it off.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from specdec.packed import PackedLinear

log = logging.getLogger(__name__)

BLOCK = 32
_KERNEL_SOURCES = [Path(__file__).resolve().parent / "kernels" / name for name in ("module.cpp", "decoder.cpp", "draft_head.cpp")]
_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True)
class QuantWeight:
    """A [N, K] weight in GGUF blocks: qs uint8 [N, K/2] (Q4_1: nibbles, ggml's order) or
    [N, K] (Q8_0: int8 bits); d and m float32 [N, K/32] (m empty for Q8_0)."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    q4: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.d.shape[1] * BLOCK

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K], decoded as the kernel decodes it."""
        n, k = self.shape
        if self.q4:
            blocks = self.qs.view(n, k // BLOCK, BLOCK // 2)
            q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).float()
            return torch.addcmul(self.m[..., None], q, self.d[..., None]).view(n, k)
        q = self.qs.view(torch.int8).view(n, k // BLOCK, BLOCK).float()
        return (q * self.d[..., None]).view(n, k)

    def rows(self, index: torch.Tensor) -> "QuantWeight":
        return QuantWeight(self.qs[index].contiguous(), self.d[index].contiguous(), self.m[index].contiguous() if self.q4 else self.m, self.q4)

    @staticmethod
    def cat(parts: list["QuantWeight"]) -> "QuantWeight":
        """Rows of several weights of one kind stacked (a fused projection)."""
        if len({p.q4 for p in parts}) != 1:
            raise ValueError("cannot fuse Q4_1 and Q8_0 weights")
        q4 = parts[0].q4
        m = torch.cat([p.m for p in parts]) if q4 else parts[0].m
        return QuantWeight(torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), m, q4)


def read_gguf_weights(path: str | Path) -> dict[str, QuantWeight]:
    """Every Q4_1 and Q8_0 tensor of a GGUF file by its GGUF name (other types are skipped)."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name
        if kind not in _BLOCK_BYTES:
            continue
        k, n = (int(v) for v in t.shape[:2])  # GGUF lists the row length first
        raw = np.asarray(t.data, dtype=np.uint8).reshape(n, k // BLOCK, _BLOCK_BYTES[kind])
        d = torch.from_numpy(raw[..., :2].copy().view(np.float16)[..., 0]).float()
        if kind == "Q4_1":
            m = torch.from_numpy(raw[..., 2:4].copy().view(np.float16)[..., 0]).float()
            qs = torch.from_numpy(raw[..., 4:].copy()).reshape(n, k // 2)
            out[t.name] = QuantWeight(qs, d, m, True)
        else:
            qs = torch.from_numpy(raw[..., 2:].copy()).reshape(n, k)
            out[t.name] = QuantWeight(qs, d, torch.empty(0), False)
    return out


def match_rows(quant: QuantWeight, weight: torch.Tensor) -> QuantWeight | None:
    """`quant` with its rows ordered as `weight`'s when its decoded values equal `weight`
    exactly (in some row order); None when they do not."""
    if quant.shape != tuple(weight.shape):
        return None
    decoded = quant.dequantize()
    weight = weight.detach().float().cpu()
    if torch.equal(decoded, weight):
        return quant
    where = {row.numpy().tobytes(): i for i, row in enumerate(decoded)}
    order = [where.get(row.numpy().tobytes()) for row in weight]
    if any(i is None for i in order):
        return None
    return quant.rows(torch.tensor(order))


def kernels_enabled() -> bool:
    """Whether to try the quantized kernel at all: CPU with AVX2 and not turned off."""
    return os.environ.get("SPECDEC_GGUF_KERNELS", "1") != "0" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI with BW and VL (Linux flags; `SPECDEC_VNNI=0` says no)."""
    if os.environ.get("SPECDEC_VNNI", "1") == "0":
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx512_vnni", "avx512bw", "avx512vl"} <= flags


def kernel():
    """The compiled extension, or None when it is turned off, the CPU lacks AVX2, or it cannot
    be built here (with a warning). The one gate every user of the kernel goes through."""
    return build_kernel(has_vnni()) if kernels_enabled() else None


@lru_cache(maxsize=2)
def build_kernel(vnni: bool):
    """The extension built for AVX2, or with `vnni` also for AVX-512 VNNI (int8 products in one
    instruction per block pair, float products on two weight rows per register: the same
    results, `kernels/gguf_blocks.h`); None if it cannot build."""
    from torch.utils.cpp_extension import load

    # torch runs `ninja` from PATH; the one this project depends on sits beside the interpreter.
    scripts = sysconfig.get_path("scripts")
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
    name = "specdec_gguf_kernels"
    if vnni:  # its own build cache: a home folder copied to a CPU without VNNI never loads it
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
        name += "_vnni"
    try:
        return load(name, [str(p) for p in _KERNEL_SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no headers, a failed build: stay on float32
        log.warning("GGUF kernel unavailable, the target runs on float32 weights: %s", exc)
        return None


class GGUFLinear(nn.Module):
    """y = x @ W.T (+ bias) from GGUF blocks for inputs of at most `max_rows` rows, else
    `fallback` (the same layer on float32 weights). Inference only; its state dict is the
    fallback's (`weight`, `bias`), so a model saves as before. `int8_activations` quantizes x
    to int8 blocks too: faster and lossy (the draft head; the target only when asked,
    `TargetRunner.load(activations="int8")`)."""

    def __init__(self, quant: QuantWeight, fallback: nn.Module, max_rows: int = 16, int8_activations: bool = False):
        super().__init__()
        self.kernel = kernel()
        if self.kernel is None:
            raise RuntimeError("the GGUF kernel is not available")
        self.quant, self.max_rows, self.int8_activations = quant, max_rows, int8_activations
        self._wnorm: torch.Tensor | None = None  # the rows' weight norms, for `argmax`
        self._fallback = [fallback]  # in a list: not a submodule, so state dict keys stay put
        self.register_buffer("weight", fallback.weight)
        self.register_buffer("bias", getattr(fallback, "bias", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > self.max_rows or x.dtype != torch.float32 or x.device.type != "cpu":
            return self._fallback[0](x)
        q = self.quant
        y = self.kernel.gguf_matmul(x.reshape(rows, x.shape[-1]).contiguous(), q.qs, q.d, q.m, q.q4, self.int8_activations)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], y.shape[-1])

    @torch.inference_mode()
    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """`self(x).argmax(-1)` (lowest index on ties), for x [rows, K]. On a Q8_0 weight with
        float32 activations the int8 product screens the rows and only the few that could hold the
        maximum are computed in float32 (`kernels/greedy_head.h`): the same answer for about half
        the cost of the LM head's product."""
        rows = x.numel() // x.shape[-1]
        q = self.quant
        if q.q4 or self.int8_activations or self.bias is not None or rows > self.max_rows or x.dtype != torch.float32 or x.device.type != "cpu":
            return self(x).argmax(-1)
        if self._wnorm is None:  # norms of the decoded rows, in slices (the whole head in float64 is 200 MB)
            n = q.qs.shape[0]
            norms = [QuantWeight(q.qs[s : s + 4096], q.d[s : s + 4096], q.m, False).dequantize().double().norm(dim=1) for s in range(0, n, 4096)]
            self._wnorm = (torch.cat(norms) * (1 + 1e-6)).float()
        best = self.kernel.gguf_argmax(x.reshape(rows, x.shape[-1]).contiguous(), q.qs, q.d, q.m, q.q4, self._wnorm)
        if bool((best < 0).any()):
            return self(x).argmax(-1)
        return best.view(x.shape[:-1])


def quantize_q8_0(weight: torch.Tensor) -> QuantWeight:
    """Q8_0 blocks of a float32 weight [N, K] (K a multiple of 32): d = max|w| / 127 rounded to
    float16, q = round(w / d). Lossy: only for the draft head, whose output is a proposal."""
    n, k = weight.shape
    blocks = weight.detach().float().cpu().reshape(n, k // BLOCK, BLOCK)
    d = (blocks.abs().amax(-1) / 127).half().float()
    q = torch.where(d[..., None] > 0, blocks / d[..., None], 0.0).round().clamp(-127, 127).to(torch.int8)
    return QuantWeight(q.view(torch.uint8).reshape(n, k).contiguous(), d, torch.empty(0), False)


def quantize_linears(module: nn.Module, max_rows: int = 16, int8_activations: bool = True) -> int:
    """Replace every linear layer in `module` (nn.Linear or PackedLinear, float32, in-features a
    multiple of 32) with a `GGUFLinear` over its Q8_0 blocks (by default with int8 activations
    too); returns how many. Lossy and for inference only: the draft head's layers. Does nothing
    when the kernel is unavailable."""
    if kernel() is None:
        return 0
    count = 0
    for name, child in module.named_children():
        if not isinstance(child, (nn.Linear, PackedLinear)):
            count += quantize_linears(child, max_rows, int8_activations)
        elif child.weight.dtype == torch.float32 and child.weight.device.type == "cpu" and child.weight.shape[1] % BLOCK == 0:
            setattr(module, name, GGUFLinear(quantize_q8_0(child.weight), child, max_rows, int8_activations))
            count += 1
    return count
