"""Continuous batching (`specdec.batch`) is lossless: generations that join at staggered steps,
with different prompts, lengths and stop strings, give exactly the tokens they give alone
(greedy and seeded sampling, on the C++ decoder stack whose rows do not depend on the batch);
a cancelled or failing generation leaves the others unchanged; sampling within a batch follows
the target's distribution; and the load-adaptive budget only changes speed."""

from __future__ import annotations

import random

import numpy as np
import pytest

from specdec.batch import Batch
from specdec.budget import CostModel, LinearFit, SpeculationBudget
from specdec.config import SamplingParams, StopConfig, TreeConfig
from specdec.gguf_linear import kernel
from specdec.generate import Generation, _propose
from tests.test_core_sampling import ALPHA, chi2_pvalue, exact_second_token
from tests.tiny import OracleDrafter, tiny_drafter, tiny_gguf_runner, tiny_runner

needs_stack = pytest.mark.skipif(kernel() is None, reason="no AVX2 CPU or no C++ compiler: no decoder stack")

# A cost model in which rows are cheap next to a forward: the budget drafts nearly everything.
CHEAP_ROWS = CostModel((1, 64), (0.010, 0.020), (0.001, 0.002), (0.001, 0.004))
# One in which every row costs a full forward: no draft node ever pays.
DEAR_ROWS = CostModel((1, 64), (0.010, 0.640), (0.001, 0.064), (0.001, 0.064))


def requests(seed: int, count: int, sampled: bool = False) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        stop = {"stop_strings": ("DE",)} if i % 3 == 1 else {}
        temperature = 0.9 if sampled else 0.0
        out.append(
            {
                "prompt": [rng.randrange(64) for _ in range(rng.randrange(1, 30))],
                "sampling": SamplingParams(temperature=temperature, top_p=0.95 if sampled and i % 2 else 1.0, seed=1000 + i),
                "stop": StopConfig(max_new_tokens=rng.randrange(1, 40), **stop),
            }
        )
    return out


def make(runner, request: dict, drafter, prefill_chunk: int = 8) -> Generation:
    return Generation(runner, request["prompt"], request["sampling"], request["stop"], drafter, prefill_chunk=prefill_chunk)


def alone(runner, request: dict, drafter) -> list[int]:
    gen = make(runner, request, drafter)
    list(gen)
    return gen.token_ids


def batched(runner, reqs: list[dict], drafter, budget=None, stagger: int = 2, cancel: int | None = None) -> tuple[list[Generation], Batch]:
    """Run `reqs` in one batch, request i joining at step stagger * i; `cancel` is removed
    after its third chunk."""
    batch = Batch(runner, budget)
    gens = [make(runner, r, drafter) for r in reqs]
    chunks = {id(g): 0 for g in gens}
    step, pending = 0, list(gens)
    while pending or not batch.empty:
        while pending and step >= stagger * (len(gens) - len(pending)):
            batch.add(pending.pop(0))
        for gen, outcome in batch.step():
            assert not isinstance(outcome, Exception), outcome
            chunks[id(gen)] += 1
            if cancel is not None and gen is gens[cancel] and chunks[id(gen)] == 3:
                batch.remove(gen)
        step += 1
    return gens, batch


@needs_stack
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("drafting", ["none", "head", "oracle"])
def test_greedy_batch_equals_each_request_alone(seed, drafting):
    runner = tiny_gguf_runner(seed)
    drafter = {"none": None, "head": tiny_drafter(runner, seed=seed), "oracle": OracleDrafter(runner, width=2, depth=3)}[drafting]
    reqs = requests(seed, 6)
    gens, batch = batched(runner, reqs, drafter)
    for gen, request in zip(gens, reqs):
        assert gen.token_ids == alone(runner, request, drafter)
    assert max(batch.stats.batch_sizes) >= 3


@needs_stack
@pytest.mark.parametrize("seed", range(3))
def test_seeded_sampling_in_a_batch_equals_each_request_alone(seed):
    runner = tiny_gguf_runner(seed)
    drafter = tiny_drafter(runner, seed=seed)
    reqs = requests(seed, 6, sampled=True)
    gens, _ = batched(runner, reqs, drafter)
    for gen, request in zip(gens, reqs):
        assert gen.token_ids == alone(runner, request, drafter)


@needs_stack
@pytest.mark.parametrize("costs", [CHEAP_ROWS, DEAR_ROWS], ids=["cheap-rows", "dear-rows"])
@pytest.mark.parametrize("sampled", [False, True])
def test_the_budget_changes_trees_not_tokens(costs, sampled):
    runner = tiny_gguf_runner(4)
    drafter = tiny_drafter(runner, seed=4)
    reqs = requests(4, 6, sampled=sampled)
    # The synthetic costs taken as exact: the fits may not learn this machine's real timings.
    budget = SpeculationBudget(costs, rounds=LinearFit(low=1.0, high=1.0), drafts=LinearFit(low=1.0, high=1.0))
    gens, batch = batched(runner, reqs, drafter, budget=budget)
    for gen, request in zip(gens, reqs):
        assert gen.token_ids == alone(runner, request, drafter)
    drafted = sum(n * count for n, count in batch.stats.draft_rows.items())
    if costs is DEAR_ROWS:  # drafts are verified only around probes (a probe's most likely node is)
        drafting_rounds = sum(count for n, count in batch.stats.draft_rows.items() if n)
        assert batch.stats.draft_rows[0] > 2 * drafting_rounds
        assert sum(g.stats.budget_plain_rounds for g in gens) > 0
    else:
        assert drafted > 0


