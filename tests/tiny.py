"""Tiny random Llama targets and heads for fast unit tests (built in-process, no files)."""

from __future__ import annotations

import time

import torch
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.config import TreeConfig
from specdec.drafter import Drafter, DrafterUnavailable, DraftSession, HeadDrafter
from specdec.gguf_linear import QuantWeight, quantize_q8_0
from specdec.head import DraftHead, HeadConfig
from specdec.llama import LeanLlama
from specdec.target import TargetRunner
from specdec.tree import DraftTree


class CharTokenizer:
    """Token id i decodes to chr(65 + i % 58): enough for text streaming and stop strings."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 58) for i in ids)

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 65 for c in text]


def tiny_runner(
    seed: int = 0, vocab: int = 64, eos: int | None = None, max_pos: int = 512, sharpness: float = 4.0
) -> TargetRunner:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # sharpen the output so that trees get accepted sometimes
        model.lm_head.weight.mul_(sharpness)
    return TargetRunner(model, CharTokenizer(), name="tiny")


def quantize_q4_1(weight: torch.Tensor) -> QuantWeight:
    """Q4_1 blocks of a float32 weight as llama.cpp writes them: per 32 weights a float16 scale
    d = (max - min) / 15 and minimum m, q = round((w - m) / d) in 0..15, element j in the low
    nibble of byte j and element j + 16 in its high nibble."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // 32, 32)
    m = blocks.amin(-1).half().float()
    d = ((blocks.amax(-1) - m) / 15).half().float().clamp_min(1e-4)
    q = ((blocks - m[..., None]) / d[..., None]).round().clamp(0, 15).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)
    return QuantWeight(qs.reshape(n, k // 2).contiguous(), d, m, True)


# GGUF tensor names of a Llama layer's projections and the block kind the default target uses
# for each (True: Q4_1, False: Q8_0); mixed so that both kinds meet in one layer.
_GGUF_LAYER = {
    ("self_attn", "q_proj"): ("attn_q", True),
    ("self_attn", "k_proj"): ("attn_k", True),
    ("self_attn", "v_proj"): ("attn_v", True),
    ("self_attn", "o_proj"): ("attn_output", False),
    ("mlp", "gate_proj"): ("ffn_gate", False),
    ("mlp", "up_proj"): ("ffn_up", False),
    ("mlp", "down_proj"): ("ffn_down", True),
}


def tiny_gguf_runner(seed: int = 0, int8_activations: bool = False, **kw) -> TargetRunner:
    """A tiny target whose weights are replaced by GGUF blocks (and their exact float32 decoding),
    running on the block kernels and the C++ decoder stack as the default target does (with
    float32 or int8 activations)."""
    runner = tiny_runner(seed, **kw)
    model, weights = runner.model, {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for (parent, name), (gguf, q4) in _GGUF_LAYER.items():
                linear = getattr(getattr(layer, parent), name)
                quant = quantize_q4_1(linear.weight) if q4 else quantize_q8_0(linear.weight)
                linear.weight.copy_(quant.dequantize())
                weights[f"blk.{i}.{gguf}.weight"] = quant
        quant = quantize_q8_0(model.lm_head.weight)
        model.lm_head.weight.copy_(quant.dequantize())
        weights["output.weight"] = quant
    runner.lean = LeanLlama(model)
    runner.lean.use_gguf(model, weights, int8_activations)
    return runner


def tiny_head(runner: TargetRunner, variant: str = "fspad", seed: int = 0, draft_vocab: int | None = None) -> DraftHead:
    torch.manual_seed(seed)
    cfg = HeadConfig.for_target(runner.config, variant, draft_vocab_size=draft_vocab, target=runner.name)
    head = DraftHead(cfg, runner.embed_tokens, runner.lm_head.weight)
    if draft_vocab:
        head.set_draft_vocab(torch.arange(draft_vocab) * (runner.vocab_size // draft_vocab))
    return head


def tiny_drafter(runner: TargetRunner, tree: TreeConfig = TreeConfig(top_k=3, depth=4, total_tokens=10, min_prob=0.0), **kw) -> HeadDrafter:
    return HeadDrafter(tiny_head(runner, **kw), tree)


class OracleDrafter(Drafter):
    """A test drafter that looks at the target itself: for the root it proposes the target's
    `width` most likely tokens, each followed by the target's greedy chain. Trees are therefore
    often (not always) accepted deep, which exercises every commit length."""

    def __init__(self, runner: TargetRunner, width: int = 2, depth: int = 3, fail_every: int = 0):
        self.runner, self.width, self.depth, self.fail_every = runner, width, depth, fail_every
        self.proposals = 0

    @property
    def budget(self) -> int:
        return 1 + self.width * self.depth

    def open(self, token_ids, features) -> "OracleSession":
        return OracleSession(self, list(token_ids))


class OracleSession(DraftSession):
    def __init__(self, drafter: OracleDrafter, tokens: list[int]):
        self.drafter, self.tokens = drafter, tokens

    def extend(self, token_ids, features) -> None:
        assert features.shape[0] == len(token_ids)
        self.tokens += list(token_ids)

    @torch.inference_mode()
    def _next_logits(self, ids: list[int]) -> torch.Tensor:
        runner = self.drafter.runner
        return runner.model(input_ids=torch.tensor([ids], device=runner.device)).logits[0, -1]

    def propose(self) -> DraftTree:
        d = self.drafter
        d.proposals += 1
        if d.fail_every and d.proposals % d.fail_every == 0:
            raise DrafterUnavailable("oracle drafter simulated outage")
        tokens, parents = [self.tokens[-1]], [-1]
        for first in torch.topk(self._next_logits(self.tokens), d.width).indices.tolist():
            seq, parent = self.tokens + [first], 0
            tokens.append(first)
            parents.append(parent)
            for _ in range(d.depth - 1):
                parent = len(tokens) - 1
                nxt = int(self._next_logits(seq).argmax())
                seq.append(nxt)
                tokens.append(nxt)
                parents.append(parent)
        return DraftTree(tokens, parents)

    def close(self) -> None:
        self.tokens = []


class SlowDrafter(HeadDrafter):
    """A head drafter whose proposals each take `delay` extra seconds (deadline tests)."""

    def __init__(self, inner: HeadDrafter, delay: float):
        super().__init__(inner.head, inner.tree)
        self.delay = delay

    def open(self, token_ids, features):
        session = super().open(token_ids, features)
        propose = session.propose

        def slow_propose():
            time.sleep(self.delay)
            return propose()

        session.propose = slow_propose
        return session

    def propose_many(self, sessions):
        time.sleep(self.delay * len(sessions))
        return super().propose_many(sessions)


@st.composite
def draft_trees(draw, vocab: int, max_nodes: int = 12) -> DraftTree:
    """Any valid draft tree of up to `max_nodes` nodes over token ids below `vocab`."""
    n = draw(st.integers(1, max_nodes))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
    return DraftTree(tokens, parents)
