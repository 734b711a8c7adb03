"""Target runner on a tiny random Llama: tree forward and KV commit against plain forwards."""

from __future__ import annotations

import random

import pytest
import torch

from specdec.tree import DraftTree
from tests.tiny import tiny_runner

TOL = 1e-5  # float32: a tree forward and a plain forward differ only in summation order
VOCAB = 64


def plain_forward(runner, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) after every position of `ids` from one fresh causal forward."""
    with torch.inference_mode():
        hidden = runner.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        return runner.lm_head(hidden), hidden


def random_tree(rng: random.Random, root: int, n: int) -> DraftTree:
    parents = [-1] + [rng.randrange(i) for i in range(1, n)]
    return DraftTree([root] + [rng.randrange(VOCAB) for _ in range(n - 1)], parents)


def chain_tree(rng: random.Random, root: int, depth: int, extra: int) -> DraftTree:
    """A chain root→…→depth plus `extra` random side branches, so paths of every length exist."""
    tokens, parents = [root], [-1]
    for d in range(depth):
        tokens.append(rng.randrange(VOCAB))
        parents.append(len(tokens) - 2 if d else 0)
    for _ in range(extra):
        parents.append(rng.randrange(len(tokens)))
        tokens.append(rng.randrange(VOCAB))
    return DraftTree(tokens, parents)


def path_to(tree: DraftTree, node: int) -> list[int]:
    path = [node]
    while tree.parents[path[-1]] >= 0:
        path.append(tree.parents[path[-1]])
    return path[::-1]


@pytest.mark.parametrize("seed", range(4))
def test_tree_forward_matches_sequential_on_every_path(seed):
    rng = random.Random(seed)
    runner = tiny_runner(seed)
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 12))]
    state = runner.new_state()
    runner.prefill(state, prompt[:-1])
    tree = random_tree(rng, prompt[-1], 12)
    logits, features = runner.forward_tree(state, tree)
    for node in range(len(tree)):
        seq = prompt[:-1] + [tree.tokens[i] for i in path_to(tree, node)]
        exp_logits, exp_features = plain_forward(runner, seq)
        torch.testing.assert_close(logits[node], exp_logits[-1], atol=TOL, rtol=TOL)
        torch.testing.assert_close(features[node], exp_features[-1], atol=TOL, rtol=TOL)


def test_prefill_returns_features_of_every_prompt_token():
    runner = tiny_runner(1)
    prompt = list(range(3, 20))
    features, last = runner.prefill(runner.new_state(), prompt)
    exp_logits, exp_features = plain_forward(runner, prompt)
    torch.testing.assert_close(features, exp_features, atol=TOL, rtol=TOL)
    torch.testing.assert_close(last, exp_logits[-1], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("accepted", [0, 1, 2, 4])  # 4 = the full depth of the chain
@pytest.mark.parametrize("seed", range(3))
def test_commit_keeps_exactly_the_accepted_path(seed, accepted):
    """After committing a path, the next round's logits equal a fresh forward over the whole
    committed sequence (the classic off-by-one of cache rewinding)."""
    rng = random.Random(100 * seed + accepted)
    runner = tiny_runner(seed)
    committed = [rng.randrange(VOCAB) for _ in range(6)]
    state = runner.new_state()
    runner.prefill(state, committed[:-1])
    for _ in range(3):  # several rounds so a wrong cache length would compound
        tree = chain_tree(rng, committed[-1], depth=4, extra=5)
        runner.forward_tree(state, tree)
        path = path_to(tree, accepted)  # chain node `accepted` is at depth `accepted`
        runner.commit(state, path)
        committed += [tree.tokens[i] for i in path[1:]] + [rng.randrange(VOCAB)]
        assert state.length == len(committed) - 1
        logits, _ = runner.forward_tree(state, random_tree(rng, committed[-1], 6))
        expected, _ = plain_forward(runner, committed)
        torch.testing.assert_close(logits[0], expected[-1], atol=TOL, rtol=TOL)
        runner.commit(state, [0])
        committed.append(rng.randrange(VOCAB))


def test_commit_side_branch_path_and_cache_shape():
    runner = tiny_runner(2)
    state = runner.new_state()
    runner.prefill(state, [5, 6, 7])
    tree = DraftTree([8, 1, 2, 3, 4], [-1, 0, 0, 2, 2])
    runner.forward_tree(state, tree)
    runner.commit(state, [0, 2, 4])
    assert state.length == 6 and state.pending == 0
    fresh = runner.new_state()
    runner.prefill(fresh, [5, 6, 7, 8, 2, 4])
    torch.testing.assert_close(state.cache.data[:, :, :, :6], fresh.cache.data[:, :, :, :6], atol=TOL, rtol=TOL)
    logits, _ = runner.forward_tree(state, DraftTree.single(9))
    expected, _ = plain_forward(runner, [5, 6, 7, 8, 2, 4, 9])
    torch.testing.assert_close(logits[0], expected[-1], atol=TOL, rtol=TOL)


def test_cache_grows_past_its_initial_capacity():
    runner = tiny_runner(3)
    state = runner.new_state(capacity=4)
    ids = list(range(1, 40))
    runner.prefill(state, ids[:3])
    for t in ids[3:]:
        runner.forward_tree(state, DraftTree([t, 1, 2], [-1, 0, 1]))
        runner.commit(state, [0])
    assert state.cache.capacity >= len(ids)
    logits, _ = runner.forward_tree(state, DraftTree.single(7))
    expected, _ = plain_forward(runner, ids + [7])
    torch.testing.assert_close(logits[0], expected[-1], atol=TOL, rtol=TOL)


def test_runner_refuses_out_of_order_calls():
    runner = tiny_runner(0)
    state = runner.new_state()
    with pytest.raises(RuntimeError):
        runner.commit(state, [0])
    runner.prefill(state, [1, 2])
    runner.forward_tree(state, DraftTree.single(3))
    with pytest.raises(RuntimeError):
        runner.forward_tree(state, DraftTree.single(3))
    with pytest.raises(RuntimeError):
        runner.prefill(state, [1])
