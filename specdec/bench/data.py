"""Where the evaluation questions shipped with the repository live (see benchmarks/data/README.md)."""

from __future__ import annotations

from pathlib import Path

DEV_QUESTIONS = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "spec_bench_dev.jsonl"
