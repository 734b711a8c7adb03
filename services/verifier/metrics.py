"""Prometheus metrics of the verifier, in a registry of their own (one per app instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from specdec.generate import GenerationStats

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


class Metrics:
    """Request, latency and speculation counters; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("specdec_requests", "HTTP API requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("specdec_ttft_seconds", "request arrival to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("specdec_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("specdec_prompt_tokens", "prompt tokens of generations", registry=r)
        self.cached_prompt_tokens = Counter(
            "specdec_cached_prompt_tokens", "prompt tokens restored from the prefix cache instead of prefilled", registry=r
        )
        self.drafts = Counter("specdec_drafts", "rounds that verified a drafted tree", registry=r)
        self.draft_tokens = Counter("specdec_draft_tokens", "draft tokens proposed (roots excluded)", registry=r)
        self.accepted = Counter("specdec_accepted_tokens", "draft tokens accepted by the target", registry=r)
        self.accepted_by_depth = Counter(
            "specdec_accepted_by_depth", "rounds that accepted a draft token at this tree depth", ["depth"], registry=r
        )
        self.fallbacks = Counter("specdec_fallback_rounds", "rounds decoded without the drafter while one is configured", registry=r)
        self.paused = Counter("specdec_paused_rounds", "plain rounds chosen by the speculation back-off", registry=r)
        self.drafter_failures = Counter("specdec_drafter_failures", "drafter calls that failed or passed their deadline", registry=r)
        self.queue_depth = Gauge("specdec_queue_depth", "requests waiting for a generation slot", registry=r)
        self.running = Gauge("specdec_running", "generations running", registry=r)

    def record_generation(self, stats: GenerationStats) -> None:
        """Add one finished (or cancelled) generation's counters."""
        self.tokens.inc(stats.new_tokens)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_prompt_tokens.inc(stats.cached_prompt_tokens)
        self.drafts.inc(len(stats.accepted_per_round))
        self.draft_tokens.inc(stats.draft_tokens)
        self.accepted.inc(sum(stats.accepted_per_round))
        for depth, rounds in enumerate(stats.accepted_by_depth(), start=1):
            self.accepted_by_depth.labels(depth=str(depth)).inc(rounds)
        self.fallbacks.inc(stats.fallback_rounds)
        self.paused.inc(stats.paused_rounds)
        self.drafter_failures.inc(stats.drafter_failures)

    def render(self) -> bytes:
        return generate_latest(self.registry)
