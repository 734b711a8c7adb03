"""One target forward over many sequences' trees (ragged, each with its own positions, KV cache
and mask) equals each sequence's own tree forward: bit for bit on the C++ decoder stack, to
float rounding on the Python path; and a ragged commit leaves each cache equal to a fresh
prefill of its accepted text."""

from __future__ import annotations

import random

import pytest
import torch

from specdec.gguf_linear import kernel
from specdec.tree import DraftTree
from tests.test_core_target import VOCAB, random_tree
from tests.tiny import tiny_gguf_runner, tiny_runner


def _cases(rng: random.Random, count: int) -> list[tuple[list[int], DraftTree]]:
    """Prompts of different lengths and trees of different sizes (root-only ones included)."""
    cases = []
    for i in range(count):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))]
        root = rng.randrange(VOCAB)
        tree = DraftTree.single(root) if i % 3 == 0 else random_tree(rng, root, rng.randrange(2, 9))
        cases.append((prompt, tree))
    return cases


def _alone(runner, prompt, tree):
    state = runner.new_state(capacity=4)
    runner.prefill(state, prompt)
    return runner.forward_tree(state, tree, logits=False)[1]


def _batched(runner, cases):
    states = []
    for prompt, _ in cases:
        states.append(runner.new_state(capacity=4))
        runner.prefill(states[-1], prompt)
    return states, runner.forward_trees(states, [tree for _, tree in cases])


@pytest.mark.skipif(kernel() is None, reason="no AVX2 CPU or no C++ compiler: no decoder stack")
@pytest.mark.parametrize("seed", range(3))
def test_batched_trees_equal_each_tree_alone_bit_for_bit_on_the_stack(seed):
    rng = random.Random(seed)
    runner = tiny_gguf_runner(seed)
    cases = _cases(rng, 6)
    _, hidden = _batched(runner, cases)
    for (prompt, tree), got in zip(cases, hidden):
        assert torch.equal(got, _alone(runner, prompt, tree))
    rows = torch.cat(hidden)
    assert rows.shape[0] > runner.lean.lm_head.max_rows
    assert torch.equal(runner.logits(rows), torch.cat([runner.logits(h) for h in hidden]))
    assert runner.greedy_tokens(rows) == [t for h in hidden for t in runner.greedy_tokens(h)]


@pytest.mark.parametrize("seed", range(2))
def test_batched_trees_match_each_tree_alone_on_the_python_path(seed):
    rng = random.Random(seed)
    runner = tiny_runner(seed)
    cases = _cases(rng, 5)
    _, hidden = _batched(runner, cases)
    for (prompt, tree), got in zip(cases, hidden):
        torch.testing.assert_close(got, _alone(runner, prompt, tree), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_runner, tiny_gguf_runner])
def test_ragged_commit_leaves_each_cache_equal_to_a_fresh_prefill_of_its_text(make):
    rng = random.Random(7)
    runner = make(3)
    cases = _cases(rng, 5)
    states, _ = _batched(runner, cases)
    for state, (prompt, tree) in zip(states, cases):
        node = rng.randrange(len(tree))
        path = [node]
        while tree.parents[path[-1]] >= 0:
            path.append(tree.parents[path[-1]])
        path.reverse()
        runner.commit(state, path)
        text = prompt + [tree.tokens[i] for i in path]
        fresh = runner.new_state()
        runner.prefill(fresh, text)
        assert state.length == fresh.length == len(text)
        torch.testing.assert_close(
            state.cache.data[:, :, :, : len(text)], fresh.cache.data[:, :, :, : len(text)], atol=1e-5, rtol=1e-5
        )


def test_forward_trees_refuses_a_sequence_twice_and_a_pending_tree():
    runner = tiny_runner(0)
    state = runner.new_state()
    runner.prefill(state, [1, 2, 3])
    with pytest.raises(ValueError, match="one tree per forward"):
        runner.forward_trees([state, state], [DraftTree.single(4), DraftTree.single(5)])
    runner.forward_trees([state], [DraftTree.single(4)])
    with pytest.raises(RuntimeError, match="commit"):
        runner.forward_trees([state], [DraftTree.single(4)])
