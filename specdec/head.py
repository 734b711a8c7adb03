"""The draft head: FSPAD and the plain EAGLE-2 baseline, one module with two switches.

Input at position i is the pair (target feature f_i, embedding of token i+1); output i is a
prediction of f_{i+1} (fed back for deeper drafts) and logits for token i+2 through the
target's frozen LM head (optionally restricted to a draft vocabulary, `d2t`).

FSPAD (arXiv 2408.15562) differs from EAGLE-2 in two places:
- feature sampling: the fused input h = fc([emb, f]) gets a residual MLP branch
  h + down(silu(gate(emb)) * up(norm(h))): the gate comes from the token embedding and the
  up-projection from the normalised fused feature, so the token "samples" the uncertain
  feature in the MLP's wide space. Without it the fusion is the plain linear fc.
- partial alignment: the decoder layer's MLP emits 2*d; the residual is the attention output
  duplicated to 2*d. The first half goes to the LM head (logit loss only), the second half is
  the predicted feature (feature loss only). Without it one d-wide output serves both.
There is no final norm before the LM head in either variant: target features are already
post-norm. The attention/MLP shapes copy the target's (our choice; the paper uses the
target's decoder layer shape too).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from specdec.config import ConfigError
from specdec.gguf_linear import GGUFLinear, QuantWeight, quantize_linears, quantize_q8_0
from specdec.llama import STACK_HEAD_DIMS, KVCache
from specdec.packed import PackedLinear, pack_linears

WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class HeadConfig:
    """Shapes of the head and of the target it belongs to."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    feature_sampling: bool = True
    partial_alignment: bool = True
    target: str = ""

    @property
    def variant(self) -> str:
        if self.feature_sampling and self.partial_alignment:
            return "fspad"
        if not self.feature_sampling and not self.partial_alignment:
            return "eagle2"
        return "fspad-ablation"

    @classmethod
    def for_target(
        cls, target_config, variant: str = "fspad", draft_vocab_size: int | None = None, target: str = "", **switches: bool
    ) -> "HeadConfig":
        """Head shapes derived from a transformers Llama config; variant "fspad" or "eagle2"."""
        if variant not in ("fspad", "eagle2"):
            raise ConfigError(f"unknown head variant {variant!r} (fspad or eagle2)")
        on = variant == "fspad"
        rope = getattr(target_config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0))
        heads = target_config.num_attention_heads
        return cls(
            hidden_size=target_config.hidden_size,
            intermediate_size=target_config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(target_config, "num_key_value_heads", heads) or heads,
            head_dim=getattr(target_config, "head_dim", None) or target_config.hidden_size // heads,
            vocab_size=target_config.vocab_size,
            draft_vocab_size=draft_vocab_size or target_config.vocab_size,
            rms_norm_eps=target_config.rms_norm_eps,
            rope_theta=float(theta),
            feature_sampling=switches.get("feature_sampling", on),
            partial_alignment=switches.get("partial_alignment", on),
            target=target,
        )


class HeadCache:
    """The head's KV cache in training (unrolled steps): [..., kv_heads, length, head_dim]
    tensors grown by concatenation, which autograd follows. Drafting uses `DraftKV`."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=-2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=-2)
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[..., :length, :], self.values[..., :length, :]


class DraftKV:
    """The head's KV cache while drafting: one buffer written in place and grown by doubling
    (`specdec.llama.KVCache`), as the C++ head forward needs; the Python forward appends to it
    too. Training keeps `HeadCache`, whose concatenation autograd can see through."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str, capacity: int = 256):
        self.buffer = KVCache(1, kv_heads, head_dim, dtype, device, capacity)
        self.length = 0

    def reserve(self, rows: int) -> torch.Tensor:
        """Room for `rows` more entries; returns the buffer [2, kv_heads, capacity, head_dim]."""
        self.buffer.reserve(self.length + rows)
        return self.buffer.data[0]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[-2]
        data = self.reserve(k.shape[-2])
        data[0, :, self.length : end], data[1, :, self.length : end] = k, v
        self.length = end
        return data[0, :, :end], data[1, :, :end]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


