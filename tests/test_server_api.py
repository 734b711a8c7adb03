"""The HTTP API's contract on a tiny random model (fast, no files): response shapes of chat and
completions, streamed and whole; every error case with OpenAI's error body; auth; 429 when the
queue is full; a client that goes away cancels its generation; schemathesis finds no 5xx."""

from __future__ import annotations

import json
import threading
import time
from typing import Iterator

import httpx
import pytest
import schemathesis
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from services.verifier.app import create_app
from services.verifier.engine import Engine
from services.verifier.settings import VerifierSettings
from specdec.config import TreeConfig
from specdec.drafter import HeadDrafter
from specdec.head import DraftHead, HeadConfig
from specdec.prefix_cache import PrefixCache
from specdec.target import TargetRunner
from tests.conftest import free_port
from tests.tiny import SlowDrafter

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 4096
MAX_N = 2
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte, a chat template, no EOS (so generations end only at limits or stops)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE)


def tiny_engine(round_delay: float = 0.0, prefix_cache: PrefixCache | None = None) -> Engine:
    """A random 2-layer target with a random head; `round_delay` seconds are added to each
    drafted round (to keep a generation busy for the queue and disconnect tests)."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    runner = TargetRunner(LlamaForCausalLM(cfg).eval().requires_grad_(False), tokenizer, name="tiny")
    head = DraftHead(HeadConfig.for_target(runner.config, "fspad", target="tiny"), runner.embed_tokens, runner.lm_head.weight)
    drafter = SlowDrafter(HeadDrafter(head, TreeConfig(top_k=2, depth=2, total_tokens=4, min_prob=0.0)), round_delay)
    return Engine(runner, drafter, "tiny", prefix_cache=prefix_cache)


def serve_app(engine: Engine, **overrides) -> Iterator[str]:
    """The app on `engine`, served by uvicorn in a thread: by default one slot, one queue
    place, an API key (`overrides` change any setting)."""
    port = free_port()
    settings = {"api_key": KEY, "max_concurrency": 1, "max_queue": 1, "max_n": MAX_N, "default_max_tokens": 8, **overrides}
    conf = VerifierSettings(port=port, **settings)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, conf), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "server failed to start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    yield from serve_app(tiny_engine())


@pytest.fixture(scope="module")
def cached_base() -> Iterator[str]:
    """The same server with a prefix cache."""
    yield from serve_app(tiny_engine(prefix_cache=PrefixCache(4096)))


@pytest.fixture(scope="module")
def slow_base() -> Iterator[str]:
    """A server whose generations take at least 20 ms a round: long ones stay busy for a minute."""
    yield from serve_app(tiny_engine(round_delay=0.02))


def post(base: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(base + path, json=body, headers=kw.pop("headers", AUTH), timeout=60, **kw)


def sse(response: httpx.Response) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def wait_idle(base: str, timeout: float = 10.0) -> float:
    """Seconds until no generation runs or waits (fails after `timeout`)."""
    start = time.monotonic()
    while metric(base, "specdec_running") + metric(base, "specdec_queue_depth") > 0:
        assert time.monotonic() - start < timeout, "generations still running"
        time.sleep(0.05)
    return time.monotonic() - start


def test_health_ready_models_metrics(base: str) -> None:
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert httpx.get(base + "/ready").json() == {"status": "ready", "model": "tiny", "drafter": "embedded"}
    models = httpx.get(base + "/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert "specdec_queue_depth" in httpx.get(base + "/metrics").text


def test_completion_whole(base: str) -> None:
    body = post(base, "/v1/completions", {"prompt": "hello", "max_tokens": 5, "temperature": 0}).json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and isinstance(choice["text"], str)
    assert body["usage"] == {
        "prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 0}
    }


def test_completion_stream_equals_whole_and_reports_usage(base: str) -> None:
    req = {"prompt": "stream me", "max_tokens": 12, "temperature": 0}
    whole = post(base, "/v1/completions", req).json()
    with httpx.stream("POST", base + "/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}}, headers=AUTH) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    chunks = events[:-2]
    assert all(e["object"] == "text_completion" and e["id"] == chunks[0]["id"] for e in chunks)
    assert "".join(e["choices"][0]["text"] for e in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_without_include_usage_has_no_usage_chunk(base: str) -> None:
    with httpx.stream("POST", base + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}, headers=AUTH) as r:
        events = sse(r)
    assert events[-1] == "[DONE]" and all(e["choices"] for e in events[:-1])


def test_chat_whole_and_stream(base: str) -> None:
    req = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    whole = post(base, "/v1/chat/completions", req).json()
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    (choice,) = whole["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    prompt = "<system>be brief\n<user>hi\n<assistant>"
    assert whole["usage"]["prompt_tokens"] == len(prompt.encode())
    with httpx.stream("POST", base + "/v1/chat/completions", json={**req, "stream": True}, headers=AUTH) as r:
        events = sse(r)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1]) == choice["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_a_chats_next_turn_reuses_the_cached_conversation(base: str, cached_base: str) -> None:
    """The second turn resends the first turn and its answer: with a prefix cache they are
    restored, not prefilled (usage's cached_tokens, the metric), and the answer is the same."""
    first = [{"role": "user", "content": "tell me a story"}]
    reply = post(cached_base, "/v1/chat/completions", {"messages": first, "max_tokens": 10, "temperature": 0}).json()
    assert reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    second = {
        "messages": first + [reply["choices"][0]["message"], {"role": "user", "content": "shorter"}],
        "max_tokens": 10,
        "temperature": 0,
    }
    cached = post(cached_base, "/v1/chat/completions", second).json()
    plain = post(base, "/v1/chat/completions", second).json()
    turn_one = len("<user>tell me a story\n<assistant>".encode())
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] >= turn_one
    assert plain["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert cached["choices"][0]["message"] == plain["choices"][0]["message"]
    assert metric(cached_base, "specdec_cached_prompt_tokens_total") == cached["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert metric(cached_base, "specdec_prompt_tokens_total") == reply["usage"]["prompt_tokens"] + cached["usage"]["prompt_tokens"]


def test_chat_default_max_tokens(base: str) -> None:
    body = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] == 8  # default_max_tokens of this server


def test_max_completion_tokens_alias(base: str) -> None:
    body = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3}).json()
    assert body["usage"]["completion_tokens"] == 3


