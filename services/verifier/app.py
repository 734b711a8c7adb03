"""The verifier's OpenAI-compatible HTTP API: completions and chat completions (streamed as
server-sent events or whole), models, health, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.verifier.engine import Engine
from services.verifier.metrics import Metrics
from services.verifier.scheduler import Admission, QueueFull, Scheduler
from services.verifier.schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse, SamplingFields
from services.verifier.settings import VerifierSettings
from specdec.config import ConfigError, SamplingParams, StopConfig
from specdec.generate import Chunk, Generation

log = logging.getLogger("specdec.verifier")

MAX_STOP_STRINGS = 4
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away (never sent)
_BEARER = HTTPBearer(auto_error=False, description="the API key, when the server has one")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "invalid parameters or prompt too long"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    429: {"model": ErrorResponse, "description": "queue full"},
}


def create_app(engine: Engine, settings: VerifierSettings, metrics: Metrics | None = None) -> FastAPI:
    """An app serving `engine`; the scheduler lives from startup to shutdown, inside the event loop."""
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.scheduler = Scheduler(engine.batch(), settings.max_concurrency, settings.max_queue, metrics)
        yield
        app.state.scheduler.shutdown()

    app = FastAPI(title="specdec verifier", version="0.1.0", description="Lossless speculative decoding, OpenAI-compatible", lifespan=lifespan)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.add_middleware(RequestCounter, metrics=metrics)
    _add_error_handlers(app)

    async def check_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(_BEARER)) -> None:
        key = settings.api_key
        if key is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    auth = [Depends(check_api_key)]

    @app.get("/health", summary="liveness: the process answers")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", summary="readiness: model loaded; drafter reachable or plain-decoding fallback")
    async def ready() -> dict:
        state = await asyncio.to_thread(engine.drafter_state)
        return {"status": "ready", "model": engine.model_name, "drafter": state}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=auth, responses=ERROR_RESPONSES)
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(engine)]}

    @app.post("/v1/completions", dependencies=auth, responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        prompt_ids = await asyncio.to_thread(_prompt_ids, engine, body.prompt)
        return await _serve(request, body, prompt_ids, body.max_tokens, CompletionFormat(engine.model_name))

    @app.post("/v1/chat/completions", dependencies=auth, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = [m.model_dump() for m in body.messages]
        prompt_ids = await asyncio.to_thread(engine.runner.encode_messages, messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _serve(request, body, prompt_ids, max_tokens, ChatFormat(engine.model_name))

    return app


def _model_card(engine: Engine) -> dict:
    return {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "specdec", "max_model_len": engine.runner.max_length}


def _prompt_ids(engine: Engine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return engine.runner.encode(prompt)
    vocab = engine.runner.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return list(prompt)


def _generations(request: Request, body: SamplingFields, prompt_ids: list[int], max_tokens: int | None) -> list[Generation]:
    """Validate the request against the model and build one generation per choice."""
    engine: Engine = request.app.state.engine
    settings: VerifierSettings = request.app.state.settings
    if body.model is not None and body.model != engine.model_name:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {engine.model_name!r}", param="model", code="model_not_found")
    if body.n > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n}", param="n")
    stops = body.stop_strings()
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    context = engine.runner.max_length
    if len(prompt_ids) >= context:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context is {context} tokens", param="prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, context - len(prompt_ids))
    if len(prompt_ids) + max_tokens > context:
        raise APIError(
            400,
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds this model's context of {context} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stop = StopConfig(max_new_tokens=max_tokens, stop_strings=stops)
    gens = []
    for i in range(body.n):
        seed = None if body.seed is None else (body.seed + i) % 2**63
        sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=seed)
        gens.append(engine.generation(prompt_ids, sampling, stop))
    return gens


async def _serve(request: Request, body: SamplingFields, prompt_ids: list[int], max_tokens: int | None, fmt: "ResponseFormat"):
    arrival = time.perf_counter()
    gens = _generations(request, body, prompt_ids, max_tokens)
    scheduler: Scheduler = request.app.state.scheduler
    metrics: Metrics = request.app.state.metrics
    admission = scheduler.admit()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        events = _stream_events(scheduler, admission, gens, fmt, metrics, arrival, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts, finish = [""] * len(gens), [None] * len(gens)

    async def consume() -> None:
        first = True
        async for index, chunk in scheduler.run(admission, gens):
            if first:
                metrics.ttft.observe(time.perf_counter() - arrival)
                first = False
            texts[index] += chunk.text
            finish[index] = chunk.finish_reason or finish[index]

    try:
        finished = await _unless_disconnected(request, consume())
    finally:
        admission.drop()
    if not finished:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return fmt.whole(texts, finish, _usage(gens), _speculation(gens))


async def _unless_disconnected(request: Request, work) -> bool:
    """Run `work` to its end (True), or cancel it (and so its generation, within a round) when
    the client goes away first (False)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


