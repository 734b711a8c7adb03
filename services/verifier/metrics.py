"""Prometheus metrics of the verifier, in a registry of their own (one per app instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from specdec.generate import GenerationStats, Round

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_ROW_BUCKETS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_DRAFT_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


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
        self.budget_plain = Counter(
            "specdec_budget_plain_rounds", "rounds the speculation budget decoded plainly although the request could draft", registry=r
        )
        self.invalid_trees = Counter("specdec_invalid_trees", "drafter proposals refused at the boundary (a plain round instead)", registry=r)
        self.request_drafts = Histogram(
            "specdec_request_draft_tokens", "draft tokens verified per generation", buckets=_ROW_BUCKETS + (256, 1024), registry=r
        )
        self.request_accepted = Histogram(
            "specdec_request_accepted_tokens", "draft tokens accepted per generation", buckets=_ROW_BUCKETS + (256, 1024), registry=r
        )
        self.batch_size = Histogram("specdec_batch_size", "generations per batched round", buckets=_BATCH_BUCKETS, registry=r)
        self.rows = Histogram("specdec_rows_per_forward", "rows (roots and draft nodes) per target forward", buckets=_ROW_BUCKETS, registry=r)
        self.budget = Histogram(
            "specdec_draft_budget", "draft nodes verified per request and round (the adaptive budget's choice)", buckets=_DRAFT_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("specdec_queue_depth", "requests waiting for a generation slot", registry=r)
        self.running = Gauge("specdec_running", "generations in the batch", registry=r)

    def record_generation(self, stats: GenerationStats) -> None:
        """Add one finished (or cancelled) generation's counters."""
        self.tokens.inc(stats.new_tokens)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_prompt_tokens.inc(stats.cached_prompt_tokens)
        self.drafts.inc(len(stats.accepted_per_round))
        self.draft_tokens.inc(stats.draft_tokens)
        self.accepted.inc(sum(stats.accepted_per_round))
        self.request_drafts.observe(stats.draft_tokens)
        self.request_accepted.observe(sum(stats.accepted_per_round))
        for depth, rounds in enumerate(stats.accepted_by_depth(), start=1):
            self.accepted_by_depth.labels(depth=str(depth)).inc(rounds)
        self.fallbacks.inc(stats.fallback_rounds)
        self.paused.inc(stats.paused_rounds)
        self.budget_plain.inc(stats.budget_plain_rounds)
        self.invalid_trees.inc(stats.invalid_trees)
        self.drafter_failures.inc(stats.drafter_failures)

    def record_round(self, round_: Round) -> None:
        """One batched round: its size, its forward's rows, each request's verified draft nodes."""
        self.batch_size.observe(len(round_.draft_rows))
        self.rows.observe(round_.rows)
        for drafts in round_.verified:
            self.budget.observe(drafts)

    def render(self) -> bytes:
        return generate_latest(self.registry)
