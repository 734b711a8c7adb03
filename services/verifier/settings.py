"""Verifier settings: command-line flags over SPECDEC_VERIFIER_* environment variables over
defaults, parsed once at start (never at import)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.settings import parse_or_exit
from specdec.backoff import BackoffConfig
from specdec.config import DEFAULT_PREFIX_CACHE_TOKENS, TreeConfig

_TREE = TreeConfig()
_BACKOFF = BackoffConfig()


class VerifierSettings(BaseSettings):
    """Everything the verifier service can be told; `python -m services.verifier --help` lists it."""

    model_config = SettingsConfigDict(
        env_prefix="SPECDEC_VERIFIER_",
        cli_kebab_case=True,
        env_ignore_empty=True,
        cli_prog_name="python -m services.verifier",
        cli_implicit_flags=True,
    )

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    drafter: Literal["embedded", "none", "remote"] = Field(
        "embedded",
        description="embedded (draft head in this process), none (plain decoding) or remote (a drafter service at --drafter-address)",
    )
    drafter_address: str | None = Field(
        None, description="remote drafter: HOST:PORT of the drafter service (required with --drafter remote, refused otherwise)"
    )
    model: str | None = Field(None, description="Llama-family model directory (default: SmolLM2-135M-Instruct GGUF)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="target weights dtype")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice)")
    activations: Literal["float32", "int8"] = Field(
        "float32", description="inputs of the default target's 4-bit products: float32 (exact model) or int8 (llama.cpp's way, faster)"
    )
    served_model_name: str | None = Field(None, description="model id in the API (default: the target's name)")
    head: str | None = Field(None, description="embedded drafter: head directory or 'random' (default: the shipped head)")
    top_k: int = Field(_TREE.top_k, ge=1, description="embedded drafter: children expanded per draft node")
    depth: int = Field(_TREE.depth, ge=1, description="embedded drafter: draft tree depth")
    total_tokens: int = Field(_TREE.total_tokens, ge=1, description="embedded drafter: tree nodes per round")
    min_prob: float = Field(_TREE.min_prob, ge=0.0, lt=1.0, description="embedded drafter: verify only draft nodes with at least this cumulative draft probability")
    lookup_tokens: int = Field(_TREE.lookup_tokens, ge=0, description="embedded drafter: longest lookup chain (tokens that followed an earlier occurrence of the current suffix) added to each tree; 0 = off")
    lookup_alone: float = Field(_TREE.lookup_alone, gt=0.0, le=1.0, description="embedded drafter: a lookup chain at least this likely is proposed without running the head (1 = never)")
    head_context: int = Field(_TREE.head_context, ge=0, description="embedded drafter: prompt tokens the head reads when a generation starts: the last N (0 = all)")
    prefix_cache_tokens: int = Field(
        DEFAULT_PREFIX_CACHE_TOKENS,
        ge=0,
        description="tokens of finished requests kept so that a prompt starting with one (a chat's next turn, a shared "
        "system prompt) prefills only the rest; 0 = off",
    )
    drafter_timeout: float = Field(2.0, gt=0, description="remote drafter: deadline of one call, seconds")
    drafter_retry_rounds: int = Field(8, ge=1, description="rounds of plain decoding before retrying a failed drafter")
    backoff_below: float = Field(
        _BACKOFF.break_even,
        ge=0.0,
        description="sampled requests: decode plainly for a while when the last speculative rounds accepted fewer drafts "
        "than this on average (0 = always speculate)",
    )
    feature_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="remote drafter: dtype of the features on the wire"
    )
    max_tree_tokens: int = Field(64, ge=1, description="remote drafter: largest tree accepted per round")
    api_key: SecretStr | None = Field(None, description="require 'Authorization: Bearer KEY' on /v1/* when set")
    max_concurrency: int = Field(8, ge=1, description="generations decoded together in one batch (one target forward per round)")
    prefill_chunk: int = Field(
        128, ge=0, description="most prompt tokens prefilled per round, so a long prompt delays the batch's other requests by one chunk at a time (0 = whole prompts)"
    )
    adaptive_speculation: bool = Field(
        True,
        description="choose each round's drafts from measured costs (a short calibration at start): trees shrink as the batch grows, "
        "down to plain batched decoding; off: every round verifies the drafter's full tree",
    )
    max_queue: int = Field(16, ge=0, description="requests waiting for a slot before 429")
    max_n: int = Field(4, ge=1, description="largest n (choices per request)")
    default_max_tokens: int = Field(256, ge=1, description="chat completions without max_tokens generate at most this")
    grace_seconds: float = Field(25.0, ge=0, description="on SIGTERM, time given to requests in flight before they are cut")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @model_validator(mode="after")
    def _drafter_address_with_remote_only(self) -> "VerifierSettings":
        if self.drafter == "remote":
            host, _, port = (self.drafter_address or "").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--drafter remote needs --drafter-address HOST:PORT, got {self.drafter_address!r}")
        elif self.drafter_address is not None:
            raise ValueError(f"--drafter-address is for --drafter remote, not --drafter {self.drafter}")
        return self

    def backoff(self) -> BackoffConfig:
        return BackoffConfig(break_even=self.backoff_below)

    def tree(self) -> TreeConfig:
        return TreeConfig.from_attributes(self)


def parse_settings(argv: list[str] | None) -> VerifierSettings:
    """Flags from argv (None: sys.argv), then the environment, then defaults; exit 2 when invalid."""
    return parse_or_exit(VerifierSettings, argv, "python -m services.verifier")
