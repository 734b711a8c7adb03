"""Answers decoded together in one shared KV cache equal answers decoded one by one."""

from __future__ import annotations

import random

import pytest
import torch

from specdec.config import SamplingParams, StopConfig
from specdec.generate import Generation
from specdec.train.batched import decode_together
from specdec.train.extract import features_of
from tests.tiny import tiny_gguf_runner, tiny_runner

EOS = 5


def prompts_for(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, 64) for _ in range(rng.randrange(1, 30))] for _ in range(count)]


@pytest.mark.parametrize("stack", [True, False])
def test_greedy_answers_equal_plain_decoding_and_features_the_targets(stack):
    runner = (tiny_gguf_runner if stack else tiny_runner)(5, eos=EOS, sharpness=2.0)
    assert bool(runner.lean.stack_rows) == stack
    prompts = prompts_for(1, 11)
    done: list[int] = []
    # 4 rows for 11 prompts of 1-29 tokens, up to 40 new: prompts join as others end, and the
    # slots of ended sequences are squeezed out several times.
    answers = decode_together(runner, prompts, 40, rows=4, on_done=done.append)
    assert sorted(done) == list(range(11))
    ended_early = 0
    for prompt, answer in zip(prompts, answers):
        plain = Generation(runner, prompt, SamplingParams(), StopConfig(max_new_tokens=40, eos_token_ids=(EOS,)))
        list(plain)
        ended = len(plain.token_ids) < 40  # at an EOS, which plain decoding does not return
        assert answer.tokens == plain.token_ids + [EOS] * ended
        ended_early += answer.tokens[-1] == EOS and len(answer.tokens) < 40
        fed = prompt + answer.tokens[:-1]
        features = torch.cat(answer.features)
        assert features.shape == (len(fed), runner.hidden_size)
        assert torch.allclose(features, features_of(runner, fed), atol=1e-4)
    assert 0 < ended_early < 11  # both ways of ending were exercised


def test_rows_do_not_change_results_on_the_stack():
    """Stepped alone or 6 at a time, the same answers and features (up to float rounding: the
    prompts' forward, batched or not, may round differently)."""
    runner = tiny_gguf_runner(4, eos=EOS, sharpness=2.0)
    prompts = prompts_for(2, 7)
    alone = decode_together(runner, prompts, 30, rows=1)
    together = decode_together(runner, prompts, 30, rows=6)
    for a, b in zip(alone, together):
        assert a.tokens == b.tokens
        assert torch.allclose(torch.cat(a.features), torch.cat(b.features), atol=1e-5)


def test_sampled_answers_follow_the_generator():
    runner = tiny_gguf_runner(5, eos=EOS, sharpness=1.0)
    prompts = prompts_for(3, 5)
    run = lambda seed: [a.tokens for a in decode_together(runner, prompts, 20, 1.0, 3, torch.Generator().manual_seed(seed))]  # noqa: E731
    assert run(0) == run(0)
    assert run(0) != run(1)
    greedy = [a.tokens for a in decode_together(runner, prompts, 20, 0.0, 3)]
    assert run(0) != greedy
