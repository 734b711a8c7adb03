"""The load-adaptive speculation budget's pieces: cost interpolation, the linear fits, the
calibrated record of a request, and its choices at low and high load."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specdec.budget import CostModel, DraftEstimate, LinearFit, SpeculationBudget, tree_value
from specdec.tree import DraftTree

LINEAR = CostModel((1, 2, 4, 8, 64), (0.007, 0.0085, 0.0115, 0.0195, 0.1315), (0.001,) * 5, (0.002,) * 5)


def tree(*probs: float) -> DraftTree:
    """A chain whose nodes have these cumulative probabilities."""
    n = len(probs) + 1
    return DraftTree(list(range(n)), [-1] + list(range(n - 1)), [0.0] + [math.log(p) for p in probs])


def test_cost_model_interpolates_and_extends_linearly():
    assert LINEAR.seconds(1) == pytest.approx(0.008)
    assert LINEAR.seconds(3) == pytest.approx(0.010 + 0.001)
    assert LINEAR.seconds(128) == pytest.approx(0.1315 + 64 * 0.002 + 0.001)
    assert LINEAR.seconds(4, sampled_rows=4) == pytest.approx(0.0115 + 0.002)


@given(st.floats(0.5, 3.0), st.floats(0.0, 0.01))
def test_linear_fit_recovers_a_line(slope, intercept):
    fit = LinearFit()
    for x in (0.005, 0.01, 0.02, 0.04, 0.01, 0.03):
        fit.add(x, slope * x + intercept)
    assert fit.predict(0.025) == pytest.approx(slope * 0.025 + intercept, rel=1e-6, abs=1e-9)


def test_linear_fit_without_spread_keeps_its_prior_slope():
    fit = LinearFit(slope=1.0)
    for _ in range(5):
        fit.add(0.01, 0.012)
    assert fit.predict(0.02) == pytest.approx(0.022)
    assert LinearFit(slope=0.0).predict(50) == 0.0


def test_estimate_calibrates_to_what_was_accepted():
    estimate = DraftEstimate()
    assert estimate.calibration == 1.0
    t = tree(0.8, 0.6)
    for _ in range(20):
        estimate.verified(t, 0)
    assert estimate.calibration == pytest.approx(1 / (1 + 1.4 / 0.25), rel=0.01)  # the sums fade by 0.75 a tree
    assert tree_value(t) == pytest.approx(1.4)
    estimate.proposed(t)
    assert estimate.proposals() == [[pytest.approx(estimate.calibration * 0.8), pytest.approx(estimate.calibration * 0.6)]]


def test_a_good_drafter_drafts_alone_and_not_in_a_crowd_of_dear_rows():
    budget = SpeculationBudget(LINEAR)
    good = DraftEstimate()
    for _ in range(3):
        good.proposed(tree(0.95, 0.9, 0.85))
    assert budget.drafters([good], [True], [4], [False], [0]) == [True]
    crowd = [DraftEstimate() for _ in range(8)]
    for e in crowd:
        e.proposed(tree(0.3, 0.1))
    chosen = SpeculationBudget(LINEAR).drafters(crowd, [True] * 8, [4] * 8, [False] * 8, [0] * 8)
    assert not any(chosen) and all(e.idle == 1 for e in crowd)


def test_requests_without_a_record_probe_and_a_failed_probe_doubles_the_pause():
    budget = SpeculationBudget(LINEAR)
    fresh = DraftEstimate()
    assert budget.drafters([fresh], [True], [4], [False], [0]) == [True] and fresh.probing
    cut = budget.trim([tree(0.01, 0.005)], [fresh], [False], [0.05])
    assert len(cut[0]) == 2  # a probe verifies its most likely node
    assert fresh.pause == 2 * budget.first_pause and not fresh.probing


def test_where_no_sure_draft_could_pay_nobody_probes():
    """Rows that each cost a whole token's share of the round: not even a proposal sure to be
    accepted pays, so requests without a record do not probe and stale ones do not either;
    the same requests with cheap rows probe."""
    dear = CostModel((1, 64), (0.010, 0.640), (0.001, 0.064), (0.001, 0.064))
    estimates = [DraftEstimate() for _ in range(4)]
    estimates[0].idle = 1000  # long past its pause
    budget = SpeculationBudget(dear)
    assert budget.drafters(estimates, [True] * 4, [6] * 4, [False] * 4, [0] * 4) == [False] * 4
    assert not any(e.probing for e in estimates) and budget.lookups == [False] * 4  # not even free drafts pay
    assert [e.idle for e in estimates] == [1001, 1, 1, 1]  # one more round left out, counted once
    budget = SpeculationBudget(LINEAR)
    assert budget.drafters([DraftEstimate() for _ in range(4)], [True] * 4, [6] * 4, [False] * 4, [0] * 4) == [True] * 4
    assert budget.lookups == [True] * 4
