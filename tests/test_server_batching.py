"""Real concurrency through the HTTP API: requests with different prompt lengths, max_tokens and
stop strings, started at staggered times, are decoded in one batch and give exactly the texts
they give alone (greedy and seeded sampling, on a tiny target running the C++ decoder stack as
the default target does); a client that goes away mid-batch leaves the others' texts unchanged;
the batch metrics are exported."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import pytest

from services.verifier.engine import Engine
from specdec.budget import CostModel, SpeculationBudget
from specdec.gguf_linear import kernel
from tests.test_server_api import metric, serve_app, sse
from tests.tiny import SlowDrafter, tiny_drafter, tiny_gguf_runner

pytestmark = pytest.mark.skipif(kernel() is None, reason="no AVX2 CPU or no C++ compiler: no decoder stack")


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    """A batching server (8 generations at once, adaptive budget from a calibration on the tiny
    target) whose rounds take at least 5 ms (10 more with drafts), so that requests overlap."""
    runner = tiny_gguf_runner(3)
    budget = SpeculationBudget(CostModel.calibrate(runner, repeats=1))
    forward_trees = runner.forward_trees

    def slow_forward(states, trees):
        time.sleep(0.005)
        return forward_trees(states, trees)

    runner.forward_trees = slow_forward
    drafter = SlowDrafter(tiny_drafter(runner, seed=3), 0.01)
    engine = Engine(runner, drafter, "tiny", prefill_chunk=8, budget=budget)
    yield from serve_app(engine, api_key=None, max_concurrency=8, max_queue=8, max_n=4, default_max_tokens=16)


def bodies(seed: int, count: int, temperature: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        body = {
            "prompt": [rng.randrange(64) for _ in range(rng.randrange(1, 40))],
            "max_tokens": rng.randrange(4, 48),
            "temperature": temperature,
            "seed": 100 + i,
        }
        if i % 3 == 1:
            body["stop"] = ["DE", "Q"]
        out.append(body)
    return out


def complete(base: str, body: dict, delay: float = 0.0) -> dict:
    time.sleep(delay)
    response = httpx.post(base + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def together(base: str, requests: list[dict], stagger: float = 0.03) -> list[dict]:
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(complete, base, body, stagger * i) for i, body in enumerate(requests)]
        return [f.result() for f in futures]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_staggered_concurrent_requests_equal_each_request_alone(base: str, temperature: float) -> None:
    requests = bodies(int(temperature) + 1, 7, temperature)
    alone = [complete(base, body) for body in requests]
    rounds_before = metric(base, "specdec_batch_size_count")
    sizes_before = metric(base, "specdec_batch_size_sum")
    batched = together(base, requests)
    for a, b in zip(alone, batched):
        assert b["choices"][0]["text"] == a["choices"][0]["text"]
        assert b["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]
    rounds = metric(base, "specdec_batch_size_count") - rounds_before
    mean_batch = (metric(base, "specdec_batch_size_sum") - sizes_before) / rounds
    assert mean_batch > 1.5, "the requests should have been decoded together"


def test_n_choices_are_sequences_of_the_batch(base: str) -> None:
    body = {"prompt": [5, 9, 14], "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 3}
    whole = complete(base, body)
    texts = [c["text"] for c in sorted(whole["choices"], key=lambda c: c["index"])]
    for i, text in enumerate(texts):
        single = complete(base, {**body, "n": 1, "seed": 7 + i})
        assert single["choices"][0]["text"] == text


def test_a_client_that_leaves_mid_batch_does_not_change_the_others(base: str) -> None:
    requests = bodies(5, 5)
    for body in requests:
        body["max_tokens"] = 40
        body.pop("stop", None)
    alone = [complete(base, body) for body in requests]

    def leave_early() -> int:
        with httpx.stream("POST", base + "/v1/completions", json={**requests[0], "stream": True}, timeout=60) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i >= 6:
                    return i
        return -1

    with ThreadPoolExecutor(len(requests)) as pool:
        left = pool.submit(leave_early)
        others = [pool.submit(complete, base, body, 0.02 * i) for i, body in enumerate(requests[1:], start=1)]
        assert left.result() >= 6
        for a, future in zip(alone[1:], others):
            assert future.result()["choices"][0]["text"] == a["choices"][0]["text"]
    assert metric(base, "specdec_rows_per_forward_count") > 0
    assert metric(base, "specdec_draft_budget_count") > 0


def test_a_stream_in_a_batch_equals_the_whole_response(base: str) -> None:
    body = bodies(9, 1)[0]
    whole = complete(base, body)
    with ThreadPoolExecutor(3) as pool:
        noise = [pool.submit(complete, base, other) for other in bodies(10, 2)]
        with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
            events = sse(httpx.Response(200, content=response.read()))
        for future in noise:
            future.result()
    text = "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e["choices"])
    assert text == whole["choices"][0]["text"]
