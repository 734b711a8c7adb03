"""The decode loop shared by plain autoregressive and speculative decoding.

Each round verifies a tree with one target forward: a root-only tree without a drafter (plain
decoding), the drafter's proposal with one. Tokens are yielded as soon as a round commits them.
If the drafter becomes unavailable the loop continues with root-only trees (same output) and
retries the drafter every `retry_rounds` rounds, reopening its session from the full history.
With a back-off (`specdec.backoff`), rounds are plain while the drafts are rarely accepted.
With a prefix cache, a prompt's longest cached prefix is restored instead of prefilled, and the
finished sequence is stored for the next prompt that starts with it (`specdec.prefix_cache`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from specdec.backoff import BackoffConfig, SpeculationBackoff
from specdec.config import ConfigError, SamplingParams, StopConfig
from specdec.drafter import Drafter, DrafterUnavailable, DraftSession
from specdec.prefix_cache import PrefixCache
from specdec.sampling import make_generator, sample, warp_probs
from specdec.target import SequenceState, TargetRunner
from specdec.text_stream import TextStream
from specdec.tree import DraftTree
from specdec.verify import verify_walk


@dataclass
class Chunk:
    """What one round adds: committed token ids, the new text, and why it ended (if it did)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None


@dataclass
class GenerationStats:
    """Counters of one generation. tau = new tokens per target forward (bonus included; the
    prefill counts as a forward producing the first token, so plain decoding has tau 1.0)."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    new_tokens: int = 0
    target_forwards: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    draft_tokens: int = 0
    fallback_rounds: int = 0
    paused_rounds: int = 0  # plain rounds chosen by the back-off while the drafter was there
    drafter_failures: int = 0
    seconds: float = 0.0
    ttft: float = 0.0
    draft_seconds: float = 0.0  # in the drafter's propose (where the speculative round's time goes)
    verify_seconds: float = 0.0  # in the target's forward of each round's tree and the walk over it (its LM head)

    @property
    def tau(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def accepted_by_depth(self) -> list[int]:
        """Entry d-1: rounds in which at least d draft tokens were accepted."""
        deepest = max(self.accepted_per_round, default=0)
        return [sum(a >= d for a in self.accepted_per_round) for d in range(1, deepest + 1)]


class Generation:
    """One generation; iterate it for chunks, read `stats` and `token_ids` afterwards."""

    def __init__(
        self,
        runner: TargetRunner,
        prompt_ids: Sequence[int],
        sampling: SamplingParams = SamplingParams(),
        stop: StopConfig = StopConfig(),
        drafter: Drafter | None = None,
        retry_rounds: int = 8,
        prefix_cache: PrefixCache | None = None,
        backoff: BackoffConfig = BackoffConfig(),
    ):
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if len(prompt_ids) >= runner.max_length:
            raise ConfigError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {runner.max_length} tokens"
            )
        self.runner, self.prompt_ids, self.sampling, self.stop = runner, list(prompt_ids), sampling, stop
        self.drafter, self.retry_rounds, self.prefix_cache, self.backoff = drafter, retry_rounds, prefix_cache, backoff
        self.eos = set(stop.eos_token_ids or runner.eos_token_ids)
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.token_ids: list[int] = []
        self.text_stream = TextStream(runner.tokenizer, stop.stop_strings)

    @property
    def text(self) -> str:
        return self.text_stream.text

    def __iter__(self) -> Iterator[Chunk]:
        start = time.perf_counter()
        try:
            yield from self._run(start)
        finally:
            self.stats.seconds = time.perf_counter() - start

    def _run(self, start: float) -> Iterator[Chunk]:
        runner, stats, stop = self.runner, self.stats, self.stop
        if stop.max_new_tokens == 0:
            yield Chunk([], "", "length")
            return
        gen = make_generator(self.sampling.seed)
        backoff = SpeculationBackoff(self.backoff, self.sampling.greedy)
        # Target features of every committed token but the root, in pieces (concatenated only
        # when a drafter session must be reopened, not copied every round).
        history: list[torch.Tensor] = []
        if self.prefix_cache is None:
            state = runner.new_state()
        else:
            state, cached = self.prefix_cache.restore(runner, self.prompt_ids)
            if cached is not None:
                history.append(cached)
        stats.cached_prompt_tokens = state.length
        features, logits = runner.prefill(state, self.prompt_ids[state.length :])
        history.append(features)
        stats.target_forwards = 1
        root = self._pick(logits, gen)
        session = self._open(self.prompt_ids + [root], history)
        retry_at = None if session or not self.drafter else self.retry_rounds
        chunk = self._commit([root])
        stats.ttft = time.perf_counter() - start
        try:
            yield chunk
            round_no = 0
            while chunk.finish_reason is None:
                round_no += 1
                if session is None and retry_at is not None and round_no >= retry_at:
                    session = self._open(self.prompt_ids + self.token_ids, history)
                    retry_at = None if session else round_no + self.retry_rounds
                tree, drafted = DraftTree.single(root), False
                if session is not None and not backoff.drafting(round_no):
                    stats.paused_rounds += 1
                elif session is not None and state.length + self._budget() < runner.max_length:
                    began = time.perf_counter()
                    try:
                        tree, drafted = session.propose(), True
                    except DrafterUnavailable:
                        session, retry_at = None, round_no + self.retry_rounds
                        stats.drafter_failures += 1
                    stats.draft_seconds += time.perf_counter() - began
                if session is None and self.drafter is not None:
                    stats.fallback_rounds += 1
                began = time.perf_counter()
                _, hidden = runner.forward_tree(state, tree, logits=False)
                acc = verify_walk(tree.tokens, tree.parents, runner.token_after(hidden, self.sampling, gen))
                stats.verify_seconds += time.perf_counter() - began
                stats.target_forwards += 1
                runner.commit(state, acc.path)
                if drafted:
                    backoff.record(round_no, acc.num_accepted)
                new = [tree.tokens[i] for i in acc.path[1:]] + [acc.bonus_token]
                if len(tree) > 1:
                    stats.accepted_per_round.append(acc.num_accepted)
                    stats.draft_tokens += len(tree) - 1
                accepted_features = hidden[acc.path]
                history.append(accepted_features)
                root = acc.bonus_token
                if state.length + 1 >= runner.max_length:
                    chunk = self._commit(new, context_full=True)
                else:
                    chunk = self._commit(new)
                yield chunk
                if session is not None and chunk.finish_reason is None:
                    try:
                        session.extend(new, accepted_features)
                    except DrafterUnavailable:
                        session, retry_at = None, round_no + self.retry_rounds
                        stats.drafter_failures += 1
        finally:
            if session is not None:
                try:
                    session.close()
                except DrafterUnavailable:
                    pass
            self._store(state, history)

    def _store(self, state: SequenceState, history: list[torch.Tensor]) -> None:
        """Hand the committed tokens to the prefix cache. The KV cache may hold more than the
        answer (tokens a round committed past a stop) and lacks the last token (the root of a
        round that never ran), so the stored sequence is the prompt and answer cut to both."""
        if self.prefix_cache is None or state.pending:
            return
        tokens = (self.prompt_ids + self.token_ids)[: state.length]
        self.prefix_cache.store(tokens, state, torch.cat(history) if len(history) > 1 else history[0])

    def _budget(self) -> int:
        return self.drafter.budget if self.drafter is not None else 1

    def _pick(self, logits: torch.Tensor, gen: torch.Generator) -> int:
        if self.sampling.greedy:
            return int(logits.argmax())
        return sample(warp_probs(logits, self.sampling), gen)

    def _open(self, token_ids: list[int], history: list[torch.Tensor]) -> DraftSession | None:
        """Open a drafter session over the whole history (tokens up to the root)."""
        if self.drafter is None:
            return None
        if len(history) > 1:
            history[:] = [torch.cat(history)]
        try:
            return self.drafter.open(token_ids, history[0])
        except DrafterUnavailable:
            self.stats.drafter_failures += 1
            return None

    def _commit(self, new: list[int], context_full: bool = False) -> Chunk:
        """Apply the stop rules to newly committed tokens and turn them into a chunk."""
        reason = None
        room = self.stop.max_new_tokens - len(self.token_ids)
        if len(new) >= room:
            new, reason = new[:room], "length"
        for i, t in enumerate(new):
            if t in self.eos:
                new, reason = new[:i], "stop"
                break
        if reason is None and context_full:
            reason = "length"
        self.token_ids += new
        self.stats.new_tokens = len(self.token_ids)
        text, hit = self.text_stream.add(new, final=reason is not None)
        if hit:
            reason = "stop"
        return Chunk(new, text, reason)
