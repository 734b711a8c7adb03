"""Drafter settings: command-line flags over SPECDEC_DRAFTER_* environment variables over
defaults, parsed once at start (never at import)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.settings import parse_or_exit
from specdec.config import TreeConfig

_TREE = TreeConfig()


class DrafterSettings(BaseSettings):
    """Everything the drafter service can be told; `python -m services.drafter --help` lists it."""

    model_config = SettingsConfigDict(env_prefix="SPECDEC_DRAFTER_", cli_kebab_case=True,
        env_ignore_empty=True, cli_prog_name="python -m services.drafter")

    head: str | None = Field(None, description="draft head directory, or 'random' (default: the shipped head)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(50051, ge=0, le=65535, description="port to listen on")
    model: str | None = Field(None, description="target model directory whose embedding and LM head the head shares (default: SmolLM2-135M-Instruct)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="head and shared weights dtype")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice)")
    top_k: int = Field(_TREE.top_k, ge=1, description="children expanded per draft node")
    depth: int = Field(_TREE.depth, ge=1, description="draft tree depth")
    total_tokens: int = Field(_TREE.total_tokens, ge=1, description="tree nodes per round, root included")
    min_prob: float = Field(_TREE.min_prob, ge=0.0, lt=1.0, description="verify only draft nodes with at least this cumulative draft probability")
    lookup_tokens: int = Field(_TREE.lookup_tokens, ge=0, description="longest lookup chain (tokens that followed an earlier occurrence of the current suffix) added to each tree; 0 = off")
    lookup_alone: float = Field(_TREE.lookup_alone, gt=0.0, le=1.0, description="a lookup chain at least this likely is proposed without running the head (1 = never)")
    head_context: int = Field(_TREE.head_context, ge=0, description="prompt tokens the head reads when a session opens: the last N (0 = all)")
    max_sessions: int = Field(64, ge=1, description="live sessions at most; more get RESOURCE_EXHAUSTED")
    grace_seconds: float = Field(5.0, ge=0, description="on SIGTERM, time given to live sessions before they are cut")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    def tree(self) -> TreeConfig:
        return TreeConfig.from_attributes(self)


def parse_settings(argv: list[str] | None) -> DrafterSettings:
    """Flags from argv (None: sys.argv), then the environment, then defaults; exit 2 when invalid."""
    return parse_or_exit(DrafterSettings, argv, "python -m services.drafter")
