"""The speculation back-off: its pause schedule, and decoding with it stays lossless and seeded."""

from __future__ import annotations

import pytest

from specdec.backoff import BackoffConfig, SpeculationBackoff
from specdec.config import ConfigError, SamplingParams, StopConfig
from specdec.generate import Generation
from tests.tiny import OracleDrafter, tiny_drafter, tiny_runner


def drafted_rounds(backoff: SpeculationBackoff, accepted_when_drafting: int, rounds: int) -> list[int]:
    """The rounds (1..rounds) that draft when every drafted round accepts the same count."""
    out = []
    for r in range(1, rounds + 1):
        if backoff.drafting(r):
            out.append(r)
            backoff.record(r, accepted_when_drafting)
    return out


def test_pause_doubles_while_probes_fail_up_to_the_cap():
    backoff = SpeculationBackoff(BackoffConfig(break_even=1.0, window=2, pause=3, max_pause=6), greedy=False)
    # Rounds 1-2 fill the window (0 < 1): pause 3 -> rounds 3-5 plain; probe 6-7 -> pause 6 (8-13);
    # probe 14-15 -> pause 6 again (capped): 16-21; probe 22-23.
    assert drafted_rounds(backoff, 0, 23) == [1, 2, 6, 7, 14, 15, 22, 23]


def test_a_window_at_break_even_never_pauses_and_resets_the_pause():
    backoff = SpeculationBackoff(BackoffConfig(break_even=1.0, window=2, pause=3, max_pause=12), greedy=False)
    assert drafted_rounds(backoff, 1, 10) == list(range(1, 11))
    backoff.record(11, 0)  # the window (1, 0) falls short: pause 3
    assert not backoff.drafting(12) and not backoff.drafting(14) and backoff.drafting(15)
    backoff.record(15, 0)
    backoff.record(16, 0)  # the probe fails: pause 6
    assert not backoff.drafting(22) and backoff.drafting(23)
    backoff.record(23, 2)
    backoff.record(24, 2)  # the probe succeeds: the pause is back to 3
    backoff.record(25, 0)  # (2, 0) still reaches the break-even
    assert backoff.drafting(26)
    backoff.record(26, 0)  # (0, 0) falls short
    assert not backoff.drafting(29) and backoff.drafting(30)


def test_greedy_requests_and_break_even_zero_never_back_off():
    for backoff in (
        SpeculationBackoff(BackoffConfig(), greedy=True),
        SpeculationBackoff(BackoffConfig(break_even=0.0), greedy=False),
    ):
        assert drafted_rounds(backoff, 0, 50) == list(range(1, 51))
    assert BackoffConfig(greedy_too=True).applies(greedy=True)


@pytest.mark.parametrize(
    "kwargs", [{"break_even": -0.1}, {"window": 0}, {"pause": 0}, {"pause": 8, "max_pause": 4}]
)
def test_invalid_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        BackoffConfig(**kwargs)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_with_back_off_equals_plain(seed):
    """A random head is rarely right: the back-off pauses it, and the answer is still plain's."""
    runner = tiny_runner(seed)
    prompt = [3, 9, 27, 17, 51][: seed + 2]
    stop = StopConfig(max_new_tokens=60)
    plain = Generation(runner, prompt, SamplingParams(), stop)
    list(plain)
    backoff = BackoffConfig(break_even=1.0, window=2, pause=4, greedy_too=True)
    spec = Generation(runner, prompt, SamplingParams(), stop, tiny_drafter(runner, seed=seed), backoff=backoff)
    list(spec)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.paused_rounds > 0
    assert spec.stats.target_forwards == 1 + len(spec.stats.accepted_per_round) + spec.stats.paused_rounds


def test_sampled_back_off_is_seeded_and_reproducible():
    runner = tiny_runner(12)
    params = SamplingParams(temperature=1.0, seed=7)
    runs = []
    for _ in range(2):
        gen = Generation(runner, [1, 2, 3], params, StopConfig(max_new_tokens=50), tiny_drafter(runner, seed=1))
        list(gen)
        runs.append((gen.token_ids, gen.stats.paused_rounds, gen.stats.accepted_per_round))
    assert runs[0] == runs[1]
    assert runs[0][1] > 0, "a random head at T=1 should fall below the default break-even"


def test_a_drafter_that_is_usually_right_is_never_paused():
    runner = tiny_runner(5)
    backoff = BackoffConfig(break_even=1.0, window=4, greedy_too=True)
    gen = Generation(runner, [4, 8, 15], SamplingParams(), StopConfig(max_new_tokens=40), OracleDrafter(runner, width=1, depth=3), backoff=backoff)
    list(gen)
    assert sum(gen.stats.accepted_per_round) > len(gen.stats.accepted_per_round)
    assert gen.stats.paused_rounds == 0
