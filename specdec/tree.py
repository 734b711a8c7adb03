"""Token trees: the draft's proposal type, EAGLE-2 node selection, and attention-mask helpers.

A tree is a list of nodes in topological order (parents before children). Node 0 is the
root: the last token already chosen by the target, whose KV entry is not yet cached. Every
other node carries a draft token and the index of its parent.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class DraftTree:
    """tokens[i] is node i's token id; parents[i] its parent index (-1 for the root); scores[i],
    when the drafter gives them, node i's cumulative draft log-probability (the root's is 0): what
    `specdec.budget` reads to verify only a tree's most promising nodes when rows are dear."""

    tokens: list[int]
    parents: list[int]
    scores: list[float] | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens:
            raise ValueError("a tree needs as many parents as tokens, and a root")
        if self.scores is not None and len(self.scores) != len(self.tokens):
            raise ValueError("a tree's scores need one entry per node")
        if self.parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        for i, p in enumerate(self.parents[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must come before children")

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def single(token: int) -> "DraftTree":
        """A root-only tree: verifying it is one plain autoregressive step."""
        return DraftTree(tokens=[token], parents=[-1])

    def depths(self) -> list[int]:
        depth = [0] * len(self.parents)
        for i, p in enumerate(self.parents[1:], start=1):
            depth[i] = depth[p] + 1
        return depth


@dataclass
class CandidateTree:
    """Draft candidates before selection: node 0 is the root; `add` appends a child, or, when
    the parent already has a child with that token (a lookup chain and the head proposing the
    same continuation), keeps that node and the higher of the two scores. Scores are
    cumulative log-probabilities, never higher for a child than for its parent."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    scores: list[float] = field(default_factory=lambda: [0.0])
    _children: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, parent: int, token: int, score: float) -> int:
        node = self._children.get((parent, token))
        if node is None:
            node = len(self.tokens)
            self.tokens.append(int(token))
            self.parents.append(parent)
            self.scores.append(score)
            self._children[(parent, token)] = node
        elif score > self.scores[node]:
            self.scores[node] = score
        return node

    def bar(self, total_tokens: int, min_score: float) -> float:
        """The score a node needs to still be selectable: `select` keeps the best
        total_tokens - 1 non-root nodes at or above min_score, candidates only get added or
        raised, and a child never outscores its parent, so a node scoring below this can be
        left unexpanded without changing the selected tree."""
        keep = total_tokens - 1
        if keep < 1:
            return math.inf
        if len(self.scores) - 1 < keep:
            return min_score
        return max(min_score, heapq.nlargest(keep, self.scores[1:])[-1])

    def select(self, total_tokens: int, min_score: float = -math.inf) -> DraftTree:
        """The tree of the nodes `select_nodes` keeps, with their scores."""
        return subtree(self.tokens, self.parents, select_nodes(self.parents, self.scores, total_tokens, min_score), self.scores)


def ancestor_matrix(parents: Sequence[int]) -> torch.Tensor:
    """Boolean [n, n]: entry (i, j) is True when node j is node i or one of its ancestors."""
    n = len(parents)
    anc = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        anc[i] |= anc[parents[i]]
    return anc


def tree_attention_mask(parents: Sequence[int], past_len: int, device: torch.device | str) -> torch.Tensor:
    """Boolean attention mask [n, past_len + n] (True = may attend): every node sees the whole
    committed past and its own ancestors, itself included."""
    n = len(parents)
    allowed = torch.ones(n, past_len + n, dtype=torch.bool)
    allowed[:, past_len:] = ancestor_matrix(parents)
    return allowed.to(device)


def select_nodes(
    parents: Sequence[int], scores: Sequence[float], total_tokens: int, min_score: float = -math.inf
) -> list[int]:
    """EAGLE-2 reranking: keep the root and the best `total_tokens - 1` other nodes by score,
    none of them scoring below `min_score` except the single best draft (our choice): every
    round verifies at least one draft token, so a head that is never confident (an untrained
    or badly calibrated one) still gets its best guess tried at the price of one node.

    Scores are cumulative log-probabilities, so a child never outscores its parent; ties are
    broken by node index, which puts parents first. Returns kept indices in ascending order, so
    the result is still topologically ordered and every kept node's parent is kept too.
    """
    order = sorted(range(1, len(parents)), key=lambda i: (-scores[i], i))
    order = order[:1] + [i for i in order[1:] if scores[i] >= min_score]
    kept = sorted([0] + order[: max(total_tokens - 1, 0)])
    kept_set = set(kept)
    if any(parents[i] not in kept_set for i in kept[1:]):
        raise AssertionError("selected a node without its parent")
    return kept


def subtree(
    tokens: Sequence[int], parents: Sequence[int], kept: Sequence[int], scores: Sequence[float] | None = None
) -> DraftTree:
    """The tree made of the nodes `kept` (ascending, root first), parents re-indexed."""
    new_index = {old: new for new, old in enumerate(kept)}
    return DraftTree(
        tokens=[int(tokens[i]) for i in kept],
        parents=[-1] + [new_index[parents[i]] for i in kept[1:]],
        scores=None if scores is None else [float(scores[i]) for i in kept],
    )


class InvalidTree(ValueError):
    """A drafter proposed something the verifier must not run as a tree (a remote drafter's
    malformed parents, say): the round decodes plainly instead, and the session goes on."""


def tree_problem(tree: DraftTree, root: int, vocab_size: int, budget: int) -> str | None:
    """Why `tree` cannot be this round's draft, or None when it can: its root must be `root`,
    the last committed token; every token an id of the vocabulary; and it may not outgrow the
    `budget` positions reserved for it. (Parents are checked when a DraftTree is built.) The
    decode loop checks every proposal, so a faulty drafter can cost speed, never correctness."""
    if len(tree) > budget:
        return f"{len(tree)} nodes, over the budget of {budget}"
    if tree.tokens[0] != root:
        return f"root token {tree.tokens[0]} is not the last committed token {root}"
    outside = next((t for t in tree.tokens if not 0 <= t < vocab_size), None)
    if outside is not None:
        return f"token {outside} is outside the vocabulary [0, {vocab_size})"
    return None
