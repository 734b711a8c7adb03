"""The drafter boundary: `tree_problem` accepts exactly the trees the verifier may run, and a
drafter that proposes bad trees (wrong root, out-of-vocabulary tokens, too many nodes) changes
nothing in the output."""

from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from specdec.config import SamplingParams, StopConfig
from specdec.drafter import Drafter, DraftSession
from specdec.generate import Generation
from specdec.tree import DraftTree, tree_problem
from tests.tiny import draft_trees, tiny_runner

VOCAB = 16
pytestmark = pytest.mark.usefixtures("one_thread")


def trees(max_nodes: int = 12) -> st.SearchStrategy[DraftTree]:
    return draft_trees(VOCAB, max_nodes)


@given(trees())
def test_a_tree_within_the_rules_is_accepted(tree: DraftTree) -> None:
    assert tree_problem(tree, tree.tokens[0], VOCAB, len(tree)) is None
    assert tree_problem(tree, tree.tokens[0], VOCAB, len(tree) + 5) is None


@given(trees(), st.integers(0, VOCAB - 1))
def test_a_root_other_than_the_last_committed_token_is_rejected(tree: DraftTree, root: int) -> None:
    problem = tree_problem(tree, root, VOCAB, len(tree))
    assert (problem is None) == (root == tree.tokens[0])
    if problem is not None:
        assert "root" in problem


@given(trees(), st.data())
def test_a_token_outside_the_vocabulary_is_rejected(tree: DraftTree, data: st.DataObject) -> None:
    node = data.draw(st.integers(1, len(tree) - 1)) if len(tree) > 1 else 0
    bad = data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=VOCAB)))
    tokens = list(tree.tokens)
    tokens[node] = bad
    problem = tree_problem(DraftTree(tokens, list(tree.parents)), tokens[0], VOCAB, len(tree))
    assert problem is not None and "vocabulary" in problem and str(bad) in problem


@given(trees(), st.integers(1, 12))
def test_a_tree_over_the_budget_is_rejected(tree: DraftTree, budget: int) -> None:
    problem = tree_problem(tree, tree.tokens[0], VOCAB, budget)
    assert (problem is None) == (len(tree) <= budget)
    if problem is not None:
        assert "budget" in problem


def test_the_reasons_are_short_and_specific() -> None:
    tree = DraftTree([3, 4, 99], [-1, 0, 1])
    assert tree_problem(tree, 3, 100, 3) is None
    assert tree_problem(tree, 5, 100, 3) == "root token 3 is not the last committed token 5"
    assert tree_problem(tree, 3, 50, 3) == "token 99 is outside the vocabulary [0, 50)"
    assert tree_problem(tree, 3, 100, 2) == "3 nodes, over the budget of 2"


def wrong_root(root: int, vocab: int, budget: int) -> DraftTree:
    return DraftTree([(root + 1) % vocab, root], [-1, 0])


def out_of_vocabulary(root: int, vocab: int, budget: int) -> DraftTree:
    return DraftTree([root, vocab + 7, -1], [-1, 0, 0])


def too_many_nodes(root: int, vocab: int, budget: int) -> DraftTree:
    return DraftTree([root] * (budget + 3), [-1] + list(range(budget + 2)))


class AdversarialDrafter(Drafter):
    """Proposes `bad` trees on odd rounds and the target-agnostic chain root -> root on even
    ones (a valid tree, so the loop keeps drafting)."""

    def __init__(self, vocab: int, bad: Callable[[int, int, int], DraftTree], budget: int = 4):
        self.vocab, self.bad, self._budget = vocab, bad, budget

    @property
    def budget(self) -> int:
        return self._budget

    def open(self, token_ids: Sequence[int], features: torch.Tensor) -> "AdversarialSession":
        return AdversarialSession(self, list(token_ids))


class AdversarialSession(DraftSession):
    def __init__(self, drafter: AdversarialDrafter, tokens: list[int]):
        self.drafter, self.tokens, self.rounds = drafter, tokens, 0

    def extend(self, token_ids: Sequence[int], features: torch.Tensor) -> None:
        self.tokens += list(token_ids)

    def propose(self) -> DraftTree:
        self.rounds += 1
        root = self.tokens[-1]
        if self.rounds % 2:
            return self.drafter.bad(root, self.drafter.vocab, self.drafter.budget)
        return DraftTree([root, root], [-1, 0])

    def close(self) -> None:
        pass


@pytest.mark.parametrize("bad", [wrong_root, out_of_vocabulary, too_many_nodes])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bad_trees_are_rejected_and_the_output_is_unchanged(bad, temperature: float) -> None:
    runner = tiny_runner(5)
    sampling = SamplingParams(temperature=temperature, seed=11)
    stop = StopConfig(max_new_tokens=24)
    plain = Generation(runner, [5, 9, 14, 3], sampling, stop)
    list(plain)
    drafted = Generation(runner, [5, 9, 14, 3], sampling, stop, drafter=AdversarialDrafter(runner.vocab_size, bad))
    list(drafted)
    assert drafted.token_ids == plain.token_ids
    assert drafted.stats.invalid_trees > 0
    assert drafted.stats.draft_tokens > 0, "the session drafts again after a rejected tree"
