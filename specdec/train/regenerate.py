"""On-policy data (DistillSpec): the target answers the training prompts itself, and the
features it computes while generating are stored in the same shard format as `extract`.
Prompts come from conversations (everything before the first reply) or are bare prompts, such
as those the target writes itself (`specdec.train.prompts`).

Generation is batched, which per token is far cheaper than answering one by one, and keeps
the features the target computes while answering, so the answers need no second pass. On the
CPU the sequences share one KV cache and are stepped together on the target's own runner
(`specdec.train.batched`: continuous batching, the C++ decoder stack when the target has it,
2.25x Hugging Face's batched `generate` here, side by side). On a GPU, where a forward's cost hardly
depends on its rows, Hugging Face `generate` (left padding, a hook on the final norm) runs
larger batches. Rerunning skips finished shards.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from specdec.target import TargetRunner
from specdec.train.batched import decode_together
from specdec.train.cache import Sequence, cache_meta, save_shard, shard_path, shard_size_on_disk, write_meta
from specdec.train.data import read_conversations


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) its first assistant reply; all of a bare prompt."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return messages[:first]


def pad_id(runner: TargetRunner) -> int:
    """The id `generate` pads finished rows with: the tokenizer's pad token, else 0 (those
    positions are masked out or cut off, so any id serves)."""
    pad = getattr(runner.tokenizer, "pad_token_id", None)
    return 0 if pad is None else pad


def answer_prompts(
    runner: TargetRunner, prompts: list[list[int]], max_new_tokens: int, temperature: float, batch_size: int, seed: int,
    on_done: Callable[[int], None] = lambda _: None,
) -> list[tuple[Sequence, list[int]]]:
    """(sequence with features and answer mask, answer ids) for each prompt, in order; an
    answer ends with an EOS or at `max_new_tokens`. Sampled answers are seeded by `seed`."""
    if runner.device.type != "cpu":
        torch.manual_seed(seed)
        results = []
        for b in range(0, len(prompts), batch_size):
            results += generate_batch(runner, prompts[b : b + batch_size], max_new_tokens, temperature)
            for i in range(b, min(len(prompts), b + batch_size)):
                on_done(i)
        return results
    stack = runner.lean.stack_rows
    rows = min(batch_size, stack) if stack else batch_size
    results = []
    for prompt, answer in zip(prompts, decode_together(runner, prompts, max_new_tokens, temperature, rows, torch.Generator().manual_seed(seed), on_done)):
        tokens = prompt + answer.tokens
        fed = len(tokens) - 1
        mask = torch.tensor([False] * len(prompt) + [True] * len(answer.tokens))[:fed]
        results.append((Sequence(torch.tensor(tokens[:fed]), mask, torch.cat(answer.features).to(torch.float16)), answer.tokens))
    return results


@torch.inference_mode()
def generate_batch(
    runner: TargetRunner, prompts: list[list[int]], max_new_tokens: int, temperature: float
) -> list[tuple[Sequence, list[int]]]:
    """Answer each prompt; returns (sequence with features and answer mask, answer ids) per prompt.

    A sequence keeps the tokens whose features the target computed: all but the very last
    generated token when the answer reached `max_new_tokens` (the EOS is kept otherwise, as the
    last pair still predicts it)."""
    width = max(len(p) for p in prompts)
    pad = pad_id(runner)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        attention[b, width - len(p) :] = 1
    captured: list[torch.Tensor] = []
    hook = runner.model.model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().to("cpu")))
    try:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        out = runner.model.generate(
            input_ids=ids.to(runner.device),
            attention_mask=attention.to(runner.device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,
            pad_token_id=pad,
            eos_token_id=list(runner.eos_token_ids) or None,
            **sampling,
        )
    finally:
        hook.remove()
    features = torch.cat(captured, dim=1)  # [B, width + generated - 1, d]
    eos = set(runner.eos_token_ids)
    results = []
    for b, p in enumerate(prompts):
        answer = out[b, width:].tolist()
        stop = next((i for i, t in enumerate(answer) if t in eos), None)
        answer = answer if stop is None else answer[: stop + 1]
        keep = min(len(p) + len(answer), features.shape[1] - (width - len(p)))
        tokens = (p + answer)[:keep]
        start = width - len(p)
        seq = Sequence(
            torch.tensor(tokens),
            torch.tensor([False] * len(p) + [True] * len(answer))[:keep],
            features[b, start : start + keep].to(torch.float16),
        )
        results.append((seq, answer))
    return results


def regenerate(
    runner: TargetRunner,
    data: str | Path,
    out: str | Path,
    limit: int | None = None,
    max_new_tokens: int = 256,
    max_prompt: int = 512,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    shard_size: int = 64,
    progress: bool = True,
) -> dict:
    """Answer the first `limit` valid conversations' prompts with the target into cache `out`
    (features + masks as shards, the answers as shard-NNNNN.jsonl for inspection)."""
    conversations, report = read_conversations(data, limit, need_reply=False)
    report.warn(data)
    source = f"regenerate:{Path(data).resolve()}:temperature={temperature}:seed={seed}:max_prompt={max_prompt}"
    write_meta(out, cache_meta(runner, source, max_prompt + max_new_tokens, shard_size))
    prompts = [runner.encode_messages(prompt_messages(m)) for m in conversations]
    too_long = sum(len(p) > max_prompt for p in prompts)
    shards = math.ceil(len(prompts) / shard_size)
    parts = [list(range(k * shard_size, min(len(prompts), (k + 1) * shard_size))) for k in range(shards)]
    parts = [[i for i in part if len(prompts[i]) <= max_prompt] for part in parts]
    todo = [k for k in range(shards) if parts[k] and shard_size_on_disk(out, k) != len(parts[k])]
    bar = tqdm(total=sum(len(p) for p in parts), desc="regenerate", unit="conv", disable=not progress)
    bar.update(sum(len(parts[k]) for k in range(shards) if k not in todo))
    tokens = 0
    for k in todo:
        order = sorted(parts[k], key=lambda i: len(prompts[i]))  # similar lengths pad less
        done = lambda _: bar.update(1)  # noqa: E731
        results = answer_prompts(runner, [prompts[i] for i in order], max_new_tokens, temperature, batch_size, seed * 100_003 + k, done)
        sequences = [seq for seq, _ in results]
        answers = [answer for _, answer in results]
        tokens += sum(len(seq.ids) for seq in sequences)
        bar.set_postfix(tokens=tokens)
        save_shard(out, k, sequences)
        lines = [
            json.dumps({"messages": prompt_messages(conversations[i]) + [{"role": "assistant", "content": runner.tokenizer.decode(a, skip_special_tokens=True)}]})
            for i, a in zip(order, answers)
        ]
        final = shard_path(out, k).with_suffix(".jsonl")
        tmp = final.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(final)
    bar.close()
    return {"conversations": len(conversations), "skipped": len(report.skipped), "prompt_too_long": too_long, "shards": shards, "new_tokens": tokens}
