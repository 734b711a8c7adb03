"""Lookup drafts: continue the sequence the way it continued the last time it read the same.

Why, next to a trained head: a small target decoding greedily repeats itself (a list's
pattern, a loop it cannot leave, a name or a sentence of the prompt copied back), and where it
does, the tokens that followed the previous occurrence of the current suffix are very likely to
follow again. On its greedy answers to training prompts a suffix of eight or more tokens seen
before is followed by the same next token 93% of the time, and each further token of the
continuation by 93-96% once the ones before it were (shorter matches predict less: 23% for a
single token). Prompt-lookup decoding (Saxena 2023) and
the n-gram proposers of LLM servers use the same idea alone; here a lookup chain becomes extra
candidate nodes of the draft head's tree (`tree.CandidateTree`), scored like the head's own
nodes, so the EAGLE-2 selection weighs both and a round verifies whichever is more likely.
Verification is unchanged, so the output stays the target's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# Probability that a lookup chain's first token is accepted, by the length of the suffix
# match that found it (the last entry for every longer match), and that each further chain
# token is accepted once the one before it was: `specdec train lookup-stats` on the target's
# greedy answers to 11,266 training prompts (not the dev set), rounded; see heads/README.md.
# The continuation rates grow along a chain; the table holds the lowest (the second token's).
FIRST_TOKEN_PROB = (0.0, 0.23, 0.53, 0.61, 0.69, 0.73, 0.77, 0.79, 0.93)
NEXT_TOKEN_PROB = (0.0, 0.55, 0.61, 0.68, 0.73, 0.76, 0.78, 0.81, 0.93)
MAX_MATCH = len(FIRST_TOKEN_PROB) - 1


@dataclass(frozen=True)
class LookupDraft:
    """A chain of tokens to try after the sequence's last token, found by a suffix of
    `match` tokens; `log_probs[i]` is the estimated log-probability that tokens[:i+1] are
    all accepted (non-increasing, like a head node's cumulative score)."""

    tokens: list[int]
    match: int
    log_probs: list[float]


class NgramIndex:
    """Where every n-gram (min_n <= n <= max_n) of a growing token sequence last occurred,
    kept up to date as tokens are appended, so a lookup costs a few dict probes however long
    the sequence is."""

    def __init__(self, min_n: int = 1, max_n: int = MAX_MATCH):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        # n -> n-gram -> the position right after its latest occurrence whose next token is known.
        self._after: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}

    def extend(self, token_ids: Sequence[int]) -> None:
        tokens = self.tokens
        for token in token_ids:
            end = len(tokens)  # the new token's position: the n-grams ending just before it now have a next token
            for n, table in self._after.items():
                if end >= n:
                    table[tuple(tokens[end - n : end])] = end
            tokens.append(int(token))

    def lookup(self, length: int) -> LookupDraft | None:
        """Up to `length` tokens that followed the latest earlier occurrence of the longest
        suffix (at most max_n tokens) seen before, or None when no suffix of min_n tokens
        was. A continuation that runs into the present repeats with the match's period (the
        text "a b a b" continues "a b ...")."""
        tokens, total = self.tokens, len(self.tokens)
        if length < 1:
            return None
        for n in range(min(self.max_n, total), self.min_n - 1, -1):
            start = self._after[n].get(tuple(tokens[total - n :]))
            if start is None:
                continue
            chain: list[int] = []
            for i in range(length):
                at = start + i
                chain.append(tokens[at] if at < total else chain[at - total])
            return LookupDraft(chain, n, chain_log_probs(n, len(chain)))
        return None


def chain_log_probs(match: int, length: int) -> list[float]:
    """Cumulative log acceptance probabilities of a `length`-token chain found by a suffix
    match of `match` tokens (FIRST_TOKEN_PROB, NEXT_TOKEN_PROB)."""
    row = min(match, len(FIRST_TOKEN_PROB) - 1)
    first, step = math.log(FIRST_TOKEN_PROB[row]), math.log(NEXT_TOKEN_PROB[row])
    return [first + i * step for i in range(length)]
