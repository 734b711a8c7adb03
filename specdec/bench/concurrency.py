"""`specdec bench --concurrency`: throughput and latency of batched serving, plain against
speculative, at several numbers of concurrent users, in one process.

Each level runs a closed loop: `c` users each send a question's first turn (chat template), and a
user whose answer is done sends the next question at once, until every question is answered.
All requests of a level share one `specdec.batch.Batch`, exactly as the verifier decodes them.
Paths: plain batched decoding (no drafter), speculation with the load-adaptive budget (the
server's default), and optionally speculation with full trees every round. Paths alternate
within a level so that slow drifts of a busy machine hit them alike. Every answer is compared
with the plain path's answer to the same question at concurrency 1 (greedy, and sampled with the
same seed): a difference is a mismatch, since batching and drafting must not change output.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

from tqdm import tqdm

from specdec.batch import Batch
from specdec.budget import CostModel, SpeculationBudget
from specdec.config import SamplingParams, StopConfig
from specdec.drafter import Drafter
from specdec.generate import Generation
from specdec.target import TargetRunner
from specdec.train.data import Question

PLAIN, ADAPTIVE, FULL = "plain", "speculative", "speculative-full-trees"


@dataclass
class LevelRun:
    """One path at one concurrency: wall time, tokens, and per-request latencies (from the
    request's arrival in the batch to its last token, and to its first)."""

    concurrency: int
    path: str
    seconds: float = 0.0
    tokens: int = 0
    forwards: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    mismatches: int = 0
    draft_rows: int = 0

    def row(self, plain_tps: float) -> dict:
        tps = self.tokens / self.seconds if self.seconds else 0.0
        return {
            "concurrency": self.concurrency,
            "path": self.path,
            "tokens_per_s": round(tps, 1),
            "vs_plain": round(tps / plain_tps, 3) if plain_tps else None,
            "latency_p50_s": round(_quantile(self.latencies, 0.5), 3),
            "latency_p95_s": round(_quantile(self.latencies, 0.95), 3),
            "ttft_p50_s": round(_quantile(self.ttfts, 0.5), 3),
            "ttft_p95_s": round(_quantile(self.ttfts, 0.95), 3),
            "tau": round(self.tokens / self.forwards, 3) if self.forwards else 0.0,
            "draft_rows_per_request_round": round(self.draft_rows / max(self.forwards, 1), 3),
            "requests": len(self.latencies),
            "tokens": self.tokens,
            "mismatches": self.mismatches,
        }


def run_concurrency(
    runner: TargetRunner,
    drafter: Drafter,
    questions: Sequence[Question],
    levels: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    prefill_chunk: int = 128,
    full_trees: bool = False,
    progress: bool = True,
) -> dict:
    """Run every level and path; returns {"costs": the calibration, "rows": one per level and path}."""
    prompts = [runner.encode_messages([{"role": "user", "content": q.turns[0]}]) for q in questions]
    costs = CostModel.calibrate(runner)
    paths = [PLAIN, ADAPTIVE] + ([FULL] if full_trees else [])
    reference: dict[int, list[int]] = {}
    rows = []
    bar = tqdm(total=len(levels) * len(paths) * len(prompts), desc="requests", unit="req", disable=not progress)
    _warm_up(runner, drafter, prompts[0])
    for level in levels:
        runs = {}
        for path in paths:
            budget = SpeculationBudget(costs) if path == ADAPTIVE else None
            run = LevelRun(level, path)
            gens = _closed_loop(
                runner, Batch(runner, budget), prompts, level, run,
                lambda i: Generation(
                    runner, prompts[i], SamplingParams(temperature=temperature, seed=seed + i), StopConfig(max_new_tokens=max_new_tokens),
                    None if path == PLAIN else drafter, prefill_chunk=prefill_chunk,
                ),
                bar,
            )
            for i, gen in gens.items():
                expected = reference.setdefault(i, gen.token_ids)
                run.mismatches += gen.token_ids != expected
            runs[path] = run
        plain_tps = runs[PLAIN].tokens / runs[PLAIN].seconds if runs[PLAIN].seconds else 0.0
        rows += [run.row(plain_tps) for run in runs.values()]
    bar.close()
    calibration = {str(n): round(1000 * costs.seconds(n), 2) for n in (1, 2, 4, 8, 16, 32, 64)}
    return {"forward_ms_by_rows": calibration, "rows": rows}


def _closed_loop(runner, batch: Batch, prompts, users: int, run: LevelRun, make, bar) -> dict[int, Generation]:
    """Keep `users` requests in the batch until every prompt is answered."""
    pending = list(range(len(prompts)))
    arrival: dict[int, float] = {}
    first: dict[int, float] = {}
    gens: dict[int, Generation] = {}
    index: dict[int, int] = {}
    began = time.perf_counter()
    while pending or not batch.empty:
        while pending and len(batch) < users:
            i = pending.pop(0)
            gens[i] = make(i)
            index[id(gens[i])] = i
            arrival[i] = time.perf_counter()
            batch.add(gens[i])
        for gen, outcome in batch.step():
            if isinstance(outcome, Exception):
                raise outcome
            i = index[id(gen)]
            now = time.perf_counter()
            first.setdefault(i, now)
            if gen.finished:
                run.latencies.append(now - arrival[i])
                run.ttfts.append(first[i] - arrival[i])
                run.tokens += len(gen.token_ids)
                run.forwards += gen.stats.target_forwards
                run.draft_rows += gen.stats.draft_tokens
                bar.update(1)
    run.seconds = time.perf_counter() - began
    return gens


def _warm_up(runner: TargetRunner, drafter: Drafter, prompt: list[int]) -> None:
    for d in (None, drafter):
        list(Generation(runner, prompt, stop=StopConfig(max_new_tokens=8), drafter=d))


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def markdown(result: dict) -> str:
    head = "| concurrency | path | tokens/s | vs plain | latency p50 / p95 s | TTFT p50 / p95 s | tau | mismatches |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['concurrency']} | {r['path']} | {r['tokens_per_s']} | {r['vs_plain']:.2f}x | "
            f"{r['latency_p50_s']} / {r['latency_p95_s']} | {r['ttft_p50_s']} / {r['ttft_p95_s']} | {r['tau']} | {r['mismatches']} |"
        )
    return "\n".join(lines)