def test_n_choices_and_seed(base: str) -> None:
    req = {"prompt": "abc", "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 2}
    first, again = post(base, "/v1/completions", req).json(), post(base, "/v1/completions", req).json()
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert first["choices"] == again["choices"], "a seed makes sampling reproducible"
    assert first["usage"]["completion_tokens"] == 16
    with httpx.stream("POST", base + "/v1/completions", json={**req, "stream": True}, headers=AUTH) as r:
        events = sse(r)[:-1]
    for i in range(2):
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) == first["choices"][i]["text"]


def test_top_p_and_stop_string(base: str) -> None:
    greedy = post(base, "/v1/completions", {"prompt": "stop test", "max_tokens": 16, "temperature": 0}).json()["choices"][0]["text"]
    stop = greedy[6:8]
    body = post(base, "/v1/completions", {"prompt": "stop test", "max_tokens": 16, "temperature": 0, "stop": [stop]}).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == greedy[: greedy.index(stop)]
    sampled = post(base, "/v1/completions", {"prompt": "p", "max_tokens": 4, "temperature": 0.7, "top_p": 0.5, "seed": 1}).json()
    assert sampled["usage"]["completion_tokens"] == 4


def test_token_id_prompt(base: str) -> None:
    body = post(base, "/v1/completions", {"prompt": [10, 20, 30], "max_tokens": 2, "temperature": 0}).json()
    assert body["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature"),
        ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "n": MAX_N + 1}, "n"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
        ("/v1/completions", {"prompt": "x" * CONTEXT}, "prompt"),
        ("/v1/completions", {"prompt": "x" * 100, "max_tokens": CONTEXT}, "max_tokens"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"prompt": ""}, None),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stream": "sometimes"}, "stream"),
        ("/v1/completions", {"prompt": "x", "logprobs": 3}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "frequency_penalty": -1}, "frequency_penalty"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 10}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "top_k": 5}, "top_k"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "mood": "?"}]}, "messages.0.mood"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * CONTEXT}]}, "prompt"),
    ],
)
def test_bad_parameters_are_400_in_openai_shape(base: str, path: str, body: dict, param: str | None) -> None:
    response = post(base, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param


def test_neutral_values_of_unimplemented_fields_are_accepted(base: str) -> None:
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "u1", "logprobs": False}
    response = post(base, "/v1/completions", {"prompt": "x", "max_tokens": 2, **neutral})
    assert response.status_code == 200, response.text
    messages = [{"role": "user", "content": "x", "name": "ann"}]
    response = post(base, "/v1/chat/completions", {"messages": messages, "max_tokens": 2, **neutral})
    assert response.status_code == 200, response.text


