"""Tiny random Llama targets and heads for fast unit tests (built in-process, no files)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.config import TreeConfig
from specdec.drafter import HeadDrafter
from specdec.head import DraftHead, HeadConfig
from specdec.target import TargetRunner


class CharTokenizer:
    """Token id i decodes to chr(65 + i % 58): enough for text streaming and stop strings."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 58) for i in ids)

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 65 for c in text]


def tiny_runner(seed: int = 0, vocab: int = 64, eos: int | None = None, max_pos: int = 512) -> TargetRunner:
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
    with torch.no_grad():  # sharpen the output a little so trees get accepted sometimes
        model.lm_head.weight.mul_(4.0)
    return TargetRunner(model, CharTokenizer(), name="tiny")


def tiny_head(runner: TargetRunner, variant: str = "fspad", seed: int = 0, draft_vocab: int | None = None) -> DraftHead:
    torch.manual_seed(seed)
    cfg = HeadConfig.for_target(runner.config, variant, draft_vocab_size=draft_vocab, target=runner.name)
    head = DraftHead(cfg, runner.embed_tokens, runner.lm_head.weight)
    if draft_vocab:
        head.set_draft_vocab(torch.arange(draft_vocab) * (runner.vocab_size // draft_vocab))
    return head


def tiny_drafter(runner: TargetRunner, tree: TreeConfig = TreeConfig(top_k=3, depth=4, total_tokens=10), **kw) -> HeadDrafter:
    return HeadDrafter(tiny_head(runner, **kw), tree)
