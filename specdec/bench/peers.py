"""Peers measured beside our paths: Hugging Face `generate` on the same target model object,
plain and with its prompt-lookup decoding (n-gram drafts copied from the prompt)."""

from __future__ import annotations

import time
from typing import Sequence

import torch
from transformers import GenerationConfig

from specdec.config import ConfigError
from specdec.target import TargetRunner

PEER_NAMES = ("hf", "pld")


class Peer:
    """Hugging Face `generate` on the runner's model; prompt_lookup > 0 turns on its
    prompt-lookup decoding with that many draft tokens."""

    def __init__(self, name: str, runner: TargetRunner, prompt_lookup: int = 0):
        self.name, self.runner, self.prompt_lookup = name, runner, prompt_lookup
        self.eos = list(runner.eos_token_ids)

    def generate(self, prompt: Sequence[int], max_new_tokens: int, temperature: float, seed: int) -> tuple[list[int], float]:
        """New token ids (cut before the first EOS, as our loop does) and the seconds taken."""
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos or None,
            pad_token_id=self.eos[0] if self.eos else None,
            prompt_lookup_num_tokens=self.prompt_lookup or None,
            **sampling,
        )
        ids = torch.tensor([list(prompt)], device=self.runner.device)
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = self.runner.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1] :].tolist()
        end = next((i for i, t in enumerate(new) if t in self.eos), len(new))
        return new[:end], seconds


def make_peers(runner: TargetRunner, names: Sequence[str], prompt_lookup: int = 10) -> list[Peer]:
    """Peers by name: "hf" (plain greedy/sampled generate) and "pld" (prompt lookup)."""
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise ConfigError(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEER_NAMES)}")
    if prompt_lookup < 1:
        raise ConfigError(f"prompt lookup needs at least 1 draft token, got {prompt_lookup}")
    return [Peer(n, runner, prompt_lookup if n == "pld" else 0) for n in dict.fromkeys(names)]
