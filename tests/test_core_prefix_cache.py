"""The prefix cache: restoring a cached prefix equals prefilling it, a chat's next turn decodes
as without the cache (plain and speculative alike), and the store's LRU, superseding and size
rules."""

from __future__ import annotations

import threading

import pytest
import torch

from specdec.config import SamplingParams, StopConfig
from specdec.generate import Generation
from specdec.prefix_cache import PrefixCache, common_prefix
from specdec.tree import DraftTree
from tests.tiny import OracleDrafter, tiny_drafter, tiny_gguf_runner, tiny_runner


pytestmark = pytest.mark.usefixtures("one_thread")


def generate(runner, prompt, cache=None, drafter=None, max_new_tokens=12):
    gen = Generation(runner, prompt, SamplingParams(), StopConfig(max_new_tokens=max_new_tokens), drafter, prefix_cache=cache)
    for _ in gen:
        pass
    return gen


def stored_sequence(runner, tokens):
    """A sequence state and features holding `tokens`, prefilled."""
    state = runner.new_state()
    features, _ = runner.prefill(state, tokens)
    return state, features


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [6]) == 0


@pytest.mark.parametrize("make_runner", [tiny_runner, tiny_gguf_runner], ids=["python", "gguf-stack"])
def test_restored_prefix_then_rest_equals_a_whole_prefill(make_runner):
    """Prefilling the rest after a restored prefix gives the features and next-token logits of
    prefilling the whole prompt (to float rounding), on the Python path and the C++ stack."""
    runner = make_runner(3)
    prompt = [int(t) for t in torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(1))]
    whole_state = runner.new_state()
    whole_features, whole_logits = runner.prefill(whole_state, prompt)
    for cached in (1, 12, 30, 39):
        cache = PrefixCache(1000)
        cache.store(prompt[:cached], *stored_sequence(runner, prompt[:cached]))
        state, features = cache.restore(runner, prompt)
        assert state.length == cached and features.shape[0] == cached
        rest_features, logits = runner.prefill(state, prompt[cached:])
        assert state.length == len(prompt)
        torch.testing.assert_close(torch.cat([features, rest_features]), whole_features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=1e-5)


def test_restore_leaves_at_least_the_last_prompt_token_to_prefill():
    runner = tiny_runner()
    prompt = list(range(10))
    cache = PrefixCache(100)
    cache.store(prompt + [11, 12], *stored_sequence(runner, prompt + [11, 12]))
    state, features = cache.restore(runner, prompt)
    assert state.length == 9 and features.shape[0] == 9
    state, features = cache.restore(runner, [50, 51])
    assert state.length == 0 and features is None


@pytest.mark.parametrize("drafter_kind", ["none", "head", "oracle"])
def test_second_turn_decodes_the_same_with_the_cache(drafter_kind):
    """A conversation: turn 2's prompt is turn 1's prompt, answer and a new message. With the
    cache, turn 2 restores turn 1 and decodes the same tokens as a whole prefill."""
    runner = tiny_gguf_runner(4)
    drafter = {"none": None, "head": tiny_drafter(runner), "oracle": OracleDrafter(runner, width=2, depth=3)}[drafter_kind]
    cache = PrefixCache(1000)
    first_prompt = [1, 5, 9, 13, 17, 2]
    first = generate(runner, first_prompt, cache, drafter)
    assert first.stats.cached_prompt_tokens == 0 and len(cache) == 1
    second_prompt = first_prompt + first.token_ids + [3, 7, 11, 2]
    second = generate(runner, second_prompt, cache, drafter)
    uncached = generate(runner, second_prompt, None, drafter)
    # The last answer token has no KV entry when it was a round's bonus token (never verified).
    assert len(first_prompt) + len(first.token_ids) - 1 <= second.stats.cached_prompt_tokens
    assert second.stats.cached_prompt_tokens <= len(first_prompt) + len(first.token_ids)
    assert uncached.stats.cached_prompt_tokens == 0
    assert second.token_ids == uncached.token_ids
    assert second.stats.prompt_tokens == len(second_prompt)
    assert len(cache) == 1 and cache.tokens >= len(second_prompt)  # turn 2 superseded turn 1


