"""The embedded server (`make serve`): a streamed greedy completion through HTTP returns the
same text as `specdec generate` for the same prompt, head and tree."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.conftest import REPO, free_port

TREE = ["--head", "random", "--top-k", "4", "--depth", "3", "--total-tokens", "8"]
PROMPT = "The three primary colors are"
MAX_TOKENS = 16


def sse_events(response: httpx.Response) -> list[dict | str]:
    """Parse a server-sent-events body into JSON objects (and the final '[DONE]')."""
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


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


def test_health(embedded_server: str) -> None:
    response = httpx.get(embedded_server + "/health", timeout=10)
    assert response.status_code == 200 and response.json() == {"status": "ok"}
