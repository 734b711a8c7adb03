"""Turn records into the benchmark's JSON: figures overall and per category, the divergences,
per-turn rows, the configuration and the machine."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
import transformers

from specdec.bench.harness import AR, SPEC, PathRun, TurnRecord
from specdec.target import TargetRunner


def summarize(records: Sequence[TurnRecord], greedy: bool, config: dict, machine: dict) -> dict:
    """The whole result. Rates are ratios of totals (total tokens / total forwards or seconds);
    speedup = spec tokens/s over AR tokens/s, i.e. AR seconds / spec seconds for equal tokens.
    Greedy mismatches count turns whose speculative tokens leave the AR tokens anywhere but at
    a near-tie (those are counted apart); both are None when sampling, where sampled mismatches
    count turns whose speculative tokens leave the AR tokens of the same seed at all (None when
    greedy)."""
    categories = list(dict.fromkeys(r.category for r in records))
    return {
        "overall": block(records, greedy),
        "per_category": {c: block([r for r in records if r.category == c], greedy) for c in categories},
        "mismatches": [
            {"question_id": r.question_id, "category": r.category, "turn": r.turn, "path": name, **asdict(run.divergence)}
            for r in records
            for name, run in r.runs.items()
            if run.divergence is not None
        ],
        "turns": [turn_row(r) for r in records],
        "config": config,
        "machine": machine,
    }


def block(records: Sequence[TurnRecord], greedy: bool) -> dict:
    """Figures of a group of turns."""
    ar, spec = [r.runs[AR] for r in records], [r.runs[SPEC] for r in records]
    ar_tps, spec_tps = _tokens_per_s(ar), _tokens_per_s(spec)
    forwards = sum(s.target_forwards for s in spec)
    rounds = [a for s in spec for a in s.accepted_per_round]
    divergences = [s.divergence for s in spec if s.divergence is not None]
    peers = [name for name in (records[0].runs if records else {}) if name not in (AR, SPEC)]
    return {
        "questions": len({r.question_id for r in records}),
        "turns": len(records),
        "tau": _ratio(sum(s.new_tokens for s in spec), forwards),
        "speedup": _ratio(spec_tps, ar_tps),
        "spec_tokens_per_s": round(spec_tps, 2),
        "ar_tokens_per_s": round(ar_tps, 2),
        "greedy_mismatches": sum(not d.near_tie for d in divergences) if greedy else None,
        "near_tie_mismatches": sum(d.near_tie for d in divergences) if greedy else None,
        "sampled_mismatches": None if greedy else len(divergences),
        "spec_new_tokens": sum(s.new_tokens for s in spec),
        "ar_new_tokens": sum(a.new_tokens for a in ar),
        # Prompt tokens of each path (they differ when sampled paths continue their own conversations).
        "prompt_tokens": sum(a.prompt_tokens for a in ar),
        "spec_prompt_tokens": sum(s.prompt_tokens for s in spec),
        # Prompt tokens restored from each path's own prefix cache instead of prefilled.
        "ar_cached_prompt_tokens": sum(a.cached_prompt_tokens for a in ar),
        "spec_cached_prompt_tokens": sum(s.cached_prompt_tokens for s in spec),
        "ar_mean_ttft_ms": _ratio(1000 * sum(a.ttft for a in ar), len(ar)),
        "spec_mean_ttft_ms": _ratio(1000 * sum(s.ttft for s in spec), len(spec)),
        "spec_seconds": round(sum(s.seconds for s in spec), 3),
        "ar_seconds": round(sum(a.seconds for a in ar), 3),
        "target_forwards": forwards,
        "rounds": len(rounds),
        "mean_accepted": _ratio(sum(rounds), len(rounds)),
        "draft_tokens_per_round": _ratio(sum(s.draft_tokens for s in spec), len(rounds)),
        "fallback_rounds": sum(s.fallback_rounds for s in spec),
        "paused_rounds": sum(s.paused_rounds for s in spec),  # plain rounds chosen by the back-off
        # Where time goes per decode round (every target forward after the prefill): the
        # drafter's proposal and the tree forward; for the plain path, its one-node forward.
        "spec_draft_ms_per_round": _ratio(1000 * sum(s.draft_seconds for s in spec), _rounds(spec)),
        "spec_verify_ms_per_round": _ratio(1000 * sum(s.verify_seconds for s in spec), _rounds(spec)),
        "ar_forward_ms_per_round": _ratio(1000 * sum(a.verify_seconds for a in ar), _rounds(ar)),
        "acceptance_histogram": [rounds.count(n) for n in range(max(rounds, default=-1) + 1)],
        "accepted_by_depth": [_ratio(sum(a >= d for a in rounds), len(rounds)) for d in range(1, max(rounds, default=0) + 1)],
        "peers": {name: _peer_block([r.runs[name] for r in records], spec_tps, greedy) for name in peers},
    }


def turn_row(record: TurnRecord) -> dict:
    """One turn's counters (no token ids) for later analysis."""
    return {
        "question_id": record.question_id,
        "category": record.category,
        "turn": record.turn,
        **{
            name: {
                "new_tokens": run.new_tokens,
                "seconds": round(run.seconds, 4),
                "target_forwards": run.target_forwards,
                "prompt_tokens": run.prompt_tokens,
                "cached_prompt_tokens": run.cached_prompt_tokens,
            }
            for name, run in record.runs.items()
        },
    }


def machine_info(runner: TargetRunner) -> dict:
    """What the figures were measured on (the load average shows how busy the machine was)."""
    return {
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "device": str(runner.device),
        "gpu": torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else None,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def _peer_block(runs: list[PathRun], spec_tps: float, greedy: bool) -> dict:
    tps = _tokens_per_s(runs)
    divergences = [r.divergence for r in runs if r.divergence is not None]
    forwards = sum(r.target_forwards for r in runs)
    return {
        "tokens_per_s": round(tps, 2),
        "tau": _ratio(sum(r.new_tokens for r in runs), forwards) if forwards else None,  # our own loop's variants only
        "new_tokens": sum(r.new_tokens for r in runs),
        "seconds": round(sum(r.seconds for r in runs), 3),
        "spec_speedup": _ratio(spec_tps, tps),
        "mismatches_vs_ar": sum(not d.near_tie for d in divergences) if greedy else None,
    }


def _tokens_per_s(runs: Sequence[PathRun]) -> float:
    seconds = sum(r.seconds for r in runs)
    return sum(r.new_tokens for r in runs) / seconds if seconds else 0.0


def _rounds(runs: Sequence[PathRun]) -> int:
    return sum(max(r.target_forwards - 1, 0) for r in runs)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
