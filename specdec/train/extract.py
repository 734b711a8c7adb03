"""Feature extraction: run the target over chat conversations and store ids, assistant-token
loss masks and last-layer (post-norm) features in shards; rerunning skips finished shards."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from specdec.config import ConfigError
from specdec.target import TargetRunner
from specdec.train.cache import Sequence, cache_meta, save_shard, shard_size_on_disk, write_meta
from specdec.train.data import read_conversations


def _template(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation through the chat template, and a mask that is True on
    the tokens of assistant replies (what the draft head learns to predict)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the target's tokenizer has no chat template")
    ids = _template(tokenizer, messages, False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_template(tokenizer, messages[:i], True))
        end = len(_template(tokenizer, messages[: i + 1], False))
        mask[start:end] = [True] * (end - start)
    return ids, mask


@torch.inference_mode()
def features_of(runner: TargetRunner, ids: list[int]) -> torch.Tensor:
    """The target's last-layer features after its final norm, [len(ids), d] (as in prefill)."""
    out = runner.model.model(input_ids=torch.tensor([ids], device=runner.device), use_cache=False)
    return out.last_hidden_state[0]


def extract(
    runner: TargetRunner,
    data: str | Path,
    out: str | Path,
    limit: int | None = None,
    max_len: int = 768,
    shard_size: int = 64,
    progress: bool = True,
) -> dict:
    """Extract features of the first `limit` valid conversations into `out`. Returns counts."""
    conversations, report = read_conversations(data, limit)
    report.warn(data)
    write_meta(out, cache_meta(runner, str(Path(data).resolve()), max_len, shard_size))
    shards = math.ceil(len(conversations) / shard_size)
    parts = [conversations[k * shard_size : (k + 1) * shard_size] for k in range(shards)]
    # A shard is done when it holds all its conversations (a larger --limit refills the last one).
    todo = [k for k in range(shards) if shard_size_on_disk(out, k) != len(parts[k])]
    tokens = 0
    bar = tqdm(total=len(conversations), desc="extract", unit="conv", disable=not progress)
    bar.update(len(conversations) - sum(len(parts[k]) for k in todo))
    for k in todo:
        batch = []
        for messages in parts[k]:
            ids, mask = tokenize_chat(runner.tokenizer, messages)
            ids, mask = ids[:max_len], mask[:max_len]
            feats = features_of(runner, ids).to("cpu", torch.float16)
            batch.append(Sequence(torch.tensor(ids), torch.tensor(mask), feats))
            tokens += len(ids)
            bar.update(1)
        save_shard(out, k, batch)
        bar.set_postfix(tokens=tokens)
    bar.close()
    return {"conversations": len(conversations), "skipped": len(report.skipped), "shards": shards, "new_tokens": tokens}
