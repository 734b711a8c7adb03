"""Load-adaptive speculation: which requests of a batched round draft, and how many of their draft
nodes the target verifies.

A round costs one target forward over every row of the batch (each request's root, plus the
draft nodes verified) and a proposal from each request that drafts. Both are measured, not
assumed: `CostModel.calibrate` times forwards of 1..N rows on the running target at start, and
the budget fits the rounds' measured time to the calibration, and the proposals' time to the
backlog of features each drafter must read first (`LinearFit`). A draft node is worth the
probability that the target accepts it: the drafter's cumulative draft probability estimates
it, and each request's record of accepted against predicted drafts corrects it
(`DraftEstimate`: a miscalibrated head, a sampled request, text the head never saw).

Each round the budget first admits drafters, best expected gain first, while they raise the
round's expected tokens per second, then admits their nodes, most likely first, by the same
rule. With many requests in the batch every row costs nearly a full token's compute, so trees
shrink; where drafts are rarely accepted no node pays and the round is plain batched decoding.
A request kept from drafting probes again after a pause that doubles with every probe that
does not pay; where not even a proposal sure to be accepted would pay, nobody probes. The
choice only changes which tree is verified, never the output: every tree yields the same
tokens (`specdec.verify`).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from specdec.target import SequenceState, TargetRunner
from specdec.tree import DraftTree, subtree

CALIBRATION_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_HISTORY = 8  # proposals a request's record keeps


@dataclass(frozen=True)
class CostModel:
    """Seconds of a batched round by rows: the target forward, and the LM head's rows of
    greedy (argmax) and sampled (full logits) requests; linear between measured points and
    beyond the last one."""

    rows: tuple[int, ...]
    forward: tuple[float, ...]
    greedy_head: tuple[float, ...]
    sampled_head: tuple[float, ...]

    def seconds(self, rows: int, sampled_rows: int = 0) -> float:
        """A round of `rows` rows, `sampled_rows` of them for sampled requests."""
        greedy_rows = rows - sampled_rows
        total = _interpolate(self.rows, self.forward, rows)
        if greedy_rows:
            total += _interpolate(self.rows, self.greedy_head, greedy_rows)
        if sampled_rows:
            total += _interpolate(self.rows, self.sampled_head, sampled_rows)
        return total

    @classmethod
    @torch.inference_mode()
    def calibrate(cls, runner: TargetRunner, rows: Sequence[int] = CALIBRATION_ROWS, context: int = 128, repeats: int = 5) -> "CostModel":
        """Time forwards of each row count on `context` tokens of committed text, as a batch
        of sequences of up to 8 rows each (the shape of batched trees), the fastest of
        `repeats` after an untimed one; a count never costs less than a smaller one."""
        base = runner.new_state(context + 16)
        runner.prefill(base, [(7 * i + 3) % runner.vocab_size for i in range(context)])
        forward, greedy, sampled = [], [], []
        for count in rows:
            sizes = [min(8, count - start) for start in range(0, count, 8)]
            states = [SequenceState(base.cache.clone(), base.length) for _ in sizes]
            trees = [DraftTree([5] * n, [-1] + list(range(n - 1))) for n in sizes]
            best = [math.inf] * 3
            for repeat in range(repeats + 1):
                began = time.perf_counter()
                hidden = torch.cat(runner.forward_trees(states, trees))
                mid = _synchronized(runner)
                runner.greedy_tokens(hidden)
                end = _synchronized(runner)
                runner.logits(hidden)
                last = _synchronized(runner)
                for state in states:
                    runner.commit(state, [])
                if repeat:
                    best = [min(best[0], mid - began), min(best[1], end - mid), min(best[2], last - end)]
            for series, value in zip((forward, greedy, sampled), best):
                series.append(max(value, series[-1] if series else 0.0))
        return cls(tuple(rows), tuple(forward), tuple(greedy), tuple(sampled))


@dataclass
class DraftEstimate:
    """One request's drafting record: fading sums of the drafts it was predicted to get
    accepted (the drafter's probabilities of the verified nodes) and of those it got; its last
    proposals' node probabilities, best first; the rounds since it last proposed.

    The sums fade with every verified tree (the last few weigh most) and the calibration
    starts from one draft predicted and accepted. A probe always verifies its most likely node
    (`SpeculationBudget.trim`), so even a request kept plain keeps its record current."""

    predicted: float = 0.0
    accepted: float = 0.0
    history: list[list[float]] = field(default_factory=list)  # last proposals' node probabilities, best first
    idle: int = 0
    pause: int = 4  # rounds left out after which it probes; doubles while probes do not pay
    probing: bool = False

    @property
    def calibration(self) -> float:
        """Accepted per predicted draft, with one accepted prediction as the prior."""
        return (self.accepted + 1.0) / (self.predicted + 1.0)

    def proposals(self) -> list[list[float]]:
        """Expected acceptance of the best, second best, ... node of each of the last proposals
        (empty before the first): what a proposal now may bring, burst or lull."""
        scale = self.calibration
        return [[min(1.0, scale * v) for v in values] for values in self.history]

    def proposed(self, tree: DraftTree) -> None:
        self.idle = 0
        if tree.scores is not None:
            self.history = self.history[-(_HISTORY - 1) :] + [sorted((math.exp(s) for s in tree.scores[1:]), reverse=True)]

    def verified(self, tree: DraftTree, accepted: int) -> None:
        if tree.scores is None or len(tree) == 1:
            return
        self.predicted = 0.75 * self.predicted + tree_value(tree)
        self.accepted = 0.75 * self.accepted + accepted


@dataclass
class SpeculationBudget:
    """Chooses the drafters and the verified nodes of each round from a `CostModel`; one per
    batch of generations."""

    costs: CostModel
    # A plain round's measured time against the calibration: the scale carries what the
    # calibration missed per row (longer contexts, a busier machine), the intercept what every
    # round pays beyond its forward (the walk, commits, drafter updates, text).
    rounds: LinearFit = field(default_factory=lambda: LinearFit())
    # What draft rows add to a round, measured, against what the calibration says they add:
    # tree masks, the commit of a path, longer walks and drafter updates come on top.
    drafts: LinearFit = field(default_factory=lambda: LinearFit())
    # How far the model's promises are trusted: drafting rounds that made fewer tokens than plain
    # rounds would have in the same time lower it, ones that made more raise it (up to 1), and it
    # recovers slowly without evidence, so a change of load is noticed again.
    trust: float = 1.0
    recent: deque[list[float]] = field(default_factory=lambda: deque(maxlen=_HISTORY * 4))  # proposals of any request, calibrated
    _base: tuple[int, int] = (0, 0)  # the round being planned: its requests, and the sampled ones
    # Per request of the round `drafters` planned: whether its cheap lookup drafts could pay
    # (rows that cost nothing to propose); where not, they are not even looked up.
    lookups: list[bool] = field(default_factory=list)
    _costs: dict = field(default_factory=dict)
    # A proposal's time against the pairs of features its session has not read yet: a request
    # that has not drafted for a while first feeds its head everything since.
    proposals: LinearFit = field(default_factory=lambda: LinearFit(slope=0.0, low=0.0, high=1.0))
    first_pause: int = 4
    max_pause: int = 256

    def drafters(
        self, estimates: Sequence[DraftEstimate], may_draft: Sequence[bool], sizes: Sequence[int], sampled: Sequence[bool],
        backlogs: Sequence[int],
    ) -> list[bool]:
        """Which requests propose this round. `may_draft[i]`: request i has a drafter and room;
        `sizes[i]`: its largest tree; `sampled[i]`: it samples (its rows' LM head costs more);
        `backlogs[i]`: the pairs its drafter must read before proposing.
        A request drafts when a proposal, cut to its best size as `trim` will cut it, is
        expected (over its last proposals) to raise the round's tokens per second. A request
        left out for `pause` rounds probes: its record may be stale (text turns predictable, a
        repeat begins). A new request is judged by the batch's recent proposals and starts with
        the batch's typical pause; in a batch without any record yet, it probes at once."""
        choose = [False] * len(estimates)
        self.lookups = [False] * len(estimates)
        rows, sampled_rows = len(estimates), sum(sampled)
        self._plan(rows, sampled_rows)
        tokens, proposals = float(len(estimates)), 0.0
        ranked = []
        pauses = sorted(e.pause for e in estimates if e.history)
        for i, (estimate, allowed) in enumerate(zip(estimates, may_draft)):
            if not allowed:
                continue
            self.lookups[i] = self._could_pay(rows, sampled_rows, sizes[i], sampled[i], 0.0)
            if not self.lookups[i] or not self._could_pay(rows, sampled_rows, sizes[i], sampled[i], self.proposals.predict(backlogs[i])):
                continue  # left out (its idle rounds count below)
            if not estimate.history and not estimate.idle and pauses:
                estimate.pause = pauses[len(pauses) // 2]
            own = estimate.proposals()
            history = [[self.trust * v for v in values] for values in (own or self.recent)]
            estimate.probing = not history or estimate.idle >= estimate.pause
            if estimate.probing:
                choose[i] = True
                proposals += self.proposals.predict(backlogs[i])
            else:
                ranked.append((-sum(map(sum, history)) / len(history), i, [v[: sizes[i] - 1] for v in history]))
        for _, i, history in sorted(ranked):
            cost = self.proposals.predict(backlogs[i])
            # The rate if i proposes: for each recent proposal, the best cut of it (none at all
            # included: the proposal is paid either way), averaged: a burst is worth its cut.
            expected_rate, expected_rows, expected_gain = 0.0, 0.0, 0.0
            for values in history:
                best_rate, best_k, gain, best_gain = tokens / self._round(rows, sampled_rows, proposals + cost), 0, 0.0, 0.0
                for k, value in enumerate(values, start=1):
                    gain += value
                    rate = (tokens + gain) / self._round(rows + k, sampled_rows + k * sampled[i], proposals + cost)
                    if rate > best_rate:
                        best_rate, best_k, best_gain = rate, k, gain
                expected_rate += best_rate / len(history)
                expected_rows += best_k / len(history)
                expected_gain += best_gain / len(history)
            if expected_rate <= tokens / self._round(rows, sampled_rows, proposals):
                continue
            choose[i] = True
            extra = round(expected_rows)
            rows, sampled_rows = rows + extra, sampled_rows + extra * sampled[i]
            tokens, proposals = tokens + expected_gain, proposals + cost
        for estimate, chosen, allowed in zip(estimates, choose, may_draft):
            if allowed and not chosen:
                estimate.idle += 1
        return choose

    def _could_pay(self, rows: int, sampled_rows: int, size: int, sampled: bool, cost: float) -> bool:
        """Whether a proposal of up to `size` nodes would raise the round's tokens per second
        if every draft were sure to be accepted. Where not even that pays (every row costs
        about a whole token's share of the round: a large batch on a CPU), no proposal can,
        and the request neither drafts nor probes: the round is plain batched decoding."""
        plain = rows / self._round(rows, sampled_rows, 0.0)
        return any((rows + k) / self._round(rows + k, sampled_rows + k * sampled, cost) > plain for k in range(1, size))

    def trim(
        self, trees: Sequence[DraftTree], estimates: Sequence[DraftEstimate], sampled: Sequence[bool], proposal_seconds: Sequence[float]
    ) -> list[DraftTree]:
        """Each tree cut to the nodes worth their rows this round (root-only when none is):
        nodes enter best expected value first while the round's expected tokens per second
        rise (a probe's most likely node enters first, whatever it costs). Trees without
        scores stay whole. A probe that did not pay for itself (the round would be faster
        without the proposal and its nodes) doubles its request's pause (up to `max_pause`); a
        probe that did, and any chosen proposal with a node kept, reset it.
        `proposal_seconds[i]`: what request i's proposal took this round (0: none, or only its
        cheap lookup drafts)."""
        proposals = sum(proposal_seconds)
        self._plan(len(trees), sum(sampled))
        rows = sum(1 if t.scores is not None else len(t) for t in trees)
        sampled_rows = sum(s * (1 if t.scores is not None else len(t)) for t, s in zip(trees, sampled))
        tokens = float(len(trees))
        candidates = []
        for i, (tree, estimate) in enumerate(zip(trees, estimates)):
            if tree.scores is not None:
                scale = estimate.calibration
                candidates += [(-self.trust * min(1.0, scale * math.exp(s)), i, j) for j, s in enumerate(tree.scores) if j]
        candidates.sort()
        kept: list[list[int]] = [[0] for _ in trees]
        gains = [0.0] * len(trees)
        for neg_value, i, j in candidates:
            if estimates[i].probing and len(kept[i]) == 1 and trees[i].parents[j] == 0:
                kept[i].append(j)  # a probe's most likely node: verified whatever it costs, to keep the record current
                gains[i] -= neg_value
                rows, sampled_rows, tokens = rows + 1, sampled_rows + sampled[i], tokens - neg_value
        for neg_value, i, j in candidates:
            if j in kept[i]:
                continue
            now = tokens / self._round(rows, sampled_rows, proposals)
            later = (tokens - neg_value) / self._round(rows + 1, sampled_rows + sampled[i], proposals)
            if later <= now:
                break
            if trees[i].parents[j] not in kept[i]:
                continue  # its parent did not pay, so it cannot be verified (ties only)
            kept[i].append(j)
            gains[i] -= neg_value
            rows, sampled_rows, tokens = rows + 1, sampled_rows + sampled[i], tokens - neg_value
        rate = tokens / self._round(rows, sampled_rows, proposals)
        out = []
        for i, (tree, estimate, nodes) in enumerate(zip(trees, estimates, kept)):
            if tree.scores is None:
                out.append(tree)
                continue
            if estimate.probing and len(tree) > 1:
                # Paid: the round is faster with this proposal and its nodes than without either.
                extra = len(nodes) - 1
                without = (tokens - gains[i]) / self._round(rows - extra, sampled_rows - extra * sampled[i], proposals - proposal_seconds[i])
                estimate.pause = self.first_pause if rate > without else min(2 * estimate.pause, self.max_pause)
            elif len(nodes) > 1 and proposal_seconds[i] > 0:
                estimate.pause = self.first_pause
            estimate.probing = False
            out.append(subtree(tree.tokens, tree.parents, sorted(nodes), tree.scores))
        return out

    def record_proposal(self, backlog: int, seconds: float, estimate: DraftEstimate) -> None:
        """A proposal's time, and its values (as the request's record calibrates them) for the
        batch's recent proposals."""
        self.proposals.add(float(backlog), seconds)
        if estimate.history:
            self.recent.append(estimate.proposals()[-1])

    def record_round(
        self, seconds: float, requests: int, sampled_requests: int, rows: int, sampled_rows: int, proposal_seconds: float, accepted: int
    ) -> None:
        """A round's measured time without its proposals, against what the calibration predicts
        for its roots (one per request) and for its draft rows on top; and, for a round that
        drafted, whether it made more tokens than plain rounds would have in its time."""
        base = self.costs.seconds(requests, sampled_requests)
        plain = self.rounds.predict(base)
        if rows == requests:
            self.rounds.add(base, seconds)
        else:
            self.drafts.add(self.costs.seconds(rows, sampled_rows) - base, seconds - plain)
        if rows == requests and not proposal_seconds:
            self.trust = min(1.0, self.trust * 1.01)
            return
        surplus = accepted - (seconds + proposal_seconds - plain) * requests / plain
        self.trust = min(max(self.trust * math.exp(0.05 * max(min(surplus, 2.0), -2.0)), 0.05), 1.0)

    def _plan(self, requests: int, sampled_requests: int) -> None:
        """Start planning a round of `requests` roots (the costs below are per round)."""
        self._base = (requests, sampled_requests)
        self._costs = {}

    def _round(self, rows: int, sampled_rows: int, proposal_seconds: float) -> float:
        """A round's predicted seconds: its rows' forward (memoised for the round being planned:
        the choices ask for the same few sizes thousands of times) plus its proposals."""
        seconds = self._costs.get((rows, sampled_rows))
        if seconds is None:
            requests, sampled_requests = self._base
            base = self.costs.seconds(requests, sampled_requests)
            seconds = self.rounds.predict(base)
            if rows > requests:
                seconds += self.drafts.predict(self.costs.seconds(rows, sampled_rows) - base)
            self._costs[(rows, sampled_rows)] = seconds
        return seconds + proposal_seconds


@dataclass
class LinearFit:
    """y = slope * x + intercept by least squares over fading recent samples. With too little
    spread in x to tell slope from intercept, the slope stays at its prior `slope`; a fitted
    slope is held within [low, high]."""

    slope: float = 1.0
    low: float = 0.5
    high: float = 3.0
    n: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, x: float, y: float, fade: float = 0.98) -> None:
        self.n = fade * self.n + 1.0
        self.x = fade * self.x + x
        self.y = fade * self.y + y
        self.xx = fade * self.xx + x * x
        self.xy = fade * self.xy + x * y

    def predict(self, x: float) -> float:
        if self.n == 0:
            return self.slope * x
        mx, my = self.x / self.n, self.y / self.n
        var = self.xx / self.n - mx * mx
        slope = self.slope
        if var > max((0.1 * mx) ** 2, 1e-12):
            slope = min(max((self.xy / self.n - mx * my) / var, self.low), self.high)
        return slope * x + max(my - slope * mx, 0.0)


def tree_value(tree: DraftTree) -> float:
    """Expected accepted drafts of a tree by its own scores: a node is accepted exactly when
    the target agrees with its whole path, whose probability its cumulative score estimates."""
    return sum(math.exp(s) for s in (tree.scores or [])[1:])


def _synchronized(runner: TargetRunner) -> float:
    """The time once the runner's device has finished its queued work (CUDA runs asynchronously)."""
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter()


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: int) -> float:
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    k = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)