# The most rows one C++ head forward takes; more (a long prompt's features) run the module's
# forward. Measured on the 2-core CPU (default head, int8 activations): 4 / 16 / 32 / 64 rows
# 0.5 / 1.4 / 2.8 / 5.5 ms in C++ against 1.1 / 2.1 / 4.5 / 6.8 ms through the module, even at
# 128 rows (10.0 / 10.2 ms), faster from there through the module.
STACK_ROWS = 64


@dataclass(frozen=True)
class _HeadStack:
    """Arguments of the C++ head forward (`kernels/draft_head.cpp`): norm weights and the Q8_0
    (qs, d, m) tensors of every projection, q/k/v and the MLP's gate/up fused."""

    kernel: object
    norms: list[torch.Tensor]
    blocks: list[torch.Tensor]
    int8_activations: bool
    max_rows: int  # larger inputs (a prompt's features) run the Python forward


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class _Attention(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [..., T, head_dim] at `positions` [..., T]."""
        angles = positions.float()[..., None] * self.inv_freq
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotary_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`rotary(positions, float32)` for drafting, looked up in a table of every position up
        to the largest asked for so far (grown by doubling). Why: a drafting step asks for a few
        positions right after a target forward, where computing them (six small tensor ops) took
        about 0.08 ms a step on the 2-core CPU, and a lookup a fraction of that."""
        end = int(positions.max()) + 1
        if self._table is None or self._table[0].shape[0] < end or self._table[0].device != positions.device:
            size = max(end, 2 * self._table[0].shape[0] if self._table is not None else 512)
            self._table = self.rotary(torch.arange(size, device=positions.device), torch.float32)
        cos, sin = self._table
        return cos[positions], sin[positions]

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(positions, x.dtype)
        return x * cos.unsqueeze(-3) + _rotate_half(x) * sin.unsqueeze(-3)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: HeadCache | DraftKV | None
    ) -> torch.Tensor:
        """x: [..., T, d]; positions [..., T]; mask bool [T, S] (True = may attend) or None
        (causal). With a cache, S = cached + T."""
        *lead, t, _ = x.shape
        q = self.q_proj(x).view(*lead, t, self.heads, self.head_dim).transpose(-2, -3)
        k = self.k_proj(x).view(*lead, t, self.kv_heads, self.head_dim).transpose(-2, -3)
        v = self.v_proj(x).view(*lead, t, self.kv_heads, self.head_dim).transpose(-2, -3)
        q, k = self._rope(q, positions), self._rope(k, positions)
        if cache is not None:
            k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, enable_gqa=self.heads != self.kv_heads
        )
        return self.o_proj(out.transpose(-2, -3).reshape(*lead, t, self.heads * self.head_dim))


class _GatedMLP(nn.Module):
    """down(silu(gate(a)) * up(b)); a and b are the same input in a plain Llama MLP."""

    def __init__(self, d_in: int, d_inner: int, d_out: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_in, d_inner, bias=False)
        self.up_proj = nn.Linear(d_in, d_inner, bias=False)
        self.down_proj = nn.Linear(d_inner, d_out, bias=False)

    def forward(self, gate_in: torch.Tensor, up_in: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(gate_in)) * self.up_proj(up_in))


