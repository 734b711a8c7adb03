"""Lookup drafting: the n-gram index, chain scores, merging a chain into the head's tree, and
decoding with it (greedy and sampled output unchanged)."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.config import ConfigError, SamplingParams, StopConfig, TreeConfig
from specdec.generate import Generation
from specdec.lookup import FIRST_TOKEN_PROB, MAX_MATCH, NEXT_TOKEN_PROB, NgramIndex, chain_log_probs
from specdec.tree import CandidateTree, DraftTree, select_nodes
from tests.test_core_sampling import ALPHA, chi2_pvalue, exact_second_token, sample_first_two
from specdec.drafter import HeadDraftSession, _read_pending
from tests.tiny import tiny_drafter, tiny_head, tiny_runner


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


def add_chain(cands: CandidateTree, chain, scores) -> None:
    node = 0
    for token, score in zip(chain, scores):
        node = cands.add(node, token, score)


def test_a_chain_shares_existing_children_and_keeps_the_higher_score():
    cands = CandidateTree([0])
    for parent, token, score in [(0, 10, -0.5), (0, 11, -1.0), (1, 12, -2.0)]:
        cands.add(parent, token, score)
    add_chain(cands, [10, 12, 13], [-0.1, -0.2, -0.3])
    assert cands.tokens == [0, 10, 11, 12, 13] and cands.parents == [-1, 0, 0, 1, 3]
    assert cands.scores == [0.0, -0.1, -1.0, -0.2, -0.3]
    add_chain(cands, [11, 14], [-3.0, -3.5])
    assert cands.scores[2] == -1.0, "a lower lookup score never lowers a head node"
    assert (cands.tokens[-1], cands.parents[-1]) == (14, 2)


@st.composite
def head_trees(draw):
    """(parent, token, score) additions as a head makes them: parents before children,
    distinct tokens among siblings, scores that never rise from parent to child."""
    parents, tokens, scores, adds = [-1], [0], [0.0], []
    for _ in range(draw(st.integers(0, 14))):
        parent = draw(st.integers(0, len(tokens) - 1))
        siblings = {t for t, p in zip(tokens, parents) if p == parent}
        token = draw(st.integers(1, 6).filter(lambda t: t not in siblings))
        score = scores[parent] - draw(st.floats(0.0, 3.0))
        parents.append(parent)
        tokens.append(token)
        scores.append(score)
        adds.append((parent, token, score))
    return adds


@settings(max_examples=200, deadline=None)
@given(head_trees(), st.lists(st.integers(1, 6), min_size=1, max_size=7), st.integers(1, 12), st.integers(1, 10))
def test_candidates_with_a_chain_select_to_valid_trees(adds, chain, match, budget):
    cands = CandidateTree([0])
    add_chain(cands, chain, chain_log_probs(match, len(chain)))
    where = {0: 0}  # a head node's index in `adds` numbering -> its candidate node
    for i, (parent, token, score) in enumerate(adds, start=1):
        where[i] = cands.add(where[parent], token, score)
    assert all(cands.scores[i] <= cands.scores[p] for i, p in enumerate(cands.parents) if p >= 0)
    pairs = list(zip(cands.parents, cands.tokens))
    assert len(set(pairs)) == len(pairs), "no token twice under one parent"
    draft = cands.select(budget, math.log(0.2))
    assert isinstance(draft, DraftTree) and len(draft) <= max(budget, 2)


@settings(max_examples=300, deadline=None)
@given(head_trees(), st.integers(1, 10), st.sampled_from([0.0, 0.05, 0.2, 0.5]))
def test_the_bar_never_prunes_a_node_the_selection_keeps(adds, budget, min_prob):
    """Adding nodes in order, a parent scoring below the bar at the time its child is added
    (what the drafter leaves unexpanded) never has that child in the final selection."""
    min_score = math.log(min_prob) if min_prob else -math.inf
    cands = CandidateTree([0])
    pruned = set()
    for parent, token, score in adds:
        below = cands.scores[parent] < cands.bar(budget, min_score) if parent else False
        node = cands.add(parent, token, score)
        if below:
            pruned.add(node)
    kept = set(select_nodes(cands.parents, cands.scores, budget, min_score))
    assert not (pruned & kept)


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


def greedy_plain_and_speculative(runner, prompt: list[int], tree: TreeConfig, seed: int, tokens: int) -> tuple[Generation, Generation]:
    """The plain and the speculative greedy generation of `tokens` tokens after `prompt`."""
    runs = []
    for drafter in (None, tiny_drafter(runner, tree, seed=seed)):
        gen = Generation(runner, prompt, SamplingParams(), StopConfig(max_new_tokens=tokens), drafter)
        list(gen)
        runs.append(gen)
    return runs[0], runs[1]


@pytest.mark.parametrize("seed", range(6))
def test_lookup_drafting_keeps_greedy_output(seed):
    tree = TreeConfig(top_k=2, depth=2, total_tokens=8, min_prob=0.0, lookup_tokens=6)
    plain, spec = greedy_plain_and_speculative(tiny_runner(seed, sharpness=8.0), [3, 4, 5, 6] * 3 + [3], tree, seed, 48)
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
    firsts, seconds, accepted = sample_first_two(runner, prompt, params, drafter, 1500)
    assert accepted > 300, "lookup chains should be accepted often here"
    assert chi2_pvalue(firsts, p1) > ALPHA
    assert chi2_pvalue(seconds, p2) > ALPHA


def test_lookup_alone_is_validated():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            TreeConfig(lookup_alone=bad)


def test_min_prob_is_validated_however_the_config_is_built():
    """The check sits in the dataclass itself, so flags and settings objects meet it too."""
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match="min_prob"):
            TreeConfig(min_prob=bad)
        with pytest.raises(ConfigError, match="min_prob"):
            TreeConfig.from_attributes(argparse.Namespace(**{**asdict(TreeConfig()), "min_prob": bad}))
    assert TreeConfig.from_attributes(argparse.Namespace(**asdict(TreeConfig(min_prob=0.0)))).min_prob == 0.0


def test_a_likely_chain_is_proposed_without_the_head_which_catches_up_later():
    """A chain at least lookup_alone likely is the whole tree and the head does not run; the
    features it skipped are read in its next round, leaving its cache as if it had read them
    round by round (float32 head: the same numbers up to summation order)."""
    runner = tiny_runner(2)
    loop = [5, 9, 14, 2, 30, 7]
    prompt = loop * 3 + loop[:3]
    features, _ = runner.prefill(runner.new_state(), prompt)
    head = tiny_head(runner).eval().requires_grad_(False)
    sessions = []
    for alone_prob in (0.5, 1.0):
        session = HeadDraftSession(head, TreeConfig(top_k=2, depth=2, total_tokens=8, min_prob=0.0, lookup_tokens=5, lookup_alone=alone_prob))
        session.index.extend(prompt[:1])
        session.extend(prompt[1:] + [loop[3]], features)
        sessions.append(session)
    alone, steady = sessions
    before = alone.cache.length
    tree = alone.propose()
    assert alone.cache.length == before == 0 and tree.tokens == [loop[3], 30, 7, 5, 9, 14] and tree.parents == [-1, 0, 1, 2, 3, 4]
    steady.propose()
    state = runner.new_state()
    features, _ = runner.prefill(state, prompt + [loop[3], 30, 7])
    for session in (alone, steady):
        session.extend([30, 7, 5], features[-3:])
    assert alone.cache.length < steady.cache.length
    _read_pending(head, [alone, steady])
    assert alone.cache.length == steady.cache.length
    torch.testing.assert_close(alone._root_hidden, steady._root_hidden, atol=1e-4, rtol=1e-4)


def test_head_context_is_validated():
    with pytest.raises(ConfigError):
        TreeConfig(head_context=-1)


@torch.inference_mode()
def test_head_context_reads_only_the_prompts_last_pairs():
    """With head_context W, a session opened on a long prompt drafts as one opened on the
    prompt's last W tokens and their features (lookup off, so the index's extra tokens do not
    matter), before and after a round's tokens arrive; with 0 it reads them all."""
    runner = tiny_runner(3)
    prompt = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    features, _ = runner.prefill(runner.new_state(), prompt)
    first, window = 11, 6
    tree = TreeConfig(top_k=2, depth=3, total_tokens=8, min_prob=0.0, lookup_tokens=0)
    windowed = tiny_drafter(runner, replace(tree, head_context=window)).open(prompt + [first], features)
    short = tiny_drafter(runner, replace(tree, head_context=0)).open(prompt[-window:] + [first], features[-window:])
    whole = tiny_drafter(runner, replace(tree, head_context=0)).open(prompt + [first], features)
    assert windowed.propose() == short.propose() != whole.propose()
    assert windowed.tokens == prompt + [first], "the lookup index keeps every token"
    more = torch.randn(2, features.shape[1])
    for session in (windowed, short):
        session.extend([first, 23], more)
    assert windowed.propose() == short.propose()
    assert whole.cache.length == len(prompt) and windowed.cache.length == window + 2


