"""The embedded server (`make serve`): a streamed greedy completion through HTTP returns the
same text as `specdec generate` for the same prompt, head and tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from csv import DictReader

import httpx
import pytest

from tests.conftest import REPO, free_port, sse_events

TREE = ["--head", "random", "--top-k", "4", "--depth", "3", "--total-tokens", "8"]
PROMPT = "The three primary colors are"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def embedded_server(spawn) -> str:
    port = free_port()
    child = spawn("verifier-embedded", "-m", "services.verifier", "--host", "127.0.0.1", "--port", str(port), "--drafter", "embedded", "--device", "cpu", *TREE)
    base = f"http://127.0.0.1:{port}"
    child.wait_http(base + "/health")
    return base


def specdec_generate(prompt: str, max_tokens: int, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "generate", "--prompt", prompt, "--max-new-tokens", str(max_tokens), "--json", *TREE, *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_streamed_greedy_completion_equals_specdec_generate(embedded_server: str) -> None:
    expected = specdec_generate(PROMPT, MAX_TOKENS)
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", embedded_server + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(e["object"] == "text_completion" and e["choices"][0]["index"] == 0 for e in chunks)
    assert len(chunks) > 1, "the completion should arrive in several chunks"
    text = "".join(e["choices"][0]["text"] for e in chunks)
    assert text == expected["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == expected["finish_reason"] == "length"
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == expected["new_tokens"] == MAX_TOKENS
    assert usage["prompt_tokens"] == expected["prompt_tokens"]


def test_a_repeated_prompt_is_served_from_the_prefix_cache(embedded_server: str) -> None:
    """On the real default target: the same request again restores all of its prompt but the
    last token from the cache (on by default) and answers the same text as a fresh run."""
    expected = specdec_generate(PROMPT + " red,", 8)
    body = {"prompt": PROMPT + " red,", "max_tokens": 8, "temperature": 0}
    first = httpx.post(embedded_server + "/v1/completions", json=body, timeout=120).json()
    again = httpx.post(embedded_server + "/v1/completions", json=body, timeout=120).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"] == expected["text"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == expected["prompt_tokens"] - 1


def test_health(embedded_server: str) -> None:
    response = httpx.get(embedded_server + "/health", timeout=10)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_locust_headless_run_has_no_failure(embedded_server: str, tmp_path) -> None:
    """deploy/locustfile.py, bounded (2 users, 30 s) against the loopback server: no failure,
    and TTFT and tokens/s recorded as events."""
    csv = tmp_path / "locust"
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "deploy/locustfile.py", "--headless", "-u", "2", "-r", "2", "-t", "30s",
         "--host", embedded_server, "--csv", str(csv), "--exit-code-on-error", "1", "--only-summary"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "SPECDEC_LOAD_MAX_TOKENS": "4"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {(r["Type"], r["Name"]): r for r in csv_rows(csv.with_name("locust_stats.csv"))}
    assert int(rows[("POST", "stream /v1/completions")]["Request Count"]) >= 1
    assert int(rows[("TTFT", "first token")]["Request Count"]) >= 1
    assert int(rows[("TOKENS_PER_S", "decode rate")]["Request Count"]) >= 1
    assert all(int(r["Failure Count"]) == 0 for r in rows.values())
    assert csv_rows(csv.with_name("locust_failures.csv")) == []


def csv_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(DictReader(f))
