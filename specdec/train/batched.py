"""Many answers decoded together in one shared KV cache (continuous batching), for `regenerate`.

Why: on the CPU a one-token step of the default target costs about 16 ms, mostly reading its
weights, while each further row of the same call costs about 4-5 ms (`specdec costs`), so 8-16
sequences stepped together make far more tokens per second than one (on 32 self-written
prompts: 153 answer tokens/s, against 68 for Hugging Face's `generate` with batch 32). All
sequences share one cache: every call writes its rows' keys and values at the next free slots,
and a mask lets each row see only the slots of its own sequence, so a sequence's position in
the cache never matters (positions are passed explicitly). On the C++ decoder stack each row is computed as in a one-token step, bit for bit.
A finished sequence leaves the batch at once and a waiting prompt takes its place; the slots
of finished sequences are squeezed out once they are half of the cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from specdec.config import SamplingParams
from specdec.sampling import warp_probs
from specdec.target import TargetRunner


@dataclass
class Answer:
    """One prompt's answer and the target's features of every token it was fed (prompt and
    answer, all but the answer's last token, which nothing follows)."""

    tokens: list[int] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)


class SharedCache:
    """A KV cache holding many sequences; `owner[slot]` is the sequence each slot belongs to."""

    def __init__(self, runner: TargetRunner, capacity: int = 1024):
        self.runner = runner
        self.kv = runner.lean.new_cache(capacity)
        self.owner = torch.empty(0, dtype=torch.long)

    @property
    def used(self) -> int:
        return self.owner.numel()

    def forward(self, ids: Sequence[int], positions: Sequence[int], owners: Sequence[int]) -> torch.Tensor:
        """Run new tokens (of any sequences, each row at its sequence's position) and return the
        final-norm features [n, d]; row i sees the earlier slots of sequence owners[i] and itself."""
        start, rows = self.used, torch.tensor(list(owners))
        self.owner = torch.cat([self.owner, rows])
        slot = torch.arange(self.used)
        mask = (self.owner[None, :] == rows[:, None]) & (slot[None, :] <= (start + torch.arange(len(rows)))[:, None])
        device = self.runner.device
        return self.runner.lean(torch.tensor(list(ids), device=device), torch.tensor(list(positions), device=device), self.kv, start, mask.to(device))

    def prefill(self, prompt: Sequence[int], owner: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's own prefill of a prompt (alone, so its attention costs nothing for the
        other sequences' slots), its keys and values then filed under `owner`. Returns
        (features [len(prompt), d], logits of the first answer token [V])."""
        own = self.runner.new_state(len(prompt))
        features, logits = self.runner.prefill(own, prompt)
        start, end = self.used, self.used + len(prompt)
        self.kv.reserve(end)
        self.kv.data[:, :, :, start:end] = own.cache.data[:, :, :, : len(prompt)]
        self.owner = torch.cat([self.owner, torch.full((len(prompt),), owner, dtype=torch.long)])
        return features, logits

    def keep_only(self, live: torch.Tensor) -> None:
        """Keep only the slots where `live` (bool [used]) is set, in their order: every later
        result is the same as without the squeeze."""
        slots = live.nonzero()[:, 0]
        self.kv.keep(0, slots.to(self.kv.data.device))
        self.owner = self.owner[slots]


@torch.inference_mode()
def decode_together(
    runner: TargetRunner,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    rows: int = 16,
    generator: torch.Generator | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[Answer]:
    """Answer every prompt (greedy, or sampled at `temperature` with `generator`), at most
    `rows` sequences stepped per call; an answer ends with an EOS or at `max_new_tokens`.
    `on_done(i)` is called as prompt i's answer ends."""
    params = SamplingParams(temperature=temperature)
    eos = set(runner.eos_token_ids)
    answers = [Answer() for _ in prompts]
    waiting, active = deque(range(len(prompts))), []
    logits: dict[int, torch.Tensor] = {}
    cache = SharedCache(runner)
    while waiting or active:
        if waiting and len(active) <= rows // 2:
            admitted = [waiting.popleft() for _ in range(min(rows - len(active), len(waiting)))]
            for i in admitted:
                features, logits[i] = cache.prefill(prompts[i], i)
                answers[i].features.append(features.cpu())
            active += admitted
        scores = torch.stack([logits.pop(i) for i in active])
        if params.greedy:
            chosen = scores.argmax(-1).tolist()
        else:
            chosen = torch.multinomial(warp_probs(scores, params).cpu(), 1, generator=generator)[:, 0].tolist()
        fed = []
        for i, token in zip(active, chosen):
            answers[i].tokens.append(token)
            if token in eos or len(answers[i].tokens) >= max_new_tokens:
                if on_done:
                    on_done(i)
            else:
                fed.append(i)
        active = fed
        if active:
            hidden = cache.forward(
                [answers[i].tokens[-1] for i in active], [len(prompts[i]) + len(answers[i].tokens) - 1 for i in active], active
            )
            for i, feature, row in zip(active, hidden, runner.lean.lm_head(hidden)):
                answers[i].features.append(feature[None].cpu())
                logits[i] = row
        live = torch.isin(cache.owner, torch.tensor(active, dtype=torch.long))
        if 2 * int(live.sum()) < cache.used:
            cache.keep_only(live)
    return answers