@pytest.mark.parametrize("seed", range(3))
def test_greedy_output_is_unchanged_by_a_small_head_context(seed):
    prompt = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(seed)).tolist()
    tree = TreeConfig(top_k=2, depth=2, total_tokens=6, min_prob=0.0, head_context=4)
    plain, spec = greedy_plain_and_speculative(tiny_runner(seed, sharpness=8.0), prompt, tree, seed, 40)
    assert spec.token_ids == plain.token_ids and spec.stats.draft_tokens > 0


@torch.inference_mode()
def test_open_with_the_features_of_a_suffix():
    """A session may open with the features of the prompt's last tokens only (a remote verifier
    sends no more than the head reads): it drafts as one opened on that suffix, its index keeps
    every token, and more features than tokens before the root are refused."""
    runner = tiny_runner(4)
    prompt = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    features, _ = runner.prefill(runner.new_state(), prompt)
    tree = TreeConfig(top_k=2, depth=3, total_tokens=8, min_prob=0.0, lookup_tokens=0, head_context=0)
    suffix = tiny_drafter(runner, tree).open(prompt + [7], features[-5:])
    short = tiny_drafter(runner, tree).open(prompt[-5:] + [7], features[-5:])
    assert suffix.propose() == short.propose() and suffix.tokens == prompt + [7]
    with pytest.raises(ValueError):
        tiny_drafter(runner, tree).open(prompt[-3:] + [7], features[-5:])