def test_plain_and_speculative_paths_agree_on_their_own_caches():
    """What the bench does: each path keeps its own cache over a three-turn chat."""
    runner = tiny_gguf_runner(5)
    drafter = OracleDrafter(runner, width=2, depth=3)  # accepted often: multi-token commits
    caches = {"ar": PrefixCache(1000), "spec": PrefixCache(1000)}
    prompt = [4, 8, 15, 16, 23, 42]
    for turn in range(3):
        ar = generate(runner, prompt, caches["ar"])
        spec = generate(runner, prompt, caches["spec"], drafter)
        assert spec.token_ids == ar.token_ids
        assert spec.stats.target_forwards < ar.stats.target_forwards
        assert (spec.stats.cached_prompt_tokens > 0) == (ar.stats.cached_prompt_tokens > 0) == (turn > 0)
        prompt = prompt + ar.token_ids + [1, 2, 3]


def test_identical_prompt_reuses_all_but_its_last_token():
    runner = tiny_runner(6)
    cache = PrefixCache(1000)
    prompt = [7, 3, 9, 1, 4]
    first = generate(runner, prompt, cache)
    again = generate(runner, prompt, cache)
    assert again.stats.cached_prompt_tokens == len(prompt) - 1
    assert again.token_ids == first.token_ids


def test_least_recently_used_entries_go_first():
    runner = tiny_runner()
    cache = PrefixCache(25)
    for start in (0, 10, 20):
        tokens = list(range(start, start + 10))
        cache.store(tokens, *stored_sequence(runner, tokens))
        assert cache.tokens <= 25
    # Three 10-token entries do not fit in 25: the first stored went.
    assert len(cache) == 2
    assert cache.restore(runner, list(range(0, 11)))[0].length == 0
    assert cache.restore(runner, list(range(10, 21)))[0].length == 10  # now most recently used
    cache.store(list(range(30, 40)), *stored_sequence(runner, list(range(30, 40))))
    assert cache.restore(runner, list(range(20, 31)))[0].length == 0  # 20.. was least recently used
    assert cache.restore(runner, list(range(10, 21)))[0].length == 10


def test_longer_sequence_supersedes_its_prefix_and_a_prefix_is_not_stored_again():
    runner = tiny_runner()
    cache = PrefixCache(100)
    short, long = list(range(8)), list(range(20))
    cache.store(short, *stored_sequence(runner, short))
    cache.store(long, *stored_sequence(runner, long))
    assert len(cache) == 1 and cache.tokens == 20
    cache.store(short, *stored_sequence(runner, short))
    assert len(cache) == 1 and cache.tokens == 20


def test_too_long_sequences_are_not_stored_and_bad_input_is_refused():
    runner = tiny_runner()
    cache = PrefixCache(5)
    tokens = list(range(8))
    cache.store(tokens, *stored_sequence(runner, tokens))
    assert len(cache) == 0
    state, features = stored_sequence(runner, tokens[:4])
    with pytest.raises(ValueError, match="cannot store"):
        cache.store(tokens[:5], state, features)
    runner.forward_tree(state, DraftTree.single(9))
    with pytest.raises(ValueError, match="cannot store"):
        cache.store(tokens[:4], state, features)
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixCache(0)


def test_the_cache_copies_out_so_decoding_never_changes_an_entry():
    runner = tiny_runner(7)
    cache = PrefixCache(1000)
    prompt = [2, 4, 6, 8, 10, 12]
    generate(runner, prompt, cache)
    (entry,) = cache._entries.values()
    kv, features = entry.kv.clone(), entry.features.clone()
    generate(runner, prompt + [1], cache)
    generate(runner, prompt[:3] + [5, 5], cache)
    assert torch.equal(entry.kv, kv) and torch.equal(entry.features, features)


def test_concurrent_generations_share_one_cache():
    runner = tiny_runner(8)
    cache = PrefixCache(200)
    prompts = [[i, i + 1, i + 2, 30, 31, 32] for i in range(6)]
    expected = [generate(runner, p).token_ids for p in prompts]
    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = generate(runner, prompts[i], cache).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == expected
    assert cache.tokens <= 200
