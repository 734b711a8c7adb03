"""The verifier's model side: the target runner plus the drafter it speculates with (embedded,
remote over gRPC, or none), built from settings at start."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from specdec.backoff import BackoffConfig
from specdec.batch import Batch
from specdec.budget import CostModel, SpeculationBudget
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
    model_name: str
    retry_rounds: int = 8
    prefix_cache: PrefixCache | None = None
    backoff: BackoffConfig = BackoffConfig()
    prefill_chunk: int = 128
    budget: SpeculationBudget | None = None  # None: every round drafts its full tree

    def generation(self, prompt_ids: Sequence[int], sampling: SamplingParams, stop: StopConfig) -> Generation:
        return Generation(
            self.runner, prompt_ids, sampling, stop, self.drafter, retry_rounds=self.retry_rounds, prefix_cache=self.prefix_cache,
            backoff=self.backoff, prefill_chunk=self.prefill_chunk,
        )

    def batch(self) -> Batch:
        """The batch every request's generations are decoded in."""
        return Batch(self.runner, self.budget)

    def drafter_state(self) -> str:
        """'embedded', 'none', 'remote-ok' or 'remote-unavailable' (then requests decode plainly)."""
        return "none" if self.drafter is None else self.drafter.state()

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.close()


def build_engine(settings) -> Engine:
    """Load the target, then load or connect the drafter `settings.drafter` names."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    runner = TargetRunner.load(settings.model, DTYPES[settings.dtype], settings.device, settings.activations)
    drafter: Drafter | None = None
    if settings.drafter == "embedded":
        drafter = load_head_drafter(runner, settings.head, settings.tree())
        log.info("embedded drafter: head %s, %s", settings.head or "default", settings.tree())
    elif settings.drafter == "remote":
        from services.verifier.remote_drafter import RemoteDrafter

        drafter = RemoteDrafter(
            settings.drafter_address,
            hidden_size=runner.hidden_size,
            timeout=settings.drafter_timeout,
            feature_dtype=settings.feature_dtype,
            max_tree_tokens=settings.max_tree_tokens,
        )
        log.info("remote drafter at %s (%s)", settings.drafter_address, "reachable" if drafter.reachable() else "not reachable yet")
    budget = None
    if drafter is not None and settings.adaptive_speculation:
        costs = CostModel.calibrate(runner)
        log.info(
            "speculation budget: a forward of 1 / 8 / 32 rows takes %.1f / %.1f / %.1f ms",
            *(1000 * costs.seconds(n) for n in (1, 8, 32)),
        )
        budget = SpeculationBudget(costs)
    return Engine(
        runner=runner,
        drafter=drafter,
        model_name=settings.served_model_name or runner.name,
        retry_rounds=settings.drafter_retry_rounds,
        prefix_cache=PrefixCache(settings.prefix_cache_tokens) if settings.prefix_cache_tokens else None,
        backoff=settings.backoff(),
        prefill_chunk=settings.prefill_chunk,
        budget=budget,
    )
