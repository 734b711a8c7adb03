"""The decode loop shared by plain autoregressive and speculative decoding, alone or batched.

A `Generation` is one sequence, advanced step by step: its prompt's prefill (in chunks, so
that a batch's other sequences are not stalled by a long prompt), then rounds. A round verifies
a tree with the target: a root-only tree without a drafter (plain decoding), the drafter's
proposal with one. `decode_round` runs one round for many generations with one target forward
over all their trees (continuous batching: `specdec.batch` adds and removes generations between
rounds), and iterating a generation runs its rounds alone through the same function.
Tokens are yielded as soon as a round commits them.

If the drafter becomes unavailable the generation continues with root-only trees (same output)
and retries the drafter every `retry_rounds` rounds, reopening its session from the full
history. A proposal that is not a valid tree for the round (`specdec.tree.tree_problem`) is
replaced by a root-only tree and counted: a faulty drafter costs speed, never correctness.
With a back-off (`specdec.backoff`), rounds are plain while the drafts are rarely accepted; with
a `specdec.budget.SpeculationBudget`, a batched round drafts and verifies only what pays at its
load. With a prefix cache, a prompt's longest cached prefix is restored instead of prefilled,
and the finished sequence is stored for the next prompt that starts with it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from specdec.backoff import BackoffConfig, SpeculationBackoff
from specdec.budget import DraftEstimate, SpeculationBudget
from specdec.config import ConfigError, SamplingParams, StopConfig
from specdec.drafter import Drafter, DrafterUnavailable, DraftSession
from specdec.prefix_cache import PrefixCache
from specdec.sampling import make_generator, sample, warp_probs
from specdec.target import SequenceState, TargetRunner
from specdec.text_stream import TextStream
from specdec.tree import DraftTree, InvalidTree, tree_problem
from specdec.verify import verify_walk

log = logging.getLogger(__name__)


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
    budget_plain_rounds: int = 0  # plain rounds chosen by the batch's speculation budget
    invalid_trees: int = 0  # proposals refused at the drafter boundary (a plain round instead)
    drafter_failures: int = 0
    seconds: float = 0.0
    ttft: float = 0.0
    draft_seconds: float = 0.0  # in the drafter's propose (where the speculative round's time goes)
    verify_seconds: float = 0.0  # in the target's forward of each round's trees and the walk over it (its LM head)

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
    """One generation. Iterate it for chunks (it runs alone), or let a `specdec.batch.Batch`
    step it with others; read `stats` and `token_ids` afterwards.

    `prefill_chunk`: the most prompt tokens one prefill forward takes (0: the whole prompt at
    once). A generation gives the same tokens alone and batched when both use the same value.
    """

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
        prefill_chunk: int = 0,
    ):
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if len(prompt_ids) >= runner.max_length:
            raise ConfigError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {runner.max_length} tokens"
            )
        if prefill_chunk < 0:
            raise ConfigError(f"prefill_chunk must be >= 0, got {prefill_chunk}")
        self.runner, self.prompt_ids, self.sampling, self.stop = runner, list(prompt_ids), sampling, stop
        self.drafter, self.retry_rounds, self.prefix_cache, self.backoff = drafter, retry_rounds, prefix_cache, backoff
        self.prefill_chunk = prefill_chunk
        self.eos = set(stop.eos_token_ids or runner.eos_token_ids)
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.estimate = DraftEstimate()
        self.token_ids: list[int] = []
        self.text_stream = TextStream(runner.tokenizer, stop.stop_strings)
        self.generator = make_generator(sampling.seed)
        self.state: SequenceState | None = None
        self.finished = False
        self._started: float | None = None
        self._prefilled = 0
        self._backoff = SpeculationBackoff(backoff, sampling.greedy)
        # Target features of every committed token but the root, in pieces (concatenated only
        # when a drafter session must be reopened, not copied every round).
        self._history: list[torch.Tensor] = []
        self._session: DraftSession | None = None
        self._retry_at: int | None = None
        self._round = 0
        self._root = -1
        self._drafted = False
        self._closed = False
        self.last_accepted = 0  # draft tokens the last round accepted

    @property
    def text(self) -> str:
        return self.text_stream.text

    @property
    def draft_backlog(self) -> int:
        """Committed tokens the drafter session has not read yet (it reads them when proposing)."""
        return self._session.backlog if self._session is not None else 0

    @property
    def drafted(self) -> bool:
        """Whether this round's `plan` got drafts from the drafter (a proposal or its lookup drafts)."""
        return self._drafted

    @property
    def prefilling(self) -> bool:
        """Whether the prompt is not all in the KV cache yet (`prefill_step` comes next)."""
        return not self.finished and self._root < 0

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while (chunk := self.prefill_step()) is None:
                pass
            yield chunk
            while not self.finished:
                outcome = decode_round(self.runner, [self]).outcomes[0]
                if isinstance(outcome, BaseException):
                    raise outcome
                yield outcome
        finally:
            self.close()

    def prefill_step(self) -> Chunk | None:
        """Prefill the next piece of the prompt; once it is all in, pick the first token, open
        the drafter session and return the first chunk (None before that)."""
        if self._started is None:
            self._started = time.perf_counter()
            if self.stop.max_new_tokens == 0:
                self.finished = True
                return Chunk([], "", "length")
            if self.prefix_cache is None:
                self.state = self.runner.new_state()
            else:
                self.state, cached = self.prefix_cache.restore(self.runner, self.prompt_ids)
                if cached is not None:
                    self._history.append(cached)
            self.stats.cached_prompt_tokens = self._prefilled = self.state.length
        assert self.state is not None
        end = len(self.prompt_ids) if not self.prefill_chunk else min(len(self.prompt_ids), self._prefilled + self.prefill_chunk)
        features, logits = self.runner.prefill(self.state, self.prompt_ids[self._prefilled : end])
        self._history.append(features)
        self._prefilled = end
        if end < len(self.prompt_ids):
            return None
        self.stats.target_forwards = 1
        self._root = self._pick(logits)
        self._session = self._open(self.prompt_ids + [self._root])
        self._retry_at = None if self._session or not self.drafter else self.retry_rounds
        chunk = self._commit([self._root])
        self.stats.ttft = time.perf_counter() - self._started
        return chunk

    def begin_round(self) -> bool:
        """Start the next round (reopening a failed drafter session when its retry is due);
        returns whether the round may draft: a session, the back-off allows, room in the context."""
        self._round += 1
        if self._session is None and self._retry_at is not None and self._round >= self._retry_at:
            self._session = self._open(self.prompt_ids + self.token_ids)
            self._retry_at = None if self._session else self._round + self.retry_rounds
        if self._session is None:
            if self.drafter is not None:
                self.stats.fallback_rounds += 1
            return False
        if not self._backoff.drafting(self._round):
            self.stats.paused_rounds += 1
            return False
        return self.state.length + self.drafter.budget < self.runner.max_length

    def plan(self, proposal: DraftTree | Exception | None = None, seconds: float = 0.0, lookup: bool = False) -> DraftTree:
        """This round's tree: `proposal` when the round drafted (the drafter's answer to this
        generation's session, or the exception it raised; `seconds`: this generation's share of
        the proposal's time); else, with `lookup`, its cheap drafts found without the head
        (`DraftSession.lookup`); else the root alone."""
        self._drafted = False
        if proposal is None and not lookup:
            return DraftTree.single(self._root)
        tree: DraftTree | Exception | None = proposal
        if proposal is None:
            began = time.perf_counter()
            try:
                tree = self._session.lookup()
            except (DrafterUnavailable, InvalidTree) as exc:
                tree = exc
            seconds = time.perf_counter() - began
        self.stats.draft_seconds += seconds
        if isinstance(tree, DrafterUnavailable):
            self._lose_session()
            tree = None
        elif isinstance(tree, InvalidTree):
            self._refuse(str(tree))
            tree = None
        elif isinstance(tree, Exception):
            raise tree
        if tree is None:
            return DraftTree.single(self._root)
        problem = tree_problem(tree, self._root, self.runner.vocab_size, self.drafter.budget)
        if problem is not None:
            self._refuse(problem)
            return DraftTree.single(self._root)
        self._drafted = True
        if proposal is not None:
            self.estimate.proposed(tree)
        return tree

    def finish(self, tree: DraftTree, hidden: torch.Tensor, token_after: Callable[[int], int]) -> Chunk:
        """Accept the longest path of `tree` the target agrees with (its features `hidden`,
        its tokens `token_after`), commit it and the bonus token, and return the new chunk."""
        stats, state = self.stats, self.state
        acc = verify_walk(tree.tokens, tree.parents, token_after)
        self.last_accepted = acc.num_accepted
        stats.target_forwards += 1
        self.runner.commit(state, acc.path)
        if self._drafted and len(tree) > 1:
            self._backoff.record(self._round, acc.num_accepted)
            self.estimate.verified(tree, acc.num_accepted)
        new = [tree.tokens[i] for i in acc.path[1:]] + [acc.bonus_token]
        if len(tree) > 1:
            stats.accepted_per_round.append(acc.num_accepted)
            stats.draft_tokens += len(tree) - 1
        accepted_features = hidden[acc.path]
        self._history.append(accepted_features)
        self._root = acc.bonus_token
        chunk = self._commit(new, context_full=state.length + 1 >= self.runner.max_length)
        if self._session is not None and chunk.finish_reason is None:
            try:
                self._session.extend(new, accepted_features)
            except DrafterUnavailable:
                self._lose_session()
        return chunk

    def close(self) -> None:
        """End the generation (finished, cancelled or failed): close the drafter session, hand
        the committed tokens to the prefix cache, and free the KV cache. Idempotent."""
        if self._closed:
            return
        self._closed = self.finished = True
        if self._started is not None:
            self.stats.seconds = time.perf_counter() - self._started
        if self._session is not None:
            try:
                self._session.close()
            except DrafterUnavailable:
                pass
            self._session = None
        if self.state is not None:
            self._store(self.state)
        self.state = None
        self._history = []

    def _lose_session(self) -> None:
        """The drafter failed mid-generation: decode plainly and retry it `retry_rounds` later."""
        self._session, self._retry_at = None, self._round + self.retry_rounds
        self.stats.drafter_failures += 1

    def _refuse(self, problem: str) -> None:
        self.stats.invalid_trees += 1
        log.warning("drafter proposed an invalid tree, decoding this round plainly: %s", problem)

    def _store(self, state: SequenceState) -> None:
        """Hand the committed tokens to the prefix cache. The KV cache may hold more than the
        answer (tokens a round committed past a stop) and lacks the last token (the root of a
        round that never ran), so the stored sequence is the prompt and answer cut to both."""
        if self.prefix_cache is None or state.pending or self._root < 0:
            return
        history = self._history
        tokens = (self.prompt_ids + self.token_ids)[: state.length]
        self.prefix_cache.store(tokens, state, torch.cat(history) if len(history) > 1 else history[0])

    def _pick(self, logits: torch.Tensor) -> int:
        if self.sampling.greedy:
            return int(logits.argmax())
        return sample(warp_probs(logits, self.sampling), self.generator)

    def _open(self, token_ids: list[int]) -> DraftSession | None:
        """Open a drafter session over the whole history (tokens up to the root)."""
        if self.drafter is None:
            return None
        history = self._history
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
        if reason is not None:
            self.finished = True
        return Chunk(new, text, reason)