def test_invalid_json_and_unknown_model(base: str) -> None:
    response = httpx.post(base + "/v1/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = post(base, "/v1/completions", {"prompt": "x", "model": "gpt-9"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_key_required(base: str, headers: dict) -> None:
    for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 1}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        response = post(base, path, body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(base + "/v1/models", headers=headers).status_code == 401
    assert httpx.get(base + "/health", headers=headers).status_code == 200


class OpenStream:
    """A long streamed completion, open after its first event arrived, until `close()`."""

    def __init__(self, base: str, client: httpx.Client, max_tokens: int = 3000):
        request = client.build_request("POST", base + "/v1/completions", json={"prompt": "long", "max_tokens": max_tokens, "stream": True, "temperature": 0}, headers=AUTH)
        self.response = client.send(request, stream=True)
        assert self.response.status_code == 200
        self.lines = self.response.iter_lines()  # dropping this iterator would close the stream
        while not next(self.lines).startswith("data: "):
            pass

    def close(self) -> None:
        self.response.close()


def test_full_queue_is_429_and_disconnect_frees_the_slots(slow_base: str) -> None:
    wait_idle(slow_base)
    with httpx.Client(timeout=60) as running_client, httpx.Client(timeout=60) as queued_client:
        running = OpenStream(slow_base, running_client)
        queued_request = queued_client.build_request("POST", slow_base + "/v1/completions", json={"prompt": "q", "max_tokens": 3000, "stream": True}, headers=AUTH)
        queued = queued_client.send(queued_request, stream=True)
        assert queued.status_code == 200
        deadline = time.monotonic() + 10
        while metric(slow_base, "specdec_queue_depth") < 1:
            assert time.monotonic() < deadline, "the second request should wait in the queue"
            time.sleep(0.05)
        rejected = post(slow_base, "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert rejected.status_code == 429
        assert rejected.json()["error"] == {"message": rejected.json()["error"]["message"], "type": "rate_limit_error", "param": None, "code": "queue_full"}
        assert metric(slow_base, "specdec_requests_total") > 0
        running.close()
        queued.close()
    assert wait_idle(slow_base) < 5
    assert post(slow_base, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_disconnect_cancels_a_streamed_generation(slow_base: str) -> None:
    wait_idle(slow_base)
    tokens_before = metric(slow_base, "specdec_generated_tokens_total")
    with httpx.Client(timeout=60) as client:
        OpenStream(slow_base, client).close()
    assert wait_idle(slow_base) < 2.0, "a round takes ~20 ms: the generation should stop within a round or so"
    generated = metric(slow_base, "specdec_generated_tokens_total") - tokens_before
    assert 0 < generated < 500, f"the generation should stop early, it made {generated} tokens"


def test_disconnect_cancels_a_whole_generation(slow_base: str) -> None:
    wait_idle(slow_base)
    tokens_before = metric(slow_base, "specdec_generated_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_base + "/v1/completions", json={"prompt": "long", "max_tokens": 3000, "temperature": 0}, headers=AUTH, timeout=0.5)
    assert wait_idle(slow_base) < 2.0, "a round takes ~20 ms: the generation should stop within a round or so"
    generated = metric(slow_base, "specdec_generated_tokens_total") - tokens_before
    assert 0 < generated < 500, f"the generation should stop early, it made {generated} tokens"
    closed = 'specdec_requests_total{endpoint="/v1/completions",status="499"}'
    assert any(line.startswith(closed) for line in httpx.get(slow_base + "/metrics").text.splitlines())


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_error(base: str, mode: GenerationMode) -> None:
    """Generated requests, valid (positive) and invalid (negative), to every operation of the
    OpenAPI schema never get a 5xx."""
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    if mode is GenerationMode.NEGATIVE:  # only request bodies can be invalid; the GETs take no input
        operations = [op for op in operations if op.method.upper() == "POST"]
    calls = []
    for operation in operations:

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            calls.append(case.path)
            case.call_and_validate(base_url=base, headers=AUTH, timeout=60, checks=[not_a_server_error])

        fuzz()
        wait_idle(base, timeout=120)
    assert len(calls) >= len(operations)
