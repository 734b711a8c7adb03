"""Lossless sampling: speculative output follows the target's warped distribution exactly.

Statistical tests use fixed seeds (deterministic) and reject at significance 1e-3 (chi-square,
bins with expected count < 5 merged).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specdec.config import SamplingParams, StopConfig
from specdec.generate import Generation
from specdec.sampling import FLOAT32_MIN_TEMPERATURE, make_generator, sample, warp_probs
from specdec.tree import DraftTree
from specdec.verify import verify_walk
from tests.tiny import OracleDrafter, tiny_runner

ALPHA = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def chi2_pvalue(samples: list[int], probs: np.ndarray) -> float:
    """p-value of samples against probs; low-expectation bins are merged into one."""
    n = len(samples)
    counts = Counter(samples)
    assert all(probs[t] > 0 for t in counts), "sampled a token of probability zero"
    expected = probs * n
    big = expected >= 5
    obs = [counts.get(int(t), 0) for t in np.flatnonzero(big)]
    exp = list(expected[big])
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp > 1e-9:
        obs.append(rest_obs)
        exp.append(rest_exp)
    exp = np.asarray(exp) * (sum(obs) / sum(exp))
    return float(chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("scale", [1.0, 37.5])
def test_sample_follows_its_weights_and_never_draws_a_zero(scale):
    """Weights need not sum to 1; zero-weight tokens (first, inside, last) never come out."""
    weights = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 1e-3, 0.049, 0.0], dtype=torch.float64) * scale
    gen = make_generator(5)
    draws = [sample(weights, gen) for _ in range(20000)]
    assert chi2_pvalue(draws, (weights / weights.sum()).numpy()) > ALPHA
    assert sample(torch.tensor([0.0, 0.0, 3.0]), gen) == 2
    with pytest.raises(ValueError, match="mass"):
        sample(torch.zeros(4), gen)


def test_sample_is_seeded():
    weights = torch.softmax(torch.randn(1000, generator=torch.Generator().manual_seed(0)), 0)
    a, b = make_generator(9), make_generator(9)
    assert [sample(weights, a) for _ in range(50)] == [sample(weights, b) for _ in range(50)]

@pytest.mark.parametrize("temperature", [FLOAT32_MIN_TEMPERATURE, 0.7, 1.0, 2.5])
def test_float32_warp_matches_the_float64_softmax(temperature):
    """Plain temperature sampling takes the float32 softmax; it is the float64 one up to float32
    rounding. Below the threshold, or with top-k/top-p, the float64 path stays."""
    logits = torch.randn(3, 4096, generator=torch.Generator().manual_seed(1)) * 8
    p = warp_probs(logits, SamplingParams(temperature=temperature))
    assert p.dtype == torch.float32
    exact = torch.softmax(logits.double() / temperature, -1)
    torch.testing.assert_close(p.double(), exact, rtol=1e-5, atol=1e-12)
    assert warp_probs(logits, SamplingParams(temperature=FLOAT32_MIN_TEMPERATURE / 2)).dtype == torch.float64
    assert warp_probs(logits, SamplingParams(temperature=temperature, top_p=0.9)).dtype == torch.float64
    assert warp_probs(logits, SamplingParams(temperature=temperature, top_k=5)).dtype == torch.float64



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampled_walk_leaves_the_target_rows_unchanged(dtype):
    """`sample` reads a row in place (no copy when it is already on the CPU), so a draw that
    wrote to it would change the target's distribution for the rest of the walk."""
    probs = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(3)), -1).to(dtype)
    before = probs.clone()
    tree = DraftTree([0, 1, 2, 3], [-1, 0, 0, 0])
    gen = make_generator(0)
    outcomes = [verify_walk(tree.tokens, tree.parents, lambda node: sample(probs[node], gen)) for _ in range(200)]
    assert any(a.num_accepted == 0 for a in outcomes)  # every child rejected at least once
    assert torch.equal(probs, before)


def test_sampled_walk_first_token_follows_target():
    gen = torch.Generator().manual_seed(0)
    vocab = 12
    probs = torch.softmax(torch.randn(7, vocab, generator=gen) * 1.5, -1)
    # root proposes tokens 3, 5, 0; node 1 (token 3) proposes 4, 4's node proposes 1
    tree = DraftTree([9, 3, 5, 0, 4, 7, 1], [-1, 0, 0, 0, 1, 1, 4])
    firsts, seconds_after_3 = [], []
    g = make_generator(1)
    for _ in range(20000):
        acc = verify_walk(tree.tokens, tree.parents, lambda node: sample(probs[node], g))
        emitted = [tree.tokens[i] for i in acc.path[1:]] + [acc.bonus_token]
        firsts.append(emitted[0])
        if emitted[0] == 3 and len(emitted) > 1:
            seconds_after_3.append(emitted[1])
    assert chi2_pvalue(firsts, probs[0].double().numpy()) > ALPHA
    # whenever token 3 was accepted, the next token follows node 1's distribution
    assert chi2_pvalue(seconds_after_3, probs[1].double().numpy()) > ALPHA


