"""Self-written training prompts (the Magpie idea, arXiv 2406.08464): the target, given its chat
template up to the start of a user turn, writes the user's request itself.

Why: the training conversations cover a few narrow sources (grade-school math, tool use, code,
role play), and a head distilled on them drafts poorly for other requests (writing, STEM,
translation, ...). The target's own requests follow the instruction data it was tuned on, so
answering them (`regenerate`) gives on-policy data of the breadth a server sees. The prompts
are sampled from the target alone: no outside data.

Output: JSONL lines {"messages": [{"role": "user", "content": ...}], "batch": b}; the file is
replaced whole after each batch (never half-written). Batch b's sampling is seeded by (seed, b),
so a rerun continues after the last written batch and ends equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from specdec.config import ConfigError
from specdec.target import TargetRunner
from specdec.train.regenerate import answer_prompts

_MARK = "\x00PROMPT\x00"


def user_turn_prefix(tokenizer) -> list[int]:
    """Token ids of the chat template up to where a (first) user message's text begins: the
    default system turn and the user header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the target's tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False)
    if _MARK not in text:
        raise ConfigError("the chat template does not show the user's text verbatim; cannot find the user header")
    return tokenizer(text[: text.index(_MARK)], add_special_tokens=False)["input_ids"]


def _read_written(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.inference_mode()
def write_prompts(
    runner: TargetRunner,
    out: str | Path,
    batches: int,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Sample `batches` batches of user prompts into `out` (appending; reruns continue).

    A sample is dropped, and counted, when it does not end within `max_new_tokens` (a cut-off
    request), is blank, or repeats one already written."""
    if temperature <= 0:
        raise ConfigError("self-written prompts need sampling: --temperature must be > 0")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = _read_written(out)
    start = max((r["batch"] for r in records), default=-1) + 1
    seen = {r["messages"][0]["content"] for r in records}
    prefix = user_turn_prefix(runner.tokenizer)
    eos = set(runner.eos_token_ids)
    dropped = {"unfinished": 0, "blank": 0, "duplicate": 0}
    bar = tqdm(total=batches, initial=min(start, batches), desc="prompts", unit="batch", disable=not progress)
    for b in range(start, batches):
        sampled = answer_prompts(runner, [prefix] * batch_size, max_new_tokens, temperature, batch_size, seed * 100_003 + b)
        for _, row in sampled:
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            text = runner.tokenizer.decode(row[:stop], skip_special_tokens=True).strip() if stop is not None else ""
            reason = "unfinished" if stop is None else "blank" if not text else "duplicate" if text in seen else None
            if reason:
                dropped[reason] += 1
                continue
            seen.add(text)
            records.append({"messages": [{"role": "user", "content": text}], "batch": b})
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        tmp.replace(out)
        bar.update(1)
        bar.set_postfix(prompts=len(records))
    bar.close()
    return {"out": str(out), "batches": batches, "prompts": len(records), "dropped_this_run": dropped}