def test_dear_rows_shrink_trees_as_the_batch_grows():
    """With a calibrated-like linear cost, one request verifies more draft nodes alone than each
    of eight requests does together."""
    costs = CostModel((1, 2, 4, 8, 16, 64), (0.007, 0.0085, 0.0127, 0.021, 0.040, 0.16), (0.001,) * 6, (0.001,) * 6)
    runner = tiny_runner(2)
    drafter = tiny_drafter(runner, tree=TreeConfig(top_k=3, depth=4, total_tokens=10, min_prob=0.0), seed=2)
    verified = {}
    for size in (1, 8):
        budget = SpeculationBudget(costs)
        gens = [make(runner, r, drafter) for r in requests(2, size)]
        for gen in gens:
            while gen.prefilling:
                gen.prefill_step()
        live = [g for g in gens if not g.finished and g.begin_round()]
        cut = budget.trim([g.plan(*proposal) for g, proposal in zip(live, _propose(live))], [g.estimate for g in live], [False] * len(live), [0.001] * len(live))
        verified[size] = sum(len(t) - 1 for t in cut) / len(cut)
        for gen in gens:
            gen.close()
    assert verified[1] > verified[8]


@needs_stack
def test_a_cancelled_request_leaves_the_others_unchanged():
    runner = tiny_gguf_runner(5)
    drafter = tiny_drafter(runner, seed=5)
    reqs = [{**r, "stop": StopConfig(max_new_tokens=30)} for r in requests(5, 5)]
    gens, _ = batched(runner, reqs, drafter, cancel=1)
    assert gens[1].state is None and gens[1].finished and len(gens[1].token_ids) < 30
    for i, (gen, request) in enumerate(zip(gens, reqs)):
        if i != 1:
            assert gen.token_ids == alone(runner, request, drafter)


@needs_stack
def test_one_failing_request_ends_alone():
    runner = tiny_gguf_runner(6)
    drafter = tiny_drafter(runner, seed=6)
    reqs = [{**r, "stop": StopConfig(max_new_tokens=25)} for r in requests(6, 4)]
    batch = Batch(runner)
    gens = [make(runner, r, drafter) for r in reqs]
    for gen in gens:
        batch.add(gen)
    broken = gens[2]
    real_add, calls = broken.text_stream.add, []

    def failing_add(ids, final=False):
        calls.append(ids)
        if len(calls) == 3:
            raise RuntimeError("stop handling failed")
        return real_add(ids, final)

    broken.text_stream.add = failing_add
    errors = []
    while not batch.empty:
        errors += [(g, o) for g, o in batch.step() if isinstance(o, Exception)]
    assert [g for g, _ in errors] == [broken] and "stop handling" in str(errors[0][1])
    assert broken.state is None
    for i, (gen, request) in enumerate(zip(gens, reqs)):
        if i != 2:
            assert gen.token_ids == alone(runner, request, drafter)


def test_sampling_within_a_batch_follows_the_target_distribution():
    """First and second tokens of seeded generations decoded eight at a time in batches, next
    to greedy neighbours, against the exact marginals (chi-square at 1e-3)."""
    runner = tiny_runner(11, sharpness=8.0)
    prompt = [5, 17, 42, 8]
    params = SamplingParams(temperature=1.0)
    p1, p2 = exact_second_token(runner, prompt, params)
    drafter = OracleDrafter(runner, width=3, depth=2)
    firsts, seconds = [], []
    for start in range(0, 1200, 8):
        batch = Batch(runner, SpeculationBudget(CHEAP_ROWS))
        gens = [Generation(runner, prompt, SamplingParams(1.0, seed=s), StopConfig(max_new_tokens=2), drafter) for s in range(start, start + 8)]
        neighbours = [Generation(runner, [3, 9, 1], SamplingParams(), StopConfig(max_new_tokens=4), drafter) for _ in range(2)]
        for gen in gens + neighbours:
            batch.add(gen)
        while not batch.empty:
            batch.step()
        firsts += [g.token_ids[0] for g in gens]
        seconds += [g.token_ids[1] for g in gens]
    assert chi2_pvalue(firsts, p1) > ALPHA
    assert chi2_pvalue(seconds, p2) > ALPHA
    assert len(set(seconds)) > 1 and np.isclose(p2.sum(), 1.0)
