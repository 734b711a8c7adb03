"""Continuous batching: many generations advanced together, one target forward per round.

A generation joins at the next step and leaves as soon as it finishes, fails or is cancelled,
without waiting for the others. Each step runs one piece of one new prompt's prefill (the oldest
first, at most `Generation.prefill_chunk` tokens, so a long prompt delays the others' next
round by one chunk at a time, not by its whole prefill) and then one decode round for every
generation past its prefill (`specdec.generate.decode_round`: all their trees in one forward,
each with its own KV cache, positions and mask; each commits its own accepted path). With a
`SpeculationBudget` the round drafts and verifies only what pays at the batch's size.

No threads and no I/O here: the verifier's scheduler calls `step` from its engine thread, and
`specdec bench --concurrency` from its own loop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from specdec.budget import SpeculationBudget
from specdec.generate import Chunk, Generation, Round, decode_round
from specdec.target import TargetRunner


@dataclass
class BatchStats:
    """Counters over the batch's life: rounds by batch size, forwards by rows, and requests'
    rounds by the draft nodes verified (what the budget chose)."""

    batch_sizes: Counter = field(default_factory=Counter)
    rows: Counter = field(default_factory=Counter)
    draft_rows: Counter = field(default_factory=Counter)
    prefill_steps: int = 0


class Batch:
    """The generations being decoded together; `add` them, `step` until `empty`."""

    def __init__(self, runner: TargetRunner, budget: SpeculationBudget | None = None):
        self.runner, self.budget = runner, budget
        self.generations: list[Generation] = []
        self.stats = BatchStats()
        self.last_round: Round | None = None  # the decode round of the last step, if it ran one

    @property
    def empty(self) -> bool:
        return not self.generations

    def __len__(self) -> int:
        return len(self.generations)

    def add(self, generation: Generation) -> None:
        if generation.runner is not self.runner:
            raise ValueError("a batch runs the generations of its own target")
        self.generations.append(generation)

    def remove(self, generation: Generation) -> None:
        """Take a generation out (a cancelled request): its drafter session and KV cache are
        freed, the others are not touched."""
        if generation in self.generations:
            self.generations.remove(generation)
        generation.close()

    def step(self) -> list[tuple[Generation, Chunk | Exception]]:
        """One prefill piece and one decode round. Returns the chunks they produced, and the
        exceptions that ended generations (each ends its own generation only). Finished and
        failed generations have left the batch when this returns."""
        events: list[tuple[Generation, Chunk | Exception]] = []
        waiting = next((g for g in self.generations if g.prefilling), None)
        if waiting is not None:
            self.stats.prefill_steps += 1
            try:
                chunk = waiting.prefill_step()
                if chunk is not None:
                    events.append((waiting, chunk))
            except Exception as exc:  # noqa: BLE001 - ends this generation alone
                events.append((waiting, exc))
        decoding = [g for g in self.generations if not g.prefilling and not g.finished]
        self.last_round = decode_round(self.runner, decoding, self.budget) if decoding else None
        if self.last_round is not None:
            events += zip(decoding, self.last_round.outcomes)
            self._count(self.last_round)
        for gen, outcome in events:
            if isinstance(outcome, Exception):
                gen.finished = True
        for gen in [g for g in self.generations if g.finished]:
            self.remove(gen)
        return events

    def _count(self, round_: Round) -> None:
        self.stats.batch_sizes[len(round_.draft_rows)] += 1
        self.stats.rows[round_.rows] += 1
        self.stats.draft_rows.update(round_.verified)
