"""The verifier's model side: the target runner plus the drafter it speculates with (embedded,
remote over gRPC, or none), built from settings at start."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from specdec.backoff import BackoffConfig
from specdec.options import DTYPES
from specdec.config import SamplingParams, StopConfig
from specdec.drafter import Drafter, load_head_drafter
from specdec.generate import Generation
from specdec.prefix_cache import PrefixCache
from specdec.target import TargetRunner

log = logging.getLogger("specdec.verifier")


@dataclass
class Engine:
    """What a request needs to become a `Generation`."""

    runner: TargetRunner
    drafter: Drafter | None
    drafter_kind: str
    model_name: str
    retry_rounds: int = 8
    prefix_cache: PrefixCache | None = None
    backoff: BackoffConfig = BackoffConfig()

    def generation(self, prompt_ids: Sequence[int], sampling: SamplingParams, stop: StopConfig) -> Generation:
        return Generation(
            self.runner, prompt_ids, sampling, stop, self.drafter, retry_rounds=self.retry_rounds, prefix_cache=self.prefix_cache,
            backoff=self.backoff,
        )

    def drafter_state(self) -> str:
        """'embedded', 'none', 'remote-ok' or 'remote-unavailable' (then requests decode plainly)."""
        if self.drafter_kind != "remote":
            return self.drafter_kind
        return "remote-ok" if self.drafter.reachable() else "remote-unavailable"

    def close(self) -> None:
        if self.drafter_kind == "remote":
            self.drafter.close()


def build_engine(settings) -> Engine:
    """Load the target and connect or load the drafter named by `settings.drafter`."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    runner = TargetRunner.load(settings.model, DTYPES[settings.dtype], settings.device, settings.activations)
    name = settings.served_model_name or runner.name
    cache = PrefixCache(settings.prefix_cache_tokens) if settings.prefix_cache_tokens else None
    if settings.drafter == "none":
        return Engine(runner, None, "none", name, settings.drafter_retry_rounds, cache, settings.backoff())
    if settings.drafter == "embedded":
        drafter = load_head_drafter(runner, settings.head, settings.tree())
        log.info("embedded drafter: head %s, %s", settings.head or "default", settings.tree())
        return Engine(runner, drafter, "embedded", name, settings.drafter_retry_rounds, cache, settings.backoff())
    from services.verifier.remote_drafter import RemoteDrafter

    remote = RemoteDrafter(
        settings.drafter,
        hidden_size=runner.hidden_size,
        timeout=settings.drafter_timeout,
        feature_dtype=settings.feature_dtype,
        max_tree_tokens=settings.max_tree_tokens,
    )
    log.info("remote drafter at %s (%s)", settings.drafter, "reachable" if remote.reachable() else "not reachable yet")
    return Engine(runner, remote, "remote", name, settings.drafter_retry_rounds, cache, settings.backoff())