async def _stream_events(
    scheduler: Scheduler,
    admission: Admission,
    gens: list[Generation],
    fmt: "ResponseFormat",
    metrics: Metrics,
    arrival: float,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE body; the response task is cancelled on disconnect, which stops the generation."""
    first = True
    try:
        for index in range(len(gens)):
            for event in fmt.opening(index):
                yield _sse(event)
        async for index, chunk in scheduler.run(admission, gens):
            if first:
                metrics.ttft.observe(time.perf_counter() - arrival)
                first = False
            if chunk.text or chunk.finish_reason:
                yield _sse(fmt.delta(index, chunk))
        if include_usage:
            yield _sse(fmt.usage_chunk(_usage(gens), _speculation(gens)))
    except ConfigError as exc:
        yield _sse({"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}})
    except Exception as exc:  # headers are sent: report in-band, like OpenAI's streams do
        log.exception("generation failed mid-stream")
        yield _sse({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error", "param": None, "code": None}})
    finally:
        admission.drop()
    yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(gens: list[Generation]) -> dict:
    prompt = gens[0].stats.prompt_tokens
    completion = sum(g.stats.new_tokens for g in gens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": gens[0].stats.cached_prompt_tokens},
    }


def _speculation(gens: list[Generation]) -> dict:
    """Non-standard extra: how speculation went for this request (all choices together)."""
    tokens = sum(g.stats.new_tokens for g in gens)
    forwards = sum(g.stats.target_forwards for g in gens)
    seconds = sum(g.stats.seconds for g in gens)
    return {
        "target_forwards": forwards,
        "tau": tokens / forwards if forwards else 0.0,
        "draft_tokens": sum(g.stats.draft_tokens for g in gens),
        "accepted_tokens": sum(sum(g.stats.accepted_per_round) for g in gens),
        "fallback_rounds": sum(g.stats.fallback_rounds for g in gens),
        "paused_rounds": sum(g.stats.paused_rounds for g in gens),
        "budget_plain_rounds": sum(g.stats.budget_plain_rounds for g in gens),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
    }


class ResponseFormat:
    """How one endpoint shapes its whole response and its stream chunks."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = "cmpl"

    def __init__(self, model: str):
        self.model = model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def opening(self, index: int) -> list[dict]:
        return []

    def usage_chunk(self, usage: dict, speculation: dict) -> dict:
        return {**self._envelope(self.chunk_object_name), "choices": [], "usage": usage, "speculation": speculation}

    def whole(self, texts: list[str], finish: list[str | None], usage: dict, speculation: dict) -> dict:
        choices = [self.whole_choice(i, t, f) for i, (t, f) in enumerate(zip(texts, finish))]
        return {**self._envelope(self.object_name), "choices": choices, "usage": usage, "speculation": speculation}

    def whole_choice(self, index: int, text: str, finish: str | None) -> dict:
        raise NotImplementedError

    def delta(self, index: int, chunk: Chunk) -> dict:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"

    def whole_choice(self, index: int, text: str, finish: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def delta(self, index: int, chunk: Chunk) -> dict:
        choice = {"index": index, "text": chunk.text, "logprobs": None, "finish_reason": chunk.finish_reason}
        return {**self._envelope(self.chunk_object_name), "choices": [choice]}


class ChatFormat(ResponseFormat):
    object_name, chunk_object_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def opening(self, index: int) -> list[dict]:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [{**self._envelope(self.chunk_object_name), "choices": [choice]}]

    def whole_choice(self, index: int, text: str, finish: str | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}

    def delta(self, index: int, chunk: Chunk) -> dict:
        delta = {"content": chunk.text} if chunk.text else {}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": chunk.finish_reason}
        return {**self._envelope(self.chunk_object_name), "choices": [choice]}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors[:5])
        return APIError(400, message or "invalid request", param=".".join(loc) or None).response()

    @app.exception_handler(ConfigError)
    async def config_error(_: Request, exc: ConfigError) -> JSONResponse:
        return APIError(400, str(exc)).response()

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return APIError(429, str(exc), type="rate_limit_error", code="queue_full").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


class RequestCounter:
    """ASGI middleware counting HTTP requests by endpoint and status code."""

    def __init__(self, app: Callable, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _KNOWN_PATHS else "other"
        status = {"code": 500}

        async def record(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()


_KNOWN_PATHS = {"/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
