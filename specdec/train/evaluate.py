"""Acceptance evaluation: speculative decoding over Spec-Bench-format questions (multi-turn,
each turn sees the earlier answers) with the shared decode loop; tau overall and per category,
and acceptance by tree depth. Finished questions are appended to a progress file, so a rerun
with the same settings continues where it stopped."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from specdec.backoff import BackoffConfig
from specdec.config import SamplingParams, StopConfig
from specdec.drafter import Drafter
from specdec.generate import Generation
from specdec.target import TargetRunner
from specdec.train.data import Question


def answer_question(
    runner: TargetRunner, drafter: Drafter, question: Question, temperature: float, max_new_tokens: int, seed: int
) -> list[dict]:
    """Ask every turn of a question in order; returns each turn's counters."""
    messages: list[dict] = []
    turns = []
    for t, text in enumerate(question.turns):
        messages.append({"role": "user", "content": text})
        sampling = SamplingParams(temperature=temperature, seed=seed + t)
        # Every round speculates (no back-off): this measures the head, not a request's speed.
        gen = Generation(
            runner, runner.encode_messages(messages), sampling, StopConfig(max_new_tokens=max_new_tokens), drafter,
            backoff=BackoffConfig(break_even=0.0),
        )
        for _ in gen:
            pass
        messages.append({"role": "assistant", "content": gen.text})
        s = gen.stats
        turns.append(
            {
                "new_tokens": s.new_tokens,
                "target_forwards": s.target_forwards,
                "accepted_per_round": s.accepted_per_round,
                "seconds": round(s.seconds, 3),
            }
        )
    return turns


def summarize(records: list[dict]) -> dict:
    """tau (new tokens per target forward) overall and per category, acceptance by depth."""

    def block(turns: list[dict]) -> dict:
        new = sum(t["new_tokens"] for t in turns)
        forwards = sum(t["target_forwards"] for t in turns)
        rounds = [a for t in turns for a in t["accepted_per_round"]]
        deepest = max(rounds, default=0)
        seconds = sum(t["seconds"] for t in turns)
        return {
            "tau": round(new / forwards, 4) if forwards else 0.0,
            "new_tokens": new,
            "target_forwards": forwards,
            "tokens_per_s": round(new / seconds, 2) if seconds else 0.0,
            "accepted_by_depth": [round(sum(a >= d for a in rounds) / len(rounds), 4) for d in range(1, deepest + 1)],
        }

    by_category: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_category[r["category"]] += r["turns"]
    return {
        "questions": len(records),
        "overall": block([t for r in records for t in r["turns"]]),
        "per_category": {c: block(turns) for c, turns in sorted(by_category.items())},
    }


def evaluate(
    runner: TargetRunner,
    drafter: Drafter,
    questions: list[Question],
    temperature: float = 0.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    progress_file: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run every question (skipping those already in `progress_file` for the same settings)."""
    settings = {"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
    done: dict[str, dict] = {}
    if progress_file is not None and Path(progress_file).is_file():
        for line in Path(progress_file).read_text().splitlines():
            r = json.loads(line)
            if r["settings"] == settings:
                done[r["question_id"]] = r
    records = []
    if progress_file is not None:
        Path(progress_file).parent.mkdir(parents=True, exist_ok=True)
    sink = Path(progress_file).open("a") if progress_file is not None else None
    try:
        for i, q in enumerate(tqdm(questions, desc="evaluate", unit="question", disable=not progress)):
            if q.question_id in done:
                records.append(done[q.question_id])
                continue
            turns = answer_question(runner, drafter, q, temperature, max_new_tokens, seed * 1_000_003 + 1000 * i)
            record = {"question_id": q.question_id, "category": q.category, "settings": settings, "turns": turns}
            records.append(record)
            if sink is not None:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
    finally:
        if sink is not None:
            sink.close()
    return {**settings, **summarize(records)}
