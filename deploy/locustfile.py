"""Load test of the verifier: users stream completions; time to first token and tokens/s of each
request are recorded as locust events ("TTFT" in ms, "TOKENS_PER_S" with the rate as its value).

    locust -f deploy/locustfile.py --headless -u 2 -r 2 -t 30s --host http://127.0.0.1:8000 --csv runs/locust

Environment: SPECDEC_API_KEY (bearer key, if the server wants one), SPECDEC_LOAD_MAX_TOKENS
(default 16), SPECDEC_LOAD_TEMPERATURE (default 0).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

PROMPTS = [
    "The three primary colors are",
    "Once upon a time, a sailor",
    "Speculative decoding makes language models faster because",
    "A good breakfast includes",
    "The capital of France is",
]


class StreamingCompletionUser(HttpUser):
    """Sends streamed greedy completions and checks each stream ends with [DONE]."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        key = os.environ.get("SPECDEC_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.max_tokens = int(os.environ.get("SPECDEC_LOAD_MAX_TOKENS", "16"))
        self.temperature = float(os.environ.get("SPECDEC_LOAD_TEMPERATURE", "0"))

    @task
    def stream_completion(self) -> None:
        body = {
            "prompt": random.choice(PROMPTS),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        first_token = None
        tokens, done = 0, False
        with self.client.post("/v1/completions", json=body, headers=self.headers, stream=True, catch_response=True, name="stream /v1/completions") as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    response.failure(event["error"].get("message", "error event"))
                    return
                if event["choices"] and first_token is None:
                    first_token = time.perf_counter()
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
            if not done or first_token is None:
                response.failure("stream ended without tokens or [DONE]")
                return
            response.success()
        elapsed = time.perf_counter() - start
        fire = events.request.fire
        fire(request_type="TTFT", name="first token", response_time=(first_token - start) * 1000, response_length=0, exception=None, context={})
        fire(request_type="TOKENS_PER_S", name="decode rate", response_time=tokens / elapsed if elapsed else 0.0, response_length=tokens, exception=None, context={})
