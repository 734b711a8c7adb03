"""End to end on loopback: the drafter and the verifier as two processes. Streamed greedy output
equals `specdec generate`; killing the drafter mid-stream changes nothing in the output (the
verifier falls back to plain decoding, /metrics counts it); a restarted drafter is used again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import REPO, free_port, sse_events

TREE = ["--head", "random", "--top-k", "4", "--depth", "3", "--total-tokens", "8"]
PROMPT = "Once upon a time, a sailor"
CHAT_PROMPT = "Write one sentence about the sea."
MAX_TOKENS = 16
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def specdec_generate(prompt: str, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "generate", "--prompt", prompt, "--max-new-tokens", str(MAX_TOKENS), "--json", *TREE, *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def metric(base: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all labels)."""
    text = httpx.get(base + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def drafter_serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="specdec.drafter.v1.Drafter"), timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Stack:
    def __init__(self, spawn):
        self.spawn = spawn
        self.drafter_port, self.port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.drafter = self.start_drafter()
        self.verifier = spawn(
            "verifier", "-m", "services.verifier", "--port", str(self.port), "--drafter", "remote",
            "--drafter-address", f"127.0.0.1:{self.drafter_port}",
            "--drafter-timeout", "10", "--drafter-retry-rounds", "2", "--max-concurrency", "2", "--threads", "1",
            env={"SPECDEC_VERIFIER_API_KEY": KEY},
        )
        self.wait_drafter()
        self.verifier.wait_http(self.base + "/health")

    def start_drafter(self):
        return self.spawn("drafter", "-m", "services.drafter", "--port", str(self.drafter_port), "--threads", "1", *TREE)

    def wait_drafter(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not drafter_serving(self.drafter_port):
            assert self.drafter.alive(), self.drafter.output()
            assert time.monotonic() < deadline, "drafter did not come up"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def stack(spawn) -> Stack:
    return Stack(spawn)


@pytest.fixture(scope="module")
def expected() -> dict:
    result = specdec_generate(PROMPT)
    assert result["new_tokens"] == MAX_TOKENS, "pick a prompt the model continues for MAX_TOKENS tokens"
    return result


def stream_completion(base: str, on_first_text=None) -> tuple[str, dict]:
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    text, usage_event = "", {}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=AUTH, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                if not text and on_first_text:
                    on_first_text()
                text += event["choices"][0]["text"]
            else:
                usage_event = event
    return text, usage_event


def test_ready_reports_the_remote_drafter(stack: Stack) -> None:
    """/ready probes the drafter with a 1 s deadline; on a loaded machine the first probe (which
    also opens the connection) can miss it, so a few probes are allowed, as a kubelet would."""
    for _ in range(5):
        body = httpx.get(stack.base + "/ready", timeout=10).json()
        if body["drafter"] == "remote-ok":
            break
        time.sleep(1)
    assert body["status"] == "ready" and body["drafter"] == "remote-ok"


def test_streamed_greedy_with_grpc_drafter_equals_specdec_generate(stack: Stack, expected: dict) -> None:
    text, usage_event = stream_completion(stack.base)
    assert text == expected["text"]
    assert usage_event["usage"]["completion_tokens"] == MAX_TOKENS
    spec = usage_event["speculation"]
    assert spec["draft_tokens"] > 0 and spec["fallback_rounds"] == 0, spec


def test_chat_with_grpc_drafter_equals_specdec_generate_chat(stack: Stack) -> None:
    expected_chat = specdec_generate(CHAT_PROMPT, "--chat")
    body = {"messages": [{"role": "user", "content": CHAT_PROMPT}], "max_tokens": MAX_TOKENS, "temperature": 0}
    reply = httpx.post(stack.base + "/v1/chat/completions", json=body, headers=AUTH, timeout=120).json()
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected_chat["text"]}
    with httpx.stream("POST", stack.base + "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH, timeout=120) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed == expected_chat["text"]


def test_drafter_killed_mid_stream_then_restarted(stack: Stack, expected: dict) -> None:
    fallbacks_before = metric(stack.base, "specdec_fallback_rounds_total")
    text, usage_event = stream_completion(stack.base, on_first_text=lambda: stack.drafter.stop(signal.SIGKILL))
    assert text == expected["text"], "the output must not change when the drafter dies"
    assert usage_event["speculation"]["fallback_rounds"] > 0
    assert metric(stack.base, "specdec_fallback_rounds_total") > fallbacks_before
    assert metric(stack.base, "specdec_drafter_failures_total") >= 1
    assert httpx.get(stack.base + "/ready", timeout=10).json()["drafter"] == "remote-unavailable"

    stack.drafter = stack.start_drafter()
    stack.wait_drafter()
    deadline = time.monotonic() + 30
    while httpx.get(stack.base + "/ready", timeout=10).json()["drafter"] != "remote-ok":
        assert time.monotonic() < deadline, "the verifier did not reconnect to the restarted drafter"
        time.sleep(0.3)
    reply = httpx.post(stack.base + "/v1/completions", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}, headers=AUTH, timeout=120).json()
    assert reply["choices"][0]["text"] == expected["text"]
    spec = reply["speculation"]
    assert spec["draft_tokens"] > 0 and spec["fallback_rounds"] == 0, f"speculation should resume: {spec}"


def test_drafter_stops_gracefully_on_sigterm(stack: Stack) -> None:
    assert stack.drafter.stop(signal.SIGTERM) == 0
    assert "drafter stopped" in stack.drafter.output()
    assert not drafter_serving(stack.drafter_port)
    reply = httpx.post(stack.base + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0}, headers=AUTH, timeout=120)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
