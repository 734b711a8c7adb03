"""Greedy speculative decoding equals plain greedy decoding, token for token (tiny target)."""

from __future__ import annotations

import random

import pytest

from specdec.config import SamplingParams, StopConfig, TreeConfig
from specdec.generate import Generation
from tests.tiny import OracleDrafter, tiny_drafter, tiny_runner


def decode(runner, prompt, drafter=None, max_new_tokens=40, **stop):
    gen = Generation(runner, prompt, SamplingParams(), StopConfig(max_new_tokens=max_new_tokens, **stop), drafter)
    chunks = list(gen)
    assert [t for c in chunks for t in c.token_ids] == gen.token_ids
    return gen, chunks


def prompt_for(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(64) for _ in range(rng.randrange(1, 20))]


def paths(tree) -> set[tuple[int, ...]]:
    """Every node of a draft tree as its token path from the root."""
    out: list[tuple[int, ...]] = []
    for token, parent in zip(tree.tokens, tree.parents):
        out.append((out[parent] if parent >= 0 else ()) + (token,))
    return set(out)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("variant", ["fspad", "eagle2"])
def test_random_head_greedy_equals_plain(seed, variant):
    runner = tiny_runner(seed)
    prompt = prompt_for(seed)
    plain, _ = decode(runner, prompt)
    draft_vocab = 16 if seed % 2 else None
    spec, _ = decode(runner, prompt, tiny_drafter(runner, variant=variant, seed=seed, draft_vocab=draft_vocab))
    assert spec.token_ids == plain.token_ids
    assert spec.stats.draft_tokens > 0


@pytest.mark.parametrize("seed", range(12))
def test_oracle_drafter_accepts_deep_and_stays_identical(seed):
    """A drafter that often guesses right makes every accepted-path length happen."""
    runner = tiny_runner(seed, eos=seed % 5 if seed % 3 == 0 else None)
    prompt = prompt_for(seed)
    plain, _ = decode(runner, prompt)
    spec, _ = decode(runner, prompt, OracleDrafter(runner, width=2, depth=4))
    assert spec.token_ids == plain.token_ids
    assert spec.stats.target_forwards < plain.stats.target_forwards or len(plain.token_ids) < 2
    assert spec.stats.tau > 1.0 or len(plain.token_ids) < 2


def test_generation_stats_count_rounds():
    runner = tiny_runner(3)
    spec, _ = decode(runner, prompt_for(3), OracleDrafter(runner, width=1, depth=3), max_new_tokens=30)
    s = spec.stats
    assert s.new_tokens == 30
    assert s.target_forwards == 1 + len(s.accepted_per_round)
    # every round commits accepted + 1 (bonus); the last round may be cut by max_new_tokens
    assert 1 + sum(a + 1 for a in s.accepted_per_round) >= 30
    assert s.accepted_by_depth()[0] == sum(a >= 1 for a in s.accepted_per_round)
    assert s.draft_tokens == 3 * len(s.accepted_per_round)


@pytest.mark.parametrize("fail_every", [1, 2, 3])
def test_drafter_outage_falls_back_without_changing_output(fail_every):
    runner = tiny_runner(4)
    prompt = prompt_for(4)
    plain, _ = decode(runner, prompt)
    drafter = OracleDrafter(runner, width=2, depth=3, fail_every=fail_every)
    spec = Generation(runner, prompt, SamplingParams(), StopConfig(max_new_tokens=40), drafter, retry_rounds=2)
    list(spec)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.drafter_failures > 0 and spec.stats.fallback_rounds > 0
    if fail_every > 1:
        assert sum(spec.stats.accepted_per_round) > 0  # speculation resumed after the outage


def test_stops_at_eos_max_tokens_and_stop_string():
    runner = tiny_runner(5)
    prompt = prompt_for(5)
    free, _ = decode(runner, prompt, max_new_tokens=30)
    eos = free.token_ids[7]
    first = free.token_ids.index(eos)
    for drafter in (None, OracleDrafter(runner, width=2, depth=4)):
        gen, chunks = decode(runner, prompt, drafter, max_new_tokens=30, eos_token_ids=(eos,))
        assert gen.token_ids == free.token_ids[:first] and chunks[-1].finish_reason == "stop"
        gen, chunks = decode(runner, prompt, drafter, max_new_tokens=9)
        assert gen.token_ids == free.token_ids[:9] and chunks[-1].finish_reason == "length"
        stop = free.text[10:12]
        gen, chunks = decode(runner, prompt, drafter, max_new_tokens=30, stop_strings=(stop,))
        assert gen.text == free.text[: free.text.index(stop)] and chunks[-1].finish_reason == "stop"
        assert "".join(c.text for c in chunks) == gen.text


def test_context_limit_ends_with_length():
    runner = tiny_runner(6, max_pos=24)
    prompt = prompt_for(6)[:10]
    plain, chunks = decode(runner, prompt, max_new_tokens=100)
    assert chunks[-1].finish_reason == "length"
    assert len(prompt) + len(plain.token_ids) <= 24
    spec, _ = decode(runner, prompt, OracleDrafter(runner, width=2, depth=3), max_new_tokens=100)
    assert spec.token_ids == plain.token_ids


def test_zero_max_tokens_yields_nothing():
    runner = tiny_runner(0)
    gen, chunks = decode(runner, [1, 2, 3], max_new_tokens=0)
    assert gen.token_ids == [] and chunks[-1].finish_reason == "length"


def test_default_tree_config_drafter():
    runner = tiny_runner(7)
    prompt = prompt_for(7)
    plain, _ = decode(runner, prompt)
    spec, _ = decode(runner, prompt, tiny_drafter(runner, tree=TreeConfig()))
    assert spec.token_ids == plain.token_ids


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("min_prob", [0.05, 0.3, 0.9])
def test_min_prob_trees_are_subtrees_and_decode_identically(seed, min_prob):
    runner = tiny_runner(seed)
    prompt = prompt_for(seed)
    plain, _ = decode(runner, prompt)
    drafter = tiny_drafter(runner, TreeConfig(top_k=3, depth=4, total_tokens=10, min_prob=min_prob), seed=seed)
    session = drafter.open(prompt + plain.token_ids[:1], runner.prefill(runner.new_state(), prompt)[0])
    tree = session.propose()
    full = tiny_drafter(runner, TreeConfig(top_k=3, depth=4, total_tokens=10, min_prob=0.0), seed=seed)
    whole = full.open(prompt + plain.token_ids[:1], runner.prefill(runner.new_state(), prompt)[0]).propose()
    assert len(tree) <= len(whole)
    assert paths(tree) <= paths(whole), "min_prob only leaves nodes out of the same tree"
    spec, _ = decode(runner, prompt, drafter)
    assert spec.token_ids == plain.token_ids
