"""Property tests of the pure core: tree helpers, greedy and sampling acceptance, warping."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.config import SamplingParams
from specdec.sampling import make_generator, sample, warp_probs
from specdec.tree import DraftTree, ancestor_matrix, select_nodes, subtree
from specdec.verify import verify_walk
from tests.tiny import draft_trees

VOCAB = 8


def trees(max_nodes: int = 12) -> st.SearchStrategy[DraftTree]:
    return draft_trees(VOCAB, max_nodes)


@st.composite
def prob_tables(draw, n: int) -> torch.Tensor:
    """n distributions over VOCAB with some exact zeros."""
    rows = []
    for _ in range(n):
        w = draw(st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0, 3.0]), min_size=VOCAB, max_size=VOCAB))
        if sum(w) == 0:
            w[draw(st.integers(0, VOCAB - 1))] = 1.0
        rows.append(torch.tensor(w, dtype=torch.float64) / sum(w))
    return torch.stack(rows)


def assert_root_path(tree: DraftTree, path: list[int]) -> None:
    assert path[0] == 0
    for a, b in zip(path, path[1:]):
        assert tree.parents[b] == a


@given(trees(), st.data())
def test_greedy_path_follows_argmax(tree, data):
    argmax = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=len(tree), max_size=len(tree)))
    acc = verify_walk(tree.tokens, tree.parents, argmax.__getitem__)
    assert_root_path(tree, acc.path)
    for a, b in zip(acc.path, acc.path[1:]):
        assert tree.tokens[b] == argmax[a]
    last = acc.path[-1]
    assert acc.bonus_token == argmax[last]
    assert all(tree.tokens[c] != argmax[last] for c, p in enumerate(tree.parents) if p == last)


@settings(max_examples=200)
@given(trees(), st.data(), st.integers(0, 2**31 - 1))
def test_sampling_path_is_valid_and_bonus_is_possible(tree, data, seed):
    probs = data.draw(prob_tables(len(tree)))
    gen = make_generator(seed)
    acc = verify_walk(tree.tokens, tree.parents, lambda node: sample(probs[node], gen))
    assert_root_path(tree, acc.path)
    for a, b in zip(acc.path, acc.path[1:]):
        assert probs[a, tree.tokens[b]] > 0  # never accepts an impossible token
    last = acc.path[-1]
    assert 0 <= acc.bonus_token < VOCAB
    assert probs[last, acc.bonus_token] > 0
    rejected = {tree.tokens[c] for c, p in enumerate(tree.parents) if p == last}
    support = {t for t in range(VOCAB) if probs[last, t] > 0}
    if not support <= rejected:  # the bonus comes from the residual, without rejected tokens
        assert acc.bonus_token not in rejected


@given(trees(), st.data())
def test_point_mass_sampling_equals_greedy(tree, data):
    argmax = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=len(tree), max_size=len(tree)))
    probs = torch.nn.functional.one_hot(torch.tensor(argmax), VOCAB).double()
    gen = make_generator(0)
    assert verify_walk(tree.tokens, tree.parents, lambda node: sample(probs[node], gen)) == verify_walk(
        tree.tokens, tree.parents, argmax.__getitem__
    )


@given(
    st.lists(st.floats(-20, 20), min_size=2, max_size=30),
    st.floats(0.05, 3.0),
    st.integers(0, 40),
    st.floats(0.01, 1.0),
)
def test_warp_probs_is_a_distribution_with_the_right_support(logits, temperature, top_k, top_p):
    x = torch.tensor(logits)
    p = warp_probs(x, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.all(p >= 0) and abs(float(p.sum()) - 1.0) < 1e-5
    kept = p > 0
    base = warp_probs(x, SamplingParams(temperature=temperature, top_k=top_k))  # before top-p
    # kept tokens are a prefix of the probability ranking (ties in either order)
    if (~kept).any():
        assert base[kept].min() >= base[~kept].max()
    if top_k and top_k < len(logits):
        assert int(kept.sum()) <= int((base >= torch.topk(base, top_k).values[-1]).sum())
    if top_p < 1.0:
        # dropping the smallest kept token would leave less than top_p of the mass
        assert float(base[kept].sum()) - float(base[kept].min()) < top_p + 1e-5
    assert base[kept].max() == base.max()  # the most likely token always survives


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=30))
def test_greedy_warp_is_one_hot_argmax(logits):
    p = warp_probs(torch.tensor(logits), SamplingParams())
    assert float(p.sum()) == 1.0 and int(p.argmax()) == int(torch.tensor(logits).argmax())


@given(trees(max_nodes=20), st.data())
def test_select_nodes_keeps_parents_and_order(tree, data):
    depth = tree.depths()
    # cumulative scores: a child never outscores its parent
    scores = [0.0]
    for i in range(1, len(tree)):
        scores.append(scores[tree.parents[i]] - data.draw(st.floats(0, 5)))
    total = data.draw(st.integers(1, len(tree) + 2))
    kept = select_nodes(tree.parents, scores, total)
    assert kept[0] == 0 and kept == sorted(kept) and len(kept) == min(total, len(tree))
    small = subtree(tree.tokens, tree.parents, kept)
    assert [small.depths()[j] for j in range(len(kept))] == [depth[i] for i in kept]
    anc = ancestor_matrix(small.parents)
    assert bool(anc.diagonal().all()) and bool(anc[:, 0].all())


@given(trees(max_nodes=20), st.data())
def test_select_nodes_leaves_out_unlikely_nodes_but_the_best_and_keeps_parents(tree, data):
    scores = [0.0]
    for i in range(1, len(tree)):
        scores.append(scores[tree.parents[i]] - data.draw(st.floats(0, 3)))
    min_score = data.draw(st.floats(-6, 0))
    kept = select_nodes(tree.parents, scores, len(tree), min_score)
    assert kept[0] == 0 and kept == sorted(kept)
    best = min(range(1, len(tree)), key=lambda i: (-scores[i], i), default=None)
    assert kept == [0] + [i for i in range(1, len(tree)) if scores[i] >= min_score or i == best]
    assert all(tree.parents[i] in kept for i in kept[1:])


@given(
    st.lists(st.floats(-30, 30), min_size=2, max_size=20),
    st.sampled_from([1e-300, 1e-40, 1e-8, 1e-3]),
    st.sampled_from([2e-313, 1e-45, 1e-9, 0.3]),
)
def test_extreme_temperature_and_top_p_stay_distributions(logits, temperature, top_p):
    p = warp_probs(torch.tensor(logits), SamplingParams(temperature=temperature, top_p=top_p))
    assert not torch.isnan(p).any() and abs(float(p.sum()) - 1.0) < 1e-5
    x = torch.tensor(logits)
    assert x[p > 0].max() == x.max()  # the mass sits on a most likely token


def test_top_p_keeps_the_most_likely_token_when_probabilities_round_to_a_tie():
    """At temperature 1e-8 logits 0 and 1e-29 give equal float64 probabilities; the nucleus of a
    tiny top_p is still the token with the larger logit (a case hypothesis found)."""
    p = warp_probs(torch.tensor([0.0, 1.0272857916550828e-29]), SamplingParams(temperature=1e-8, top_p=2e-313))
    assert p.tolist() == [0.0, 1.0]