def test_token_after_draws_a_row_from_its_warped_logits_only_when_asked():
    runner = tiny_runner(11, sharpness=8.0)
    state = runner.new_state()
    runner.prefill(state, [5, 17, 42, 8])
    tree = DraftTree([3, 4, 9], [-1, 0, 0])
    logits, hidden = runner.forward_tree(state, tree)
    params = SamplingParams(temperature=0.9)
    gen = make_generator(2)
    before = gen.get_state().clone()
    pick = runner.token_after(hidden, params, gen)
    assert torch.equal(gen.get_state(), before)  # no row is drawn from before the walk asks
    draws = [pick(2) for _ in range(4000)]
    assert chi2_pvalue(draws, warp_probs(logits[2], params).double().numpy()) > ALPHA
    greedy = runner.token_after(hidden, SamplingParams(), gen)
    assert [greedy(i) for i in range(len(tree))] == logits.argmax(-1).tolist()


def exact_second_token(runner, prompt: list[int], params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Exact marginals of the first and second generated tokens under warped target sampling."""
    vocab = runner.vocab_size
    with torch.inference_mode():
        p1 = warp_probs(runner.model(input_ids=torch.tensor([prompt])).logits[0, -1], params).double()
        batch = torch.tensor([prompt + [t] for t in range(vocab)])
        p2_given = warp_probs(runner.model(input_ids=batch).logits[:, -1], params).double()
    return p1.numpy(), (p1 @ p2_given).numpy()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=8),
        SamplingParams(temperature=1.3, top_p=0.7),
    ],
    ids=["t1", "topk", "topp"],
)
def test_speculative_sampling_matches_target_distribution(params):
    runner = tiny_runner(11, sharpness=8.0)
    prompt = [5, 17, 42, 8]
    p1, p2 = exact_second_token(runner, prompt, params)
    firsts, seconds, accepted = sample_first_two(runner, prompt, params, OracleDrafter(runner, width=3, depth=2), 2000)
    assert accepted > 300, "the drafter should be right often enough to exercise acceptance"
    assert chi2_pvalue(firsts, p1) > ALPHA
    assert chi2_pvalue(seconds, p2) > ALPHA


def sample_first_two(runner, prompt: list[int], params: SamplingParams, drafter, runs: int) -> tuple[list[int], list[int], int]:
    """The first two tokens of `runs` speculative generations (seeds 0..runs-1) and the drafts
    accepted over all of them."""
    firsts, seconds, accepted = [], [], 0
    for seed in range(runs):
        s = SamplingParams(params.temperature, params.top_p, params.top_k, seed=seed)
        gen = Generation(runner, prompt, s, StopConfig(max_new_tokens=2), drafter)
        list(gen)
        firsts.append(gen.token_ids[0])
        seconds.append(gen.token_ids[1])
        accepted += sum(gen.stats.accepted_per_round)
    return firsts, seconds, accepted


def test_plain_sampling_is_seeded_and_reproducible():
    runner = tiny_runner(12)
    params = SamplingParams(temperature=1.0, seed=7)
    runs = []
    for drafter in (None, None, OracleDrafter(runner), OracleDrafter(runner)):
        gen = Generation(runner, [1, 2, 3], params, StopConfig(max_new_tokens=20), drafter)
        list(gen)
        runs.append(gen.token_ids)
    assert runs[0] == runs[1] and runs[2] == runs[3]
    assert runs[2] == runs[0]  # and the speculative path samples the plain path's tokens


@pytest.mark.parametrize("seed", range(4))
def test_seeded_speculative_sampling_gives_the_plain_tokens(seed):
    """One draw per emitted token, each from a row equal to the one-token step's: the same seed
    gives the same tokens with or without drafts, accepted or not."""
    runner = tiny_runner(13, sharpness=6.0)
    params = SamplingParams(temperature=0.8, seed=seed)
    plain = Generation(runner, [4, 9, 1], params, StopConfig(max_new_tokens=24))
    list(plain)
    spec = Generation(runner, [4, 9, 1], params, StopConfig(max_new_tokens=24), OracleDrafter(runner, width=2, depth=3))
    list(spec)
    assert sum(spec.stats.accepted_per_round) > 0
    assert spec.token_ids == plain.token_ids