class DraftHead(nn.Module):
    """One fusion + one decoder layer over the target's frozen embedding and LM head."""

    def __init__(self, cfg: HeadConfig, embed_tokens: nn.Embedding, lm_head_weight: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        if embed_tokens.weight.shape != (cfg.vocab_size, d) or lm_head_weight.shape != (cfg.vocab_size, d):
            raise ConfigError(
                f"head expects a target with vocab {cfg.vocab_size} and hidden size {d}, "
                f"got embedding {tuple(embed_tokens.weight.shape)}"
            )
        # Frozen target modules: referenced, never trained, never saved with the head.
        self.embed_tokens = [embed_tokens]
        self._lm_head_full = lm_head_weight.detach()
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.fs_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps) if cfg.feature_sampling else None
        self.fs_mlp = _GatedMLP(d, cfg.intermediate_size, d) if cfg.feature_sampling else None
        self.input_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.attn = _Attention(cfg)
        self.post_attn_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        width = 2 * d if cfg.partial_alignment else d
        self.mlp = _GatedMLP(d, cfg.intermediate_size, width)
        self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size), persistent=True)
        self.register_buffer("draft_lm_head", torch.empty(0), persistent=False)
        # Set by `pack_for_inference`; in a list so that it is not a submodule (never saved).
        self._packed_lm_head: list[PackedLinear] = []
        self._stack: _HeadStack | None = None  # set by `quantize_for_inference` (CPU, kernel built)
        self._refresh_lm_head()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 1.0 / math.sqrt(self.cfg.hidden_size)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std)
            if name.endswith("down_proj.weight") or name.endswith("o_proj.weight"):
                nn.init.normal_(p, std=std / 4)

    def set_draft_vocab(self, d2t: torch.Tensor) -> None:
        """Restrict drafting to target token ids `d2t` (ascending, unique)."""
        if d2t.numel() != self.cfg.draft_vocab_size:
            raise ConfigError(f"d2t has {d2t.numel()} ids, config says {self.cfg.draft_vocab_size}")
        self.d2t.copy_(d2t.to(self.d2t.device))
        self._refresh_lm_head()

    def with_draft_vocab(self, d2t: torch.Tensor) -> "DraftHead":
        """A copy of this head drafting over `d2t` (ascending target ids), with the same weights.
        Valid because the draft LM head is rows of the target's frozen one: the trained layers
        do not depend on which rows. Only ids this head was trained on may be kept (its softmax
        never saw the others, so their logits mean nothing)."""
        d2t = d2t.to(torch.int64).cpu()
        if d2t.numel() == 0 or not torch.isin(d2t, self.d2t.cpu()).all():
            raise ConfigError("the new draft vocabulary must be a non-empty subset of the head's own")
        if not torch.equal(d2t, d2t.unique()):
            raise ConfigError("d2t must be ascending and unique")
        param = self.fc.weight
        copy = DraftHead(replace(self.cfg, draft_vocab_size=d2t.numel()), self.embed_tokens[0], self._lm_head_full)
        copy.load_state_dict({**self.state_dict(), "d2t": d2t})
        copy._refresh_lm_head()
        return copy.to(param.device, param.dtype)

    def _refresh_lm_head(self) -> None:
        full = self._lm_head_full
        if self.cfg.draft_vocab_size != self.cfg.vocab_size:
            full = full.index_select(0, self.d2t.to(full.device))
        self.draft_lm_head = full.to(self.fc.weight.device, self.fc.weight.dtype).contiguous()
        if self._packed_lm_head:
            self._packed_lm_head = [PackedLinear(self.draft_lm_head)]

    def pack_for_inference(self) -> "DraftHead":
        """Run every linear layer and the draft LM head on oneDNN-packed weights where that
        applies (`specdec.packed`: float32 on CPU). Inference only: packed layers have no
        gradient. Saving still works. Packing a packed head does nothing."""
        if not self._packed_lm_head:
            pack_linears(self)
            self._packed_lm_head = [PackedLinear(self.draft_lm_head)]
        return self

    def quantize_for_inference(self, int8_activations: bool = True) -> "DraftHead":
        """Pack the head (`pack_for_inference`), then run its linear layers and draft LM head on
        Q8_0 blocks where the kernel builds (`specdec.gguf_linear`: CPU, float32), with int8
        activations unless told otherwise, and its whole forward in one C++ call (`step`).
        Lossy, which a drafter may be: its trees are proposals the target verifies. Drafting on
        this CPU is bound by the products' arithmetic: Q8_0 weights read 3.8x fewer bytes than
        float32, and int8 activations make each block's dot product integer arithmetic."""
        self.pack_for_inference()
        if quantize_linears(self, int8_activations=int8_activations):
            lm_head = GGUFLinear(quantize_q8_0(self.draft_lm_head), self._packed_lm_head[0], int8_activations=int8_activations)
            self._packed_lm_head = [lm_head]
        self._prepare_stack()
        return self

    def _prepare_stack(self) -> None:
        """Hand the C++ head forward its weights when every projection is on Q8_0 blocks."""
        attn, mlp = self.attn, self.mlp
        groups = [[self.fc]]
        norms = [self.input_norm, self.post_attn_norm]
        if self.fs_mlp is not None:
            groups += [[self.fs_mlp.gate_proj], [self.fs_mlp.up_proj], [self.fs_mlp.down_proj]]
            norms.insert(0, self.fs_norm)
        groups += [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]]
        layers = [layer for group in groups for layer in group]
        if self.cfg.head_dim not in STACK_HEAD_DIMS or not all(isinstance(layer, GGUFLinear) and layer.bias is None for layer in layers):
            return
        if len({layer.int8_activations for layer in layers}) != 1:
            raise ValueError("the head's layers disagree on int8 activations")
        fused = [QuantWeight.cat([layer.quant for layer in group]) for group in groups]
        self._stack = _HeadStack(
            kernel=layers[0].kernel,
            norms=[norm.weight.detach().float().contiguous() for norm in norms],
            blocks=[t for quant in fused for t in (quant.qs, quant.d, quant.m)],
            int8_activations=layers[0].int8_activations,
            max_rows=STACK_ROWS,
        )

    def new_draft_cache(self) -> DraftKV:
        param = self.fc.weight
        return DraftKV(self.cfg.num_key_value_heads, self.cfg.head_dim, param.dtype, param.device)

    def step(
        self, features: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: DraftKV
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for drafting one sequence (features [T, d], inference): `step_many` of one.
        mask: bool [T, cached + T], or None for causal (each new row sees the cache and the new
        rows up to itself)."""
        return self.step_many(features, next_tokens, positions, [mask], [cache], [features.shape[0]])

    def step_many(
        self, features: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor, masks: Sequence[torch.Tensor | None],
        caches: Sequence[DraftKV], rows: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` for many sequences at once (a batched proposal): sequence s owns the next
        `rows[s]` rows of features [T, d], next_tokens and positions, its own cache and mask.
        When the head runs on Q8_0 blocks, consecutive sequences share C++ calls of up to
        `batch_rows` rows (each row's result is the same alone or batched); a longer sequence,
        or any without the C++ forward, runs the module's own forward on its own."""
        stack, limit = self._stack, self.batch_rows if features.dim() == 2 else 0
        groups: list[list[int]] = []  # consecutive sequences whose rows fit one C++ call; a longer one alone
        size = limit
        for s, n in enumerate(rows):
            if size + n > limit:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += n
        starts = [0, *itertools.accumulate(rows)]
        outs = []
        for group in groups:
            piece = slice(starts[group[0]], starts[group[-1] + 1])
            count = piece.stop - piece.start
            if count > limit:
                (s,) = group
                mask, cache = masks[s], caches[s]
                if mask is None and cache.length and count > 1:  # the module's None is causal among the new rows alone
                    mask = torch.ones(count, cache.length + count, dtype=torch.bool, device=features.device)
                    mask[:, cache.length :] = torch.ones(count, count, dtype=torch.bool, device=features.device).tril()
                outs.append(self(features[piece], next_tokens[piece], positions[piece], mask, cache))
                continue
            emb = self.embed_tokens[0](next_tokens[piece]).to(features.dtype)
            cos, sin = self.attn.rotary_at(positions[piece])
            cfg = self.cfg
            outs.append(stack.kernel.head_forward(
                emb.contiguous(), features[piece].contiguous(), [caches[s].reserve(rows[s]) for s in group],
                [caches[s].length for s in group], [rows[s] for s in group], [masks[s] for s in group], cos, sin, stack.norms,
                stack.blocks, cfg.feature_sampling, cfg.partial_alignment, cfg.num_attention_heads, cfg.num_key_value_heads,
                1.0 / math.sqrt(cfg.head_dim), cfg.rms_norm_eps, stack.int8_activations,
            ))
            for s in group:
                caches[s].length += rows[s]
        if len(outs) == 1:
            return outs[0]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    @property
    def batch_rows(self) -> int:
        """The most rows one C++ call of `step_many` takes (a sequence with more runs the
        module's forward alone: a prompt's features)."""
        return self._stack.max_rows if self._stack is not None else 0

    def forward(
        self,
        features: torch.Tensor,
        next_tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: HeadCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features [..., T, d], next_tokens [..., T] (target ids), positions [..., T].

        Returns (logit hidden [..., T, d] for `logits`, predicted next feature [..., T, d]).
        """
        emb = self.embed_tokens[0](next_tokens).to(features.dtype)
        h = self.fc(torch.cat([emb, features], dim=-1))
        if self.fs_mlp is not None:
            h = h + self.fs_mlp(emb, self.fs_norm(h))
        a = h + self.attn(self.input_norm(h), positions, mask, cache)
        normed = self.post_attn_norm(a)
        m = self.mlp(normed, normed)
        if self.cfg.partial_alignment:
            out = torch.cat([a, a], dim=-1) + m
            d = self.cfg.hidden_size
            return out[..., :d], out[..., d:]
        out = a + m
        return out, out

    def logits(self, logit_hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., draft_vocab]; map indices to target ids with `d2t`."""
        if self._packed_lm_head:
            return self._packed_lm_head[0](logit_hidden)
        return logit_hidden @ self.draft_lm_head.to(logit_hidden.dtype).T

    def save(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in self.state_dict().items()
        }
        save_file(tensors, directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps({**asdict(self.cfg), "variant": self.cfg.variant}, indent=2))

    @classmethod
    def load(
        cls, directory: str | Path, embed_tokens: nn.Embedding, lm_head_weight: torch.Tensor, target_config=None
    ) -> "DraftHead":
        """Load a saved head onto a target's frozen embedding and LM head; refuses a head made
        for a target of another shape. Weights come back in the embedding's dtype/device."""
        directory = Path(directory)
        try:
            raw = json.loads((directory / CONFIG_FILE).read_text())
            raw.pop("variant", None)
            cfg = HeadConfig(**raw)
            tensors = load_file(directory / WEIGHTS_FILE)
        except FileNotFoundError as exc:
            raise ConfigError(f"head {directory}: missing {Path(exc.filename).name}") from exc
        except Exception as exc:  # corrupt JSON or safetensors of any kind
            raise ConfigError(f"head {directory} is corrupt or unreadable: {exc}") from exc
        if target_config is not None and (
            cfg.hidden_size != target_config.hidden_size or cfg.vocab_size != target_config.vocab_size
        ):
            raise ConfigError(
                f"head {directory} was made for a target with hidden {cfg.hidden_size} and vocab "
                f"{cfg.vocab_size}; this target has {target_config.hidden_size} and {target_config.vocab_size}"
            )
        head = cls(cfg, embed_tokens, lm_head_weight)
        try:
            head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
        except RuntimeError as exc:
            raise ConfigError(f"head {directory} does not match its config: {exc}") from exc
        head._refresh_lm_head()
        return head.to(device=embed_tokens.weight.device, dtype=embed_tokens.weight.dtype)
