"""The benchmark loop: every turn of every question decoded by the plain (AR) path, the
speculative path and optional peers, alternately on the same runner, with per-turn records.

Multi-turn questions use the chat template. Under greedy decoding turn n+1 sees the AR answer
of turn n as the assistant message, so every path decodes exactly the same prompt. Sampled
answers may differ from path to path, so there each of our paths (AR, speculative, variants)
continues its own conversation, as a server continues the one it answered, and the peers follow
the AR path's. Our paths sample with the same seed per turn, so their answers are in fact the
AR path's token for token (one draw per emitted token from bit-identical rows,
`verify.verify_walk`): a sampled divergence is a mismatch, with no near-tie exemption. The
order of the paths rotates from turn to turn so that slow drifts of a busy machine hit them
alike. With a prefix cache, each of our paths has its own (a later turn reuses
that path's own earlier turns, never another path's work), emptied after the warm-up: with a
shared sampled conversation, the speculative path's cache would hold its own first answer while
its second prompt held the AR path's, a prefill only the AR path could skip. Under greedy
decoding every path's token ids are compared with the AR path's (sampled: our paths' only): the
first differing position is a divergence, classified under greedy decoding as a near-tie when
the target's top-2 logit margin there is below the tolerance (DESIGN.md: tree and one-token
forwards differ in float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from tqdm import tqdm

from specdec.backoff import BackoffConfig
from specdec.bench.peers import Peer
from specdec.config import SamplingParams, StopConfig
from specdec.drafter import Drafter
from specdec.generate import Generation
from specdec.prefix_cache import PrefixCache
from specdec.target import TargetRunner
from specdec.train.data import Question

AR, SPEC = "ar", "spec"


@dataclass(frozen=True)
class BenchConfig:
    """What every path is asked to do. warmup_tokens 0 skips the warm-up."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    warmup_tokens: int = 16
    near_tie: float = 1e-4
    prefix_cache_tokens: int = 0  # per path; 0 = every prompt is prefilled whole
    backoff: BackoffConfig = BackoffConfig()  # of every path with a drafter

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Divergence:
    """The first position where a path's token ids leave the AR path's."""

    position: int
    ar_token: int | None  # None: the AR answer ended there
    token: int | None  # None: this path's answer ended there
    margin: float  # target's top-2 logit margin after prompt + AR tokens[:position]
    near_tie: bool


@dataclass
class PathRun:
    """One path's answer to one turn. target_forwards and the acceptance counters are only
    known for our own decode loop (zero for peers)."""

    token_ids: list[int]
    seconds: float
    target_forwards: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    draft_tokens: int = 0
    fallback_rounds: int = 0
    paused_rounds: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    divergence: Divergence | None = None
    cached_prompt_tokens: int = 0
    prompt_tokens: int = 0  # of the prompt this path decoded (its own conversation's when sampling)
    ttft: float = 0.0  # seconds to the first token (prefill, or the cached prefix's restore and the rest)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class TurnRecord:
    """All paths' runs of one turn of one question, keyed by path name (ar, spec, peers)."""

    question_id: str
    category: str
    turn: int
    runs: dict[str, PathRun]


def run_bench(
    runner: TargetRunner,
    drafter: Drafter,
    questions: Sequence[Question],
    config: BenchConfig = BenchConfig(),
    peers: Sequence[Peer] = (),
    progress: bool = False,
    variants: Mapping[str, Drafter] | None = None,
) -> list[TurnRecord]:
    """Decode every turn with each path (after a warm-up) and return one record per turn.
    `variants`: more speculative paths by name (our decode loop with another drafter, e.g. the
    same head without lookup drafting), reported beside the peers."""
    if not questions:
        return []
    variants = variants or {}
    paths, caches = _paths(runner, drafter, peers, config, variants)
    ours = {AR, SPEC, *variants}
    if config.warmup_tokens:
        prompt = runner.encode_messages([{"role": "user", "content": questions[0].turns[0]}])
        for run in paths.values():
            run(prompt, min(config.warmup_tokens, config.max_new_tokens), config.seed)
        for cache in caches:
            cache.clear()
    records: list[TurnRecord] = []
    bar = tqdm(questions, desc="bench", unit="question", disable=not progress)
    sources = {name: name if not config.greedy and name in ours else AR for name in paths}
    for question in bar:
        answers: dict[str, list[str]] = {source: [] for source in dict.fromkeys(sources.values())}
        for t in range(len(question.turns)):
            prompts = {source: runner.encode_messages(_conversation(question.turns[: t + 1], texts)) for source, texts in answers.items()}
            seed = config.seed + len(records)
            names = list(paths)
            shift = len(records) % len(names)
            runs = {name: paths[name](prompts[sources[name]], config.max_new_tokens, seed) for name in names[shift:] + names[:shift]}
            for name, run in runs.items():
                run.prompt_tokens = len(prompts[sources[name]])
            for name, run in runs.items():
                if name != AR and (config.greedy or name in ours):
                    near_tie = config.near_tie if config.greedy else 0.0
                    run.divergence = find_divergence(runner, prompts[AR], runs[AR].token_ids, run.token_ids, near_tie)
            records.append(TurnRecord(question.question_id, question.category, t, runs))
            for source, texts in answers.items():
                texts.append(runner.tokenizer.decode(runs[source].token_ids, skip_special_tokens=True))
        bar.set_postfix(_running(records), refresh=False)
    return records


