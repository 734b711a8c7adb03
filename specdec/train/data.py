"""Reading training conversations and Spec-Bench questions from JSONL, counting bad lines."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from specdec.config import ConfigError

ROLES = ("system", "user", "assistant")


@dataclass
class Question:
    """One Spec-Bench question: its user turns are asked in order, each seeing earlier answers."""

    question_id: str
    category: str
    turns: list[str]


@dataclass
class ReadReport:
    """What a reader kept and what it skipped (line number and reason), never silently."""

    kept: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def warn(self, path: str | Path) -> None:
        """Print the skip count (and the first few reasons) to stderr if anything was skipped."""
        if self.skipped:
            first = "; ".join(f"line {n}: {why}" for n, why in self.skipped[:3])
            print(f"{path}: skipped {len(self.skipped)} malformed line(s) ({first})", file=sys.stderr)


def _lines(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def _messages(record: object, need_reply: bool) -> list[dict]:
    """The record's messages if they are a valid chat: starting with a system or user turn
    and, when `need_reply`, holding at least one assistant reply (else ending with a user turn)."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError("no 'messages' list")
    messages = record["messages"]
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError("a message lacks a valid role or string content")
    if not messages or messages[0]["role"] == "assistant":
        raise ValueError("needs a user turn before any assistant reply")
    if not any(m["role"] == "assistant" for m in messages) and (need_reply or messages[-1]["role"] != "user"):
        raise ValueError("needs an assistant reply" if need_reply else "needs a user turn to answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(
    path: str | Path, limit: int | None = None, need_reply: bool = True
) -> tuple[list[list[dict]], ReadReport]:
    """The first `limit` valid conversations (OpenAI messages format) of a JSONL file; with
    `need_reply` False, prompts alone (ending with a user turn) are valid too."""
    report, out = ReadReport(), []
    for number, line in _lines(path):
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(_messages(json.loads(line), need_reply))
        except (json.JSONDecodeError, ValueError) as exc:
            report.skipped.append((number, str(exc)))
    report.kept = len(out)
    return out, report


def read_questions(path: str | Path, limit: int | None = None) -> tuple[list[Question], ReadReport]:
    """Spec-Bench questions: {"question_id", "category", "turns": [str, ...]} per line."""
    report, out = ReadReport(), []
    for number, line in _lines(path):
        if limit is not None and len(out) >= limit:
            break
        try:
            r = json.loads(line)
            turns = r.get("turns") if isinstance(r, dict) else None
            if not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError("no list of string 'turns'")
            out.append(Question(str(r.get("question_id", number)), str(r.get("category", "unknown")), turns))
        except (json.JSONDecodeError, ValueError) as exc:
            report.skipped.append((number, str(exc)))
    report.kept = len(out)
    return out, report


def first_per_category(questions: list[Question], n: int) -> list[Question]:
    """The first `n` questions of each category, in file order (a balanced quick subset)."""
    seen: dict[str, int] = {}
    out = []
    for q in questions:
        seen[q.category] = seen.get(q.category, 0) + 1
        if seen[q.category] <= n:
            out.append(q)
    return out


def select_questions(path: str | Path, limit: int | None = None, per_category: int | None = None) -> tuple[list[Question], ReadReport]:
    """The questions a run uses: the first `limit` valid ones of the file, then the first
    `per_category` of each category; reports skipped lines on stderr."""
    if per_category is not None and per_category < 1:
        raise ConfigError(f"--per-category must be >= 1, got {per_category}")
    questions, report = read_questions(path, limit)
    report.warn(path)
    if per_category is not None:
        questions = first_per_category(questions, per_category)
    return questions, report
