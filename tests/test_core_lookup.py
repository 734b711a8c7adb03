"""Lookup drafting: the n-gram index, chain scores, merging a chain into the head's tree, and
decoding with it (greedy and sampled output unchanged)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.config import ConfigError, SamplingParams, StopConfig, TreeConfig
from specdec.generate import Generation
from specdec.lookup import FIRST_TOKEN_PROB, MAX_MATCH, NEXT_TOKEN_PROB, NgramIndex, chain_log_probs, merge_chain
from specdec.tree import DraftTree, select_nodes, subtree
from tests.test_core_sampling import ALPHA, chi2_pvalue, exact_second_token
from tests.tiny import tiny_drafter, tiny_runner


def index_of(tokens, **kw) -> NgramIndex:
    index = NgramIndex(**kw)
    index.extend(tokens)
    return index


def test_longest_suffix_wins_and_latest_occurrence():
    # "7 1 2" occurred once (followed by 9); "1 2" last occurred followed by 5.
    index = index_of([7, 1, 2, 9, 1, 2, 5, 3, 7, 1, 2])
    draft = index.lookup(2)
    assert (draft.tokens, draft.match) == ([9, 1], 3)
    index = index_of([1, 2, 9, 4, 1, 2, 5, 3, 1, 2])
    assert index.lookup(1).tokens == [5] and index.lookup(1).match == 2


def test_continuation_repeats_with_the_period_of_the_match():
    index = index_of([4, 5, 6, 4, 5, 6])
    draft = index.lookup(7)
    assert draft.tokens == [4, 5, 6, 4, 5, 6, 4]
    assert draft.match == 3
    assert index_of([3, 3]).lookup(4).tokens == [3, 3, 3, 3]


def test_no_match_or_no_room_gives_none():
    assert index_of([1, 2, 3, 4]).lookup(3) is None
    assert index_of([1, 2, 1]).lookup(0) is None
    assert index_of([]).lookup(2) is None
    assert index_of([5, 1, 2, 6, 1, 2], min_n=3).lookup(2) is None
    with pytest.raises(ValueError):
        NgramIndex(min_n=3, max_n=2)


def test_extend_in_pieces_equals_extend_at_once():
    tokens = [1, 2, 3, 1, 2, 4, 1, 2, 3, 1]
    pieces = NgramIndex()
    for i in range(0, len(tokens), 3):
        pieces.extend(tokens[i : i + 3])
    assert pieces.lookup(5) == index_of(tokens).lookup(5)


def test_chain_scores_follow_the_table_and_never_rise():
    assert chain_log_probs(1, 1) == [pytest.approx(math.log(FIRST_TOKEN_PROB[1]))]
    scores = chain_log_probs(40, 4)
    assert scores[0] == pytest.approx(math.log(FIRST_TOKEN_PROB[MAX_MATCH]))
    assert scores[1] - scores[0] == pytest.approx(math.log(NEXT_TOKEN_PROB[MAX_MATCH]))
    for n in range(1, MAX_MATCH + 1):
        s = chain_log_probs(n, 6)
        assert all(a >= b for a, b in zip(s, s[1:]))
    firsts = [chain_log_probs(n, 1)[0] for n in range(1, MAX_MATCH + 1)]
    assert firsts == sorted(firsts), "a longer match is at least as trustworthy"


def test_merge_shares_existing_children_and_keeps_the_higher_score():
    tokens, parents, scores = [0, 10, 11, 12], [-1, 0, 0, 1], [0.0, -0.5, -1.0, -2.0]
    merge_chain(tokens, parents, scores, [10, 12, 13], [-0.1, -0.2, -0.3])
    assert tokens == [0, 10, 11, 12, 13] and parents == [-1, 0, 0, 1, 3]
    assert scores == [0.0, -0.1, -1.0, -0.2, -0.3]
    merge_chain(tokens, parents, scores, [11, 14], [-3.0, -3.5])
    assert scores[2] == -1.0, "a lower lookup score never lowers a head node"
    assert (tokens[-1], parents[-1]) == (14, 2)


@st.composite
def head_trees(draw):
    """Candidate trees as a head builds them: distinct tokens among siblings, scores that
    never rise from parent to child."""
    tokens, parents, scores = [0], [-1], [0.0]
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.integers(0, len(tokens) - 1))
        siblings = {t for t, p in zip(tokens, parents) if p == parent}
        token = draw(st.integers(1, 6).filter(lambda t: t not in siblings))
        tokens.append(token)
        parents.append(parent)
        scores.append(scores[parent] - draw(st.floats(0.0, 3.0)))
    return tokens, parents, scores


@settings(max_examples=200, deadline=None)
@given(head_trees(), st.lists(st.integers(1, 6), min_size=1, max_size=7), st.integers(1, 12), st.integers(1, 10))
def test_merged_candidates_select_to_valid_trees(tree, chain, match, budget):
    tokens, parents, scores = (list(x) for x in tree)
    merge_chain(tokens, parents, scores, chain, chain_log_probs(match, len(chain)))
    assert len({(p, t) for p, t in zip(parents, tokens)}) == len(tokens), "no token twice under one parent"
    assert all(scores[i] <= scores[p] for i, p in enumerate(parents) if p >= 0)
    kept = select_nodes(parents, scores, budget, math.log(0.2))
    draft = subtree(tokens, parents, kept)
    assert isinstance(draft, DraftTree) and len(draft) <= max(budget, 2)


def test_negative_lookup_tokens_is_refused():
    with pytest.raises(ConfigError):
        TreeConfig(lookup_tokens=-1)


def _session(runner, tree, prompt, first):
    """A drafter session over `prompt` whose first generated token is `first`."""
    features, _ = runner.prefill(runner.new_state(), prompt)
    return tiny_drafter(runner, tree).open(prompt + [first], features)


def test_repeated_text_puts_its_continuation_in_the_tree():
    runner = tiny_runner(1)
    loop = [5, 9, 14, 2, 30, 7]
    prompt = loop * 3 + loop[:3]
    session = _session(runner, TreeConfig(top_k=2, depth=2, total_tokens=12, min_prob=0.0, lookup_tokens=5), prompt, loop[3])
    root = loop[3]
    expected = session.index.lookup(5)
    assert expected.tokens == [30, 7, 5, 9, 14] and expected.match == MAX_MATCH
    tree = session.propose()
    paths = []
    for token, parent in zip(tree.tokens, tree.parents):
        paths.append((paths[parent] if parent >= 0 else ()) + (token,))
    assert (root, *expected.tokens) in paths, "the whole chain hangs from the root"
    off = _session(runner, TreeConfig(top_k=2, depth=2, total_tokens=12, min_prob=0.0, lookup_tokens=0), prompt, root).propose()
    assert len(off) <= 1 + 2 + 4, "without lookup only the head's nodes"


@pytest.mark.parametrize("seed", range(6))
def test_lookup_drafting_keeps_greedy_output(seed):
    runner = tiny_runner(seed, sharpness=8.0)
    prompt = [3, 4, 5, 6] * 3 + [3]
    plain = Generation(runner, prompt, SamplingParams(), StopConfig(max_new_tokens=48))
    list(plain)
    tree = TreeConfig(top_k=2, depth=2, total_tokens=8, min_prob=0.0, lookup_tokens=6)
    spec = Generation(runner, prompt, SamplingParams(), StopConfig(max_new_tokens=48), tiny_drafter(runner, tree, seed=seed))
    list(spec)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.draft_tokens > 0


def test_lookup_drafting_keeps_the_sampled_distribution():
    """Sampled (T=0.3, where this tiny target is confident enough to repeat itself), the first
    two tokens after a prompt it loops on follow the target's exact marginals, with lookup
    chains accepted often (chi-square as in test_core_sampling)."""
    runner = tiny_runner(11, sharpness=16.0)
    start = [5, 17, 42, 8]
    greedy = Generation(runner, start, SamplingParams(), StopConfig(max_new_tokens=24))
    list(greedy)
    prompt = start + greedy.token_ids  # a sharp random model's greedy text repeats itself
    params = SamplingParams(temperature=0.3)
    p1, p2 = exact_second_token(runner, prompt, params)
    drafter = tiny_drafter(runner, TreeConfig(top_k=1, depth=1, total_tokens=6, min_prob=0.0, lookup_tokens=4))
    firsts, seconds, accepted = [], [], 0
    for seed in range(1500):
        gen = Generation(runner, prompt, SamplingParams(0.3, seed=seed), StopConfig(max_new_tokens=2), drafter)
        list(gen)
        firsts.append(gen.token_ids[0])
        seconds.append(gen.token_ids[1])
        accepted += sum(gen.stats.accepted_per_round)
    assert accepted > 300, "lookup chains should be accepted often here"
    assert chi2_pvalue(firsts, p1) > ALPHA
    assert chi2_pvalue(seconds, p2) > ALPHA
