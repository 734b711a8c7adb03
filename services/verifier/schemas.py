"""OpenAI-compatible request bodies and the error body (the parts of the API this server supports)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="send a last chunk with token usage before [DONE]")


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions. Unknown fields are refused (400), and
    the OpenAI fields this server does not implement accept only their neutral value, so no
    request is silently answered as if it had asked for something else."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="served model id (see /v1/models); optional")
    max_tokens: int | None = Field(None, ge=0, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampling seed (choice i uses seed + i)")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    n: int = Field(1, ge=1, description="choices to generate")
    stream: bool = Field(False, description="server-sent events, one chunk per committed round")
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = Field(None, description="not supported: only null, false or 0")
    presence_penalty: float = Field(0.0, description="not supported: only 0")
    frequency_penalty: float = Field(0.0, description="not supported: only 0")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only null or {}")
    user: str | None = Field(None, description="end-user id (accepted, not used)")

    @field_validator("logprobs", "presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _neutral_only(cls, value, info: ValidationInfo):
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(..., description="text, or token ids")
    max_tokens: int | None = Field(16, ge=0, description="tokens to generate at most")
    echo: bool = Field(False, description="not supported: only false")
    best_of: int | None = Field(None, description="not supported: only null or 1")

    @field_validator("echo", "best_of")
    @classmethod
    def _unsupported(cls, value: bool | int | None, info: ValidationInfo) -> bool | int | None:
        neutral = value in (None, 1) if info.field_name == "best_of" else not value
        if not neutral:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = Field(None, description="participant name (accepted, not used)")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, description="alias of max_tokens")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
