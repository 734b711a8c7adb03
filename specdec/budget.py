"""Load-adaptive speculation: which requests of a batched round draft, and how many of their draft
nodes the target verifies.

A round costs one target forward over every row of the batch (each request's root, plus the
draft nodes verified) and a proposal from each request that drafts. Both are measured, not
assumed: `CostModel.calibrate` times forwards of 1..N rows on the running target at start, and
the budget keeps a running mean of the proposals' own time. A draft node is worth the
probability that the target accepts it: the drafter's cumulative draft probability estimates
it, and each request's record of accepted against predicted drafts corrects it
(`DraftEstimate`: a miscalibrated head, a sampled request, text the head never saw).

Each round the budget first admits drafters, best expected gain first, while they raise the
round's expected tokens per second, then admits their nodes, most likely first, by the same
rule. With many requests in the batch every row costs nearly a full token's compute, so trees
shrink; where drafts are rarely accepted no node pays and the round is plain batched decoding.
A request kept from drafting probes again after a pause that doubles with every probe that
does not pay. The choice only changes which tree is verified, never the output: every tree
yields the same tokens (`specdec.verify`).
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.target import SequenceState, TargetRunner
from specdec.tree import DraftTree, subtree

CALIBRATION_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


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
    def calibrate(cls, runner: TargetRunner, rows: Sequence[int] = CALIBRATION_ROWS, context: int = 128, repeats: int = 3) -> "CostModel":
        """Time forwards of each row count on `context` tokens of committed text, as a batch
        of sequences of up to 8 rows each (the shape of batched trees), the fastest of
        `repeats`."""
        base = runner.new_state(context + 16)
        runner.prefill(base, [(7 * i + 3) % runner.vocab_size for i in range(context)])
        forward, greedy, sampled = [], [], []
        for count in rows:
            sizes = [min(8, count - start) for start in range(0, count, 8)]
            states = [SequenceState(base.cache.clone(), base.length) for _ in sizes]
            trees = [DraftTree([5] * n, [-1] + list(range(n - 1))) for n in sizes]
            best = [math.inf] * 3
            for _ in range(repeats):
                began = time.perf_counter()
                hidden = torch.cat(runner.forward_trees(states, trees))
                mid = time.perf_counter()
                runner.greedy_tokens(hidden)
                end = time.perf_counter()
                runner.logits(hidden)
                last = time.perf_counter()
                for state in states:
                    runner.commit(state, [])
                best = [min(best[0], mid - began), min(best[1], end - mid), min(best[2], last - end)]
            forward.append(best[0])
            greedy.append(best[1])
            sampled.append(best[2])
        return cls(tuple(rows), tuple(forward), tuple(greedy), tuple(sampled))


@dataclass
class DraftEstimate:
    """One request's drafting record: running means of the drafts it was predicted to get
    accepted (the drafter's probabilities of the verified nodes) and of those it got, and of the
    predicted value of its whole proposals; the rounds since it last proposed."""

    predicted: float | None = None
    accepted: float | None = None
    proposal_value: float | None = None
    idle: int = 0
    pause: int = 0  # rounds without proposals after one that did not pay; 0: not paused

    @property
    def calibration(self) -> float:
        """Accepted per predicted draft (1 until the request has a record)."""
        return self.accepted / self.predicted if self.predicted and self.accepted is not None else 1.0

    @property
    def gain(self) -> float | None:
        """Drafts a full proposal is expected to get accepted; None before the first one."""
        return None if self.proposal_value is None else self.proposal_value * self.calibration

    def proposed(self, tree: DraftTree) -> None:
        self.idle = 0
        self.proposal_value = _mix(self.proposal_value, tree_value(tree))

    def verified(self, tree: DraftTree, accepted: int) -> None:
        if tree.scores is None or len(tree) == 1:
            return
        self.predicted = _mix(self.predicted, tree_value(tree))
        self.accepted = _mix(self.accepted, float(accepted))


@dataclass
class SpeculationBudget:
    """Chooses the drafters and the verified nodes of each round from a `CostModel`; one per
    batch of generations."""

    costs: CostModel
    proposal_seconds: float | None = None
    first_pause: int = 4
    max_pause: int = 256

    def drafters(self, estimates: Sequence[DraftEstimate], may_draft: Sequence[bool], sizes: Sequence[int], sampled: Sequence[bool]) -> list[bool]:
        """Which requests propose this round. `may_draft[i]`: request i has a drafter and room;
        `sizes[i]`: its largest tree; `sampled[i]`: it samples (its rows' LM head costs more).
        Requests without a record, and those whose pause is over, probe; paused ones wait."""
        choose = [False] * len(estimates)
        rows, sampled_rows = len(estimates), sum(sampled)
        tokens, proposals = float(len(estimates)), 0
        ranked = []
        for i, (estimate, allowed) in enumerate(zip(estimates, may_draft)):
            if not allowed:
                continue
            gain = estimate.gain
            if gain is None or (estimate.pause and estimate.idle >= estimate.pause):
                choose[i] = True
                proposals += 1
            elif not estimate.pause:
                ranked.append((gain / max(sizes[i] - 1, 1), i))
        for _, i in sorted(ranked, reverse=True):
            extra = sizes[i] - 1
            now = tokens / self._round(rows, sampled_rows, proposals)
            gain = estimates[i].gain or 0.0
            later = (tokens + gain) / self._round(rows + extra, sampled_rows + extra * sampled[i], proposals + 1)
            if later <= now:
                break
            choose[i] = True
            rows, sampled_rows, tokens, proposals = rows + extra, sampled_rows + extra * sampled[i], tokens + gain, proposals + 1
        for estimate, chosen, allowed in zip(estimates, choose, may_draft):
            if allowed and not chosen:
                estimate.idle += 1
        return choose

    def trim(self, trees: Sequence[DraftTree], estimates: Sequence[DraftEstimate], sampled: Sequence[bool], proposals: int) -> list[DraftTree]:
        """Each tree cut to the nodes worth their rows this round (root-only when none is):
        nodes enter best expected value first while the round's expected tokens per second
        rise. Trees without scores stay whole. A proposal whose best node does not pay
        lengthens its request's pause; one that does resets it."""
        rows = sum(1 if t.scores is not None else len(t) for t in trees)
        sampled_rows = sum(s * (1 if t.scores is not None else len(t)) for t, s in zip(trees, sampled))
        tokens = float(len(trees))
        candidates = []
        for i, (tree, estimate) in enumerate(zip(trees, estimates)):
            if tree.scores is not None:
                scale = estimate.calibration
                candidates += [(-min(1.0, scale * math.exp(s)), i, j) for j, s in enumerate(tree.scores) if j]
        kept: list[list[int]] = [[0] for _ in trees]
        for neg_value, i, j in sorted(candidates):
            now = tokens / self._round(rows, sampled_rows, proposals)
            later = (tokens - neg_value) / self._round(rows + 1, sampled_rows + sampled[i], proposals)
            if later <= now:
                break
            if trees[i].parents[j] not in kept[i]:
                continue  # its parent did not pay, so it cannot be verified (ties only)
            kept[i].append(j)
            rows, sampled_rows, tokens = rows + 1, sampled_rows + sampled[i], tokens - neg_value
        out = []
        for tree, estimate, nodes in zip(trees, estimates, kept):
            if tree.scores is None:
                out.append(tree)
                continue
            if len(tree) > 1:
                paid = len(nodes) > 1
                estimate.pause = 0 if paid else min(max(2 * estimate.pause, self.first_pause), self.max_pause)
            out.append(subtree(tree.tokens, tree.parents, sorted(nodes), tree.scores))
        return out

    def record_proposal(self, seconds: float) -> None:
        self.proposal_seconds = _mix(self.proposal_seconds, seconds)

    def _round(self, rows: int, sampled_rows: int, proposals: int) -> float:
        return self.costs.seconds(rows, sampled_rows) + proposals * (self.proposal_seconds or 0.0)


def tree_value(tree: DraftTree) -> float:
    """Expected accepted drafts of a tree by its own scores: a node is accepted exactly when
    the target agrees with its whole path, whose probability its cumulative score estimates."""
    return sum(math.exp(s) for s in (tree.scores or [])[1:])


def _mix(old: float | None, new: float) -> float:
    """A running mean in which the newest round weighs a quarter (about the last 4-8 rounds)."""
    return new if old is None else 0.75 * old + 0.25 * new


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: int) -> float:
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    k = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)
