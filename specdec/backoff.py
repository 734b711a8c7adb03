"""Speculation back-off: plain rounds while the drafts are rarely accepted.

A speculative round costs more than a plain one (a proposal, and one verified row per draft
node), so it only pays when enough of its drafts are accepted: on the 2-core CPU, with the
default tree, a round costs about 1.5-1.9 plain steps. Where acceptance stays below that
break-even (sampling at T=1 with a head distilled on greedy answers, text the head never saw),
speculation is slower than plain decoding. The back-off watches the drafts accepted in the last
`window` speculative rounds; when their mean falls below `break_even` it decodes `pause` plain
rounds, then drafts again to probe. A probe that fails doubles the pause (up to `max_pause`); a
window that reaches the break-even resets it.

It applies to sampled requests only unless `greedy_too`: greedy acceptance comes in bursts (a
lookup chain through a repeat, a formula), so a weak window says little about the next one.
Measured in one process on 13 dev questions (an A/B run, default tree):
at T=1 (96 tokens a turn) plain decoding 63.7 tokens/s, speculation 0.960x of it without the
back-off and 0.991x with these defaults (81% of rounds plain; a second run: 0.934x and 0.974x
with break_even 0.8); greedy (128 tokens a turn) 1.267x without it, 1.227x with break_even 0.8.

The decisions use acceptance counts only, never timings: the rounds a request speculates on,
and with them how its random draws are consumed, depend on its tokens and seed alone, so a
seeded request is reproducible. Output is lossless either way: a plain round is a root-only tree.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from specdec.config import ConfigError


@dataclass(frozen=True)
class BackoffConfig:
    """break_even: accepted drafts per round below which rounds are plain for a while; 0 turns
    the back-off off. window: speculative rounds averaged. pause / max_pause: plain rounds after
    the first / a repeated shortfall. greedy_too: also for greedy requests."""

    break_even: float = 1.0
    window: int = 4
    pause: int = 16
    max_pause: int = 256
    greedy_too: bool = False

    def __post_init__(self) -> None:
        if self.break_even < 0.0:
            raise ConfigError(f"break_even must be >= 0, got {self.break_even}")
        if self.window < 1 or self.pause < 1 or self.max_pause < self.pause:
            raise ConfigError(f"back-off needs window >= 1 and 1 <= pause <= max_pause: {self}")

    def applies(self, greedy: bool) -> bool:
        """Whether a request decoded greedily (or not) backs off at all."""
        return self.break_even > 0.0 and (self.greedy_too or not greedy)


class SpeculationBackoff:
    """One generation's back-off state; rounds are numbered from 1 by the decode loop."""

    def __init__(self, config: BackoffConfig, greedy: bool):
        self.config, self.enabled = config, config.applies(greedy)
        self.recent: deque[int] = deque(maxlen=config.window)
        self.resume_at = 0
        self.pause = config.pause

    def drafting(self, round_no: int) -> bool:
        """Whether this round should ask the drafter for a tree."""
        return round_no >= self.resume_at

    def record(self, round_no: int, accepted: int) -> None:
        """The number of drafts the target accepted in speculative round `round_no`."""
        cfg = self.config
        if not self.enabled:
            return
        self.recent.append(accepted)
        if len(self.recent) < cfg.window:
            return
        if sum(self.recent) < cfg.break_even * cfg.window:
            self.resume_at = round_no + 1 + self.pause
            self.pause = min(2 * self.pause, cfg.max_pause)
            self.recent.clear()
        else:
            self.pause = cfg.pause
