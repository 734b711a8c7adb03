"""A lean forward pass for Llama-family models over a transformers model's own weights.

Why not call the transformers module: on a 2-core CPU a one-token step of a 135M model is
dominated by per-operation overhead (mask building, cache bookkeeping, dozens of small ops per
layer), not by reading the weights. This forward does the same math with fewer operations:
query/key/value and gate/up projections fused into one matrix each (the transformers module's
weights become views into the fused matrices), rotary tables computed once, one growable KV
tensor per sequence for all layers, an accepted-path commit that is a single gather over that
tensor, and every projection and the LM head run on oneDNN-packed weights on CPU
(`specdec.packed`), or on the GGUF file's own quantized blocks when the target came from one
(`use_gguf`, `specdec.gguf_linear`). When every layer runs on GGUF blocks, a step of up to
16 tokens runs the whole decoder stack in one C++ call (`kernels/decoder.cpp`): no Python or
allocation per layer, and each row's result independent of the rows beside it. Results match
transformers' forward to float rounding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from specdec.config import ConfigError
from specdec.gguf_linear import GGUFLinear, QuantWeight, match_rows
from specdec.packed import PackedLinear


class KVCache:
    """One sequence's keys and values for every layer: [layers, 2, kv_heads, capacity, head_dim].

    Capacity grows by doubling, so appending is amortised O(1) and memory follows the sequence
    (a fixed 8k-token cache would be ~380 MB per sequence for the default target).
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 256):
        self.data = torch.empty(layers, 2, kv_heads, capacity, head_dim, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.data.shape[3]

    def reserve(self, length: int) -> None:
        if length > self.capacity:
            grown = torch.empty(
                *self.data.shape[:3], max(length, 2 * self.capacity), self.data.shape[4], dtype=self.data.dtype, device=self.data.device
            )
            grown[:, :, :, : self.capacity] = self.data
            self.data = grown

    def clone(self) -> "KVCache":
        copy = KVCache.__new__(KVCache)
        copy.data = self.data.clone()
        return copy

    def keep(self, start: int, rows: torch.Tensor) -> None:
        """Move entries at absolute positions `rows` to start, start+1, ... (in that order)."""
        self.data[:, :, :, start : start + rows.numel()] = self.data.index_select(3, rows)


# transformers' Llama projections and the GGUF tensor names of their weights.
_GGUF_NAMES = {
    "qkv": ("self_attn", ("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")),
    "o": ("self_attn", ("o_proj", "attn_output")),
    "gate_up": ("mlp", ("gate_proj", "ffn_gate"), ("up_proj", "ffn_up")),
    "down": ("mlp", ("down_proj", "ffn_down")),
}


class _RMSNorm:
    """A transformers RMSNorm's weight and epsilon applied by one fused op (its module spends
    six ops per call, and a one-token step makes 61 calls)."""

    def __init__(self, norm: nn.Module):
        self.weight = norm.weight
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


STACK_HEAD_DIMS = (8, 16, 32, 64, 128)  # what the C++ attention is built for (kernels/layer_ops.h)


@dataclass(frozen=True)
class _Stack:
    """The C++ decoder stack's arguments: per layer two norm weights and the (qs, d, m) block
    tensors and kind of four projections (q/k/v, output, gate/up, down)."""

    kernel: object
    norms: list[torch.Tensor]
    blocks: list[torch.Tensor]
    q4: list[bool]
    eps: float
    max_rows: int  # larger inputs (a prefill) run the Python path on float32 weights
    int8_activations: bool


class _Layer:
    """One decoder layer's norms and projections, q/k/v and gate/up fused."""

    def __init__(self, layer: nn.Module):
        self.module = layer
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(mlp, "gate_proj", None) is None or getattr(mlp.gate_proj, "bias", None) is not None:
            raise ConfigError("unsupported MLP: a Llama-family gated MLP without biases is expected")
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        biases = [p.bias for p in qkv]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(p.out_features) for b, p in zip(biases, qkv)])
        self.input_norm = _RMSNorm(layer.input_layernorm)
        self.post_norm = _RMSNorm(layer.post_attention_layernorm)
        self.qkv = PackedLinear(_fuse(qkv), bias)
        self.o = PackedLinear(attn.o_proj.weight)
        self.gate_up = PackedLinear(_fuse([mlp.gate_proj, mlp.up_proj]))
        self.down = PackedLinear(mlp.down_proj.weight)