@dataclass
class Round:
    """What `decode_round` did: each generation's chunk, or the exception that ended it (the
    others go on); and the draft nodes each generation verified (None: it failed first)."""

    outcomes: list[Chunk | Exception]
    draft_rows: list[int | None]

    @property
    def verified(self) -> list[int]:
        """Draft nodes verified by each generation that reached the forward."""
        return [d for d in self.draft_rows if d is not None]

    @property
    def rows(self) -> int:
        """Rows of the round's target forward: a root and its verified drafts per generation."""
        return sum(d + 1 for d in self.verified)


def decode_round(runner: TargetRunner, generations: Sequence[Generation], budget: SpeculationBudget | None = None) -> Round:
    """One round for every generation (each past its prefill, none finished) with one target
    forward over all their trees. Without a budget every generation that may draft proposes its
    full tree; with one, the budget chooses who drafts and which nodes are verified."""
    round_began = time.perf_counter()
    outcome: list[Chunk | Exception | None] = [None] * len(generations)
    may_draft = [False] * len(generations)
    for i, gen in enumerate(generations):
        try:
            may_draft[i] = gen.begin_round()
        except Exception as exc:  # noqa: BLE001 - one generation's failure ends it alone
            outcome[i] = exc
    live = [i for i, out in enumerate(outcome) if out is None]
    sampled = {i: not generations[i].sampling.greedy for i in live}
    if budget is None:
        drafting = {i: may_draft[i] for i in live}
    else:
        chosen = budget.drafters(
            [generations[i].estimate for i in live], [may_draft[i] for i in live],
            [_tree_size(generations[i]) for i in live], [sampled[i] for i in live], [generations[i].draft_backlog for i in live],
        )
        drafting = dict(zip(live, chosen))
    trees: dict[int, DraftTree] = {}
    proposal_seconds = dict.fromkeys(live, 0.0)
    proposers = [i for i in live if drafting[i]]
    backlogs = {i: generations[i].draft_backlog for i in proposers}
    proposals = dict(zip(proposers, _propose([generations[i] for i in proposers]))) if proposers else {}
    # Under a budget, a request left out of drafting still offers its cheap lookup drafts where they could pay.
    lookups = dict(zip(live, budget.lookups)) if budget is not None else {}
    for i in live:
        gen = generations[i]
        try:
            proposal, seconds = proposals.get(i, (None, 0.0))
            trees[i] = gen.plan(proposal, seconds, lookup=lookups.get(i, False) and may_draft[i] and proposal is None)
            if proposal is not None and gen.drafted and budget is not None:
                proposal_seconds[i] = seconds
                budget.record_proposal(backlogs[i], seconds, gen.estimate)
        except Exception as exc:  # noqa: BLE001
            outcome[i] = exc
    live = [i for i in live if i in trees]
    if budget is not None and live:
        cut = budget.trim(
            [trees[i] for i in live], [generations[i].estimate for i in live], [sampled[i] for i in live], [proposal_seconds[i] for i in live]
        )
        trees.update(zip(live, cut))
        for i in live:
            if may_draft[i] and len(trees[i]) == 1:
                generations[i].stats.budget_plain_rounds += 1
    draft_rows = [len(trees[i]) - 1 if i in trees else None for i in range(len(generations))]
    if not live:
        return Round(outcome, draft_rows)  # type: ignore[arg-type]
    began = time.perf_counter()
    hidden = runner.forward_trees([generations[i].state for i in live], [trees[i] for i in live])
    pickers = runner.tokens_after(hidden, [generations[i].sampling for i in live], [generations[i].generator for i in live])
    shared = time.perf_counter() - began
    for i, features, pick in zip(live, hidden, pickers):
        gen = generations[i]
        began = time.perf_counter()
        try:
            outcome[i] = gen.finish(trees[i], features, pick)
        except Exception as exc:  # noqa: BLE001
            outcome[i] = exc
        gen.stats.verify_seconds += shared + time.perf_counter() - began
    if budget is not None:
        rows = sum(len(trees[i]) for i in live)
        sampled_rows = sum(len(trees[i]) for i in live if sampled[i])
        proposing = sum(proposal_seconds.values())
        accepted = sum(generations[i].last_accepted for i in live if not isinstance(outcome[i], Exception))
        seconds = time.perf_counter() - round_began - proposing
        budget.record_round(seconds, len(live), sum(sampled[i] for i in live), rows, sampled_rows, proposing, accepted)
    return Round(outcome, draft_rows)  # type: ignore[arg-type]


def _propose(generations: Sequence[Generation]) -> list[tuple[DraftTree | Exception, float]]:
    """The proposals of the generations that draft this round, each with its share of the
    time: one `Drafter.propose_many` call per drafter (the embedded head grows all their trees
    together), its time split evenly among its generations."""
    groups: dict[int, list[int]] = {}
    for i, gen in enumerate(generations):
        groups.setdefault(id(gen.drafter), []).append(i)
    shares: dict[int, tuple[DraftTree | Exception, float]] = {}
    for members in groups.values():
        began = time.perf_counter()
        try:
            results = generations[members[0]].drafter.propose_many([generations[i]._session for i in members])
        except Exception as exc:  # noqa: BLE001 - handed to every generation of this call
            results = [exc] * len(members)
        share = (time.perf_counter() - began) / len(members)
        shares.update((i, (result, share)) for i, result in zip(members, results))
    return [shares[i] for i in range(len(generations))]


def _tree_size(gen: Generation) -> int:
    return gen.drafter.budget if gen.drafter is not None else 1
