"""A store of finished sequences' target KV entries and features, so that a prompt starting
with an earlier sequence prefills only what is new.

Why: a chat API is stateless, so every turn of a conversation resends the whole history, and
every chat prompt of the default target starts with the same system preamble. Prefill runs at
this CPU's arithmetic peak and was a quarter of the plain path's time on the dev set (the
second turns resend the first turn's prompt and answer); a cached prefix costs a copy instead.

Entries hold the committed tokens of a generation (prompt + answer), their keys/values and the
target's feature of each token (the drafter's input, which the decode loop must hand a drafter
session for the whole history). A prompt reuses the longest common prefix with any entry, at
most all of its tokens but the last (whose logits the next token needs). Least recently used
entries go first once the store holds more than `max_tokens` tokens.

Numbers: reused keys/values were computed by the decode rounds, a full prefill would compute
them in one product; they agree to float rounding, as a tree forward and a one-token forward do
(DESIGN.md), so greedy output can differ from an uncached run only at a numerical near-tie.
Plain and speculative decoding on the same store stay equal token for token.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.target import SequenceState, TargetRunner


@dataclass(frozen=True)
class CachedSequence:
    """tokens [n]; kv [layers, 2, kv_heads, n, head_dim]; features [n, d]. Never written after
    it is stored (a restore copies out of it)."""

    tokens: tuple[int, ...]
    kv: torch.Tensor
    features: torch.Tensor


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class PrefixCache:
    """Thread-safe LRU store of `CachedSequence`s, bounded by their total token count."""

    def __init__(self, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, CachedSequence] = OrderedDict()
        self._next_key = 0
        self._lock = threading.Lock()

    @property
    def tokens(self) -> int:
        """Tokens held, over all entries."""
        with self._lock:
            return sum(len(e.tokens) for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _best(self, prompt: Sequence[int]) -> tuple[CachedSequence | None, int]:
        """The entry sharing the longest prefix with `prompt`, marked most recently used."""
        best_key, best_len = None, 0
        for key, entry in self._entries.items():
            length = common_prefix(entry.tokens, prompt)
            if length > best_len:
                best_key, best_len = key, length
        if best_key is None:
            return None, 0
        self._entries.move_to_end(best_key)
        return self._entries[best_key], best_len

    def restore(self, runner: TargetRunner, prompt: Sequence[int]) -> tuple[SequenceState, torch.Tensor | None]:
        """A sequence state holding the longest cached prefix of `prompt` (all its tokens but the
        last at most) and those tokens' features, or a fresh state and None on a miss."""
        with self._lock:
            entry, length = self._best(prompt)
        length = min(length, len(prompt) - 1)
        state = runner.new_state(capacity=max(len(prompt) + 64, 256))
        if entry is None or length < 1:
            return state, None
        state.cache.data[:, :, :, :length] = entry.kv[:, :, :, :length]
        state.length = length
        return state, entry.features[:length]

    def store(self, tokens: Sequence[int], state: SequenceState, features: torch.Tensor) -> None:
        """Keep the first len(tokens) committed entries of `state` and their `features` (at
        least as many rows). Entries that are a prefix of `tokens` are replaced by it; nothing
        is stored when an entry already starts with `tokens`, or when they alone exceed the
        store's size."""
        n = len(tokens)
        if n < 1 or n > self.max_tokens:
            return
        if state.pending or state.length < n or features.shape[0] < n:
            raise ValueError(f"cannot store {n} tokens: {state.length} committed, {features.shape[0]} features")
        tokens = tuple(int(t) for t in tokens)
        with self._lock:
            for key, entry in list(self._entries.items()):
                if len(entry.tokens) >= n and entry.tokens[:n] == tokens:
                    self._entries.move_to_end(key)
                    return
        entry = CachedSequence(tokens, state.cache.data[:, :, :, :n].clone(), features[:n].clone())
        with self._lock:
            for key in [k for k, e in self._entries.items() if tokens[: len(e.tokens)] == e.tokens]:
                del self._entries[key]
            self._entries[self._next_key] = entry
            self._next_key += 1
            total = sum(len(e.tokens) for e in self._entries.values())
            while total > self.max_tokens:
                _, evicted = self._entries.popitem(last=False)
                total -= len(evicted.tokens)