class LeanLlama(nn.Module):
    """Forward of a transformers Llama-family causal LM (decoder stack, final norm, LM head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = model.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported activation {cfg.hidden_act!r} (Llama-family models use silu)")
        self.config = cfg
        body = model.model
        self.embed = body.embed_tokens
        self.norm = _RMSNorm(body.norm)
        self.layers = [_Layer(layer) for layer in body.layers]
        self.lm_head = PackedLinear(model.get_output_embeddings().weight)
        attn = body.layers[0].self_attn
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        param = next(model.parameters())
        positions = torch.arange(cfg.max_position_embeddings, device=param.device)[None]
        cos, sin = body.rotary_emb(param[:1].float(), positions)
        self.register_buffer("cos", cos[0].to(param.dtype), persistent=False)
        self.register_buffer("sin", sin[0].to(param.dtype), persistent=False)
        self._stack: _Stack | None = None  # set by `use_gguf` when every projection is on GGUF blocks

    def use_gguf(self, model: nn.Module, weights: dict[str, QuantWeight], int8_activations: bool = False) -> int:
        """Run every projection (and the LM head) whose float32 weight equals a GGUF tensor in
        `weights` on those blocks (`specdec.gguf_linear`); the rest stay float32. With
        `int8_activations` their inputs are quantized to int8 blocks as llama.cpp does (faster,
        and no longer the float32 model's numbers). Returns how many of the model's linear
        layers now read quantized blocks."""
        converted = 0
        for i, layer in enumerate(self.layers):
            for attr, (parent, *parts) in _GGUF_NAMES.items():
                owner = getattr(layer.module, parent)
                found = [_match(weights.get(f"blk.{i}.{gguf}.weight"), getattr(owner, hf).weight) for hf, gguf in parts]
                current = getattr(layer, attr)
                if all(f is not None for f in found) and current.bias is None:
                    setattr(layer, attr, GGUFLinear(QuantWeight.cat(found), current, int8_activations=int8_activations))
                    converted += len(found)
        head = weights.get("output.weight", weights.get("token_embd.weight"))
        found = _match(head, model.get_output_embeddings().weight)
        if found is not None:
            self.lm_head = GGUFLinear(found, self.lm_head, int8_activations=int8_activations)
            converted += 1
        self._prepare_stack()
        return converted

    def _prepare_stack(self) -> None:
        """Hand the C++ decoder stack its weights when every projection is on GGUF blocks."""
        projections = [getattr(layer, name) for layer in self.layers for name in ("qkv", "o", "gate_up", "down")]
        norms = [norm for layer in self.layers for norm in (layer.input_norm, layer.post_norm)]
        if (
            not all(isinstance(p, GGUFLinear) and p.bias is None for p in projections)
            or len({n.eps for n in norms}) != 1
            or self.head_dim not in STACK_HEAD_DIMS
        ):
            return
        self._stack = _Stack(
            kernel=projections[0].kernel,
            norms=[n.weight.detach().float().contiguous() for n in norms],
            blocks=[t for p in projections for t in (p.quant.qs, p.quant.d, p.quant.m)],
            q4=[p.quant.q4 for p in projections],
            eps=norms[0].eps,
            max_rows=min(p.max_rows for p in projections),
            int8_activations=projections[0].int8_activations,
        )

    @property
    def stack_rows(self) -> int:
        """The most rows a call runs on the C++ decoder stack (0: no stack, every call runs the
        Python path)."""
        return self._stack.max_rows if self._stack is not None else 0

    def new_cache(self, capacity: int = 256) -> KVCache:
        param = self.embed.weight
        return KVCache(len(self.layers), self.kv_heads, self.head_dim, param.dtype, param.device, capacity)

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """ids, positions: [n]. Writes the n new keys/values at cache slots start..start+n-1 and
        attends over slots 0..start+n-1. mask: bool [n, start+n] (True = may attend), or None
        for causal attention among the new tokens (with everything before them visible).
        Returns the final-norm hidden states [n, d]."""
        return self.forward_batch([Segment(ids, positions, cache, start, mask)])

    def forward_batch(self, segments: Sequence[Segment]) -> torch.Tensor:
        """`forward` for the new tokens of many sequences in one pass: every projection and the
        MLP run over all their rows at once (one read of the weights for the whole batch), the
        attention of each sequence over its own cache with its own mask. Returns the final-norm
        hidden states of all rows, [sum of n, d], in segment order. On the C++ decoder stack a
        row's result is bit for bit what `forward` gives for its sequence alone."""
        for seg in segments:
            seg.cache.reserve(seg.start + seg.ids.shape[0])
        ids = torch.cat([seg.ids for seg in segments]) if len(segments) > 1 else segments[0].ids
        positions = torch.cat([seg.positions for seg in segments]) if len(segments) > 1 else segments[0].positions
        stack = self._stack
        if stack is not None and ids.device.type == "cpu" and all(seg.ids.shape[0] <= stack.max_rows for seg in segments):
            x = stack.kernel.decoder_forward(
                self.embed(ids).contiguous(), [seg.cache.data for seg in segments], [seg.start for seg in segments],
                [seg.ids.shape[0] for seg in segments], [seg.mask for seg in segments], self.cos[positions], self.sin[positions],
                stack.norms, stack.blocks, stack.q4, self.heads, self.kv_heads, self.scale, stack.eps, stack.int8_activations,
            )
            return self.norm(x)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [n, 1, hd]
        hq, hk, hd = self.heads, self.kv_heads, self.head_dim
        n = ids.shape[0]
        x = self.embed(ids)
        bounds = [0]
        for seg in segments:
            bounds.append(bounds[-1] + seg.ids.shape[0])
        masks = [_attention_mask(seg) for seg in segments]
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(layer.input_norm(x)).view(n, hq + 2 * hk, hd)
            qk, v = qkv.split([hq + hk, hk], dim=1)
            q, k = (qk * cos + _rotate_half(qk) * sin).split([hq, hk], dim=1)  # rotary on q and k at once
            outs = []
            for seg, lo, hi, (mask, causal) in zip(segments, bounds, bounds[1:], masks):
                kv, start, end = seg.cache.data, seg.start, seg.start + hi - lo
                kv[i, 0, :, start:end] = k[lo:hi].transpose(0, 1)
                kv[i, 1, :, start:end] = v[lo:hi].transpose(0, 1)
                out = F.scaled_dot_product_attention(
                    q[lo:hi].transpose(0, 1)[None],
                    kv[i, 0, :, :end][None],
                    kv[i, 1, :, :end][None],
                    attn_mask=mask,
                    is_causal=causal,
                    scale=self.scale,
                    enable_gqa=hq != hk,
                )
                outs.append(out[0].transpose(0, 1).reshape(hi - lo, hq * hd))
            x = x + layer.o(torch.cat(outs) if len(outs) > 1 else outs[0])
            gate, up = layer.gate_up(layer.post_norm(x)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return self.norm(x)


@dataclass
class Segment:
    """One sequence's part of a batched forward: its new tokens and their positions [n], the
    cache slots start..start+n-1 they are written to, and their mask (see `LeanLlama.forward`)."""

    ids: torch.Tensor
    positions: torch.Tensor
    cache: KVCache
    start: int
    mask: torch.Tensor | None


def _attention_mask(seg: Segment) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for scaled_dot_product_attention over a segment's visible slots."""
    n = seg.ids.shape[0]
    if seg.mask is not None or n == 1:
        return seg.mask, False
    if seg.start:
        return torch.ones(n, seg.start + n, dtype=torch.bool, device=seg.ids.device).tril(seg.start), False
    return None, True


def _match(quant: QuantWeight | None, weight: torch.Tensor) -> QuantWeight | None:
    return None if quant is None else match_rows(quant, weight)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _fuse(linears: list[nn.Linear]) -> torch.Tensor:
    """Concatenate the weights; the original Linear weights become views of the fused tensor,
    so transformers' own forward keeps working on the same memory."""
    fused = torch.cat([p.weight.detach() for p in linears], dim=0)
    for p, view in zip(linears, fused.split([p.out_features for p in linears], dim=0)):
        p.weight = nn.Parameter(view, requires_grad=False)
    return fused