def _conversation(user_turns: Sequence[str], answers: Sequence[str]) -> list[dict]:
    """Chat messages: each user turn followed by its answer, where there is one."""
    messages: list[dict] = []
    for t, text in enumerate(user_turns):
        messages.append({"role": "user", "content": text})
        if t < len(answers):
            messages.append({"role": "assistant", "content": answers[t]})
    return messages


def find_divergence(
    runner: TargetRunner, prompt: Sequence[int], ar_ids: Sequence[int], ids: Sequence[int], near_tie: float
) -> Divergence | None:
    """Where `ids` first differ from `ar_ids` (None if identical), with the target's margin there."""
    position = next((i for i, (a, b) in enumerate(zip(ar_ids, ids)) if a != b), min(len(ar_ids), len(ids)))
    if position == len(ar_ids) == len(ids):
        return None
    with torch.inference_mode():
        logits = runner.model(input_ids=torch.tensor([list(prompt) + list(ar_ids[:position])], device=runner.device)).logits
    top2 = torch.topk(logits[0, -1].float(), 2).values
    margin = float(top2[0] - top2[1])
    return Divergence(position, _token_at(ar_ids, position), _token_at(ids, position), margin, margin < near_tie)


def _token_at(ids: Sequence[int], position: int) -> int | None:
    return int(ids[position]) if position < len(ids) else None


Runner = Callable[[list[int], int, int], PathRun]


def _paths(
    runner: TargetRunner, drafter: Drafter, peers: Sequence[Peer], config: BenchConfig, variants: Mapping[str, Drafter]
) -> tuple[dict[str, Runner], list[PrefixCache]]:
    """Each path as a function (prompt ids, max new tokens, seed) -> PathRun, and the prefix
    caches of our paths."""
    caches: list[PrefixCache] = []

    def ours(with_drafter: Drafter | None) -> Runner:
        cache = PrefixCache(config.prefix_cache_tokens) if config.prefix_cache_tokens else None
        if cache is not None:
            caches.append(cache)

        def run(prompt: list[int], max_new_tokens: int, seed: int) -> PathRun:
            sampling = SamplingParams(temperature=config.temperature, seed=seed)
            gen = Generation(
                runner, prompt, sampling, StopConfig(max_new_tokens=max_new_tokens), with_drafter, prefix_cache=cache,
                backoff=config.backoff,
            )
            for _ in gen:
                pass
            s = gen.stats
            return PathRun(
                list(gen.token_ids), s.seconds, s.target_forwards, list(s.accepted_per_round), s.draft_tokens, s.fallback_rounds,
                s.paused_rounds, s.draft_seconds, s.verify_seconds, cached_prompt_tokens=s.cached_prompt_tokens, ttft=s.ttft,
            )

        return run

    def peer(p: Peer) -> Runner:
        def run(prompt: list[int], max_new_tokens: int, seed: int) -> PathRun:
            ids, seconds = p.generate(prompt, max_new_tokens, config.temperature, seed)
            return PathRun(ids, seconds)

        return run

    paths = {AR: ours(None), SPEC: ours(drafter)}
    named = [(p.name, peer(p)) for p in peers] + [(name, ours(d)) for name, d in variants.items()]
    for name, run in named:
        if name in paths:
            raise ValueError(f"path name {name!r} is taken")
        paths[name] = run
    return paths, caches


def _running(records: list[TurnRecord]) -> dict[str, str]:
    """Progress-bar figures so far: tau and speedup of the speculative path."""
    spec = [r.runs[SPEC] for r in records]
    tokens, forwards = sum(r.new_tokens for r in spec), sum(r.target_forwards for r in spec)
    ar_s, spec_s = sum(r.runs[AR].seconds for r in records), sum(r.seconds for r in spec)
    ar_tokens = sum(r.runs[AR].new_tokens for r in records)
    speedup = (tokens / spec_s) / (ar_tokens / ar_s) if spec_s and ar_s and ar_tokens else 0.0
    return {"tau": f"{tokens / forwards:.2f}" if forwards else "-", "speedup": f"{speedup:.2f}x"}
