"""`specdec train extract|prompts|regenerate|vocab|shrink|fit|evaluate|agreement`: the training pipeline's commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from specdec import options
from specdec.config import ConfigError


def default_cache_root() -> Path:
    """Where features and checkpoints go by default (outside the repository)."""
    from specdec.target import converted_cache_dir

    return converted_cache_dir().parent.parent / "train"


def _print(result: dict, json_out: str | None = None) -> int:
    """Print the result; also write it to `json_out` when given."""
    text = json.dumps(result, indent=2)
    if json_out:
        Path(json_out).write_text(text)
    print(text)
    return 0


def _extract(sub) -> None:
    p = sub.add_parser("extract", help="store token ids, assistant masks and target features of conversations")
    p.add_argument("--data", required=True, help="conversations JSONL (OpenAI messages format)")
    p.add_argument("--out", required=True, help="feature cache folder (created; rerun to continue)")
    p.add_argument("--limit", type=int, default=None, help="use the first N valid conversations")
    p.add_argument("--max-len", type=int, default=768, help="truncate conversations to this many tokens")
    p.add_argument("--shard-size", type=int, default=64, help="conversations per shard (the unit of resuming)")
    options.add_model_args(p)

    def run(args: argparse.Namespace) -> int:
        from specdec.train.extract import extract

        return _print(extract(options.load_runner(args), args.data, args.out, args.limit, args.max_len, args.shard_size))

    p.set_defaults(train_handler=run)


def _regenerate(sub) -> None:
    p = sub.add_parser("regenerate", help="answer the training prompts with the target and store its features")
    p.add_argument("--data", required=True, help="conversations JSONL (the prompt is everything before the first reply) or bare prompts (train prompts)")
    p.add_argument("--out", required=True, help="feature cache folder (created; rerun to continue)")
    p.add_argument("--limit", type=int, default=None, help="use the first N valid conversations")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit")
    p.add_argument("--max-prompt", type=int, default=512, help="skip (and count) longer prompts")
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="prompts answered together (on the CPU: sequences stepped together, at most the C++ decoder stack's 16 rows)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy answers, else sampled")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--shard-size", type=int, default=64, help="conversations per shard (the unit of resuming)")
    options.add_model_args(p)

    def run(args: argparse.Namespace) -> int:
        from specdec.train.regenerate import regenerate

        runner = options.load_runner(args)
        return _print(
            regenerate(
                runner, args.data, args.out, args.limit, args.max_new_tokens, args.max_prompt,
                args.batch_size, args.temperature, args.seed, args.shard_size,
            )
        )

    p.set_defaults(train_handler=run)


def _prompts(sub) -> None:
    p = sub.add_parser("prompts", help="let the target write user prompts itself (Magpie), for regenerate")
    p.add_argument("--out", required=True, help="prompts JSONL (rerun to continue; feed it to regenerate --data)")
    p.add_argument("--batches", type=int, default=64, help="batches to sample in all")
    p.add_argument("--batch-size", type=int, default=32, help="prompts sampled together")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest prompt; longer samples are dropped")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    options.add_model_args(p)

    def run(args: argparse.Namespace) -> int:
        from specdec.train.prompts import write_prompts

        return _print(
            write_prompts(options.load_runner(args), args.out, args.batches, args.batch_size, args.max_new_tokens, args.temperature, args.seed)
        )

    p.set_defaults(train_handler=run)


def _load_caches(runner, caches: list[str]):
    from specdec.train.cache import load_sequences

    return [s for c in caches for s in load_sequences(c, runner)]


def _count_data(runner, paths: list[str]):
    """Assistant-token counts [vocab] of conversations JSONL files (tokenized only, no features)."""
    import torch
    from tqdm import tqdm

    from specdec.train.data import read_conversations
    from specdec.train.extract import tokenize_chat

    counts = torch.zeros(runner.vocab_size, dtype=torch.int64)
    for path in paths:
        conversations, report = read_conversations(path)
        report.warn(path)
        for messages in tqdm(conversations, desc=f"count {Path(path).name}", unit="conv"):
            ids, mask = tokenize_chat(runner.tokenizer, messages)
            counts += torch.bincount(torch.tensor(ids)[torch.tensor(mask)], minlength=runner.vocab_size)
    return counts


def _vocab_sources(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", action="append", required=True, help="feature cache folder (repeatable)")
    p.add_argument("--size", type=int, default=8192, help="draft vocabulary size")
    p.add_argument("--data", action="append", default=[], help="also count assistant tokens of these conversations JSONL (tokenized only)")


def _vocab(sub) -> None:
    p = sub.add_parser("vocab", help="choose the draft vocabulary (most frequent assistant tokens) and write d2t")
    _vocab_sources(p)
    p.add_argument("--out", default=None, help="vocab file (default: CACHE/vocab.safetensors of the first cache)")
    options.add_model_args(p)

    def run(args: argparse.Namespace) -> int:
        from specdec.train.cache import VOCAB_FILE, target_fingerprint
        from specdec.train.vocab import choose_vocab, save_vocab

        runner = options.load_runner(args)
        sequences = _load_caches(runner, args.cache)
        extra = _count_data(runner, args.data)
        d2t, coverage = choose_vocab(sequences, args.size, runner.vocab_size, runner.eos_token_ids, extra)
        out = args.out or str(Path(args.cache[0]) / VOCAB_FILE)
        save_vocab(out, d2t, target_fingerprint(runner), coverage)
        tokens = sum(int(s.mask.sum()) for s in sequences)
        return _print({"vocab": out, "size": args.size, "assistant_tokens": tokens, "coverage": round(coverage, 4)})

    p.set_defaults(train_handler=run)


def _shrink(sub) -> None:
    p = sub.add_parser(
        "shrink",
        help="copy a trained head with a smaller draft vocabulary: the --size most frequent of its own tokens",
        description="A trained head keeps its weights with fewer draft tokens (its draft LM head is rows of the "
        "target's frozen one), and each drafting step's LM head gets cheaper in proportion. Tokens are ranked by "
        "how often they occur among the assistant tokens of --cache (and --data); the head's end-of-sequence "
        "token is always kept.",
    )
    p.add_argument("--head", required=True, help="trained head directory")
    _vocab_sources(p)
    p.add_argument("--out", required=True, help="directory for the copy (may be --head itself)")
    options.add_model_args(p)

    def run(args: argparse.Namespace) -> int:
        from specdec.drafter import load_head
        from specdec.train.vocab import choose_vocab

        runner = options.load_runner(args)
        head = load_head(runner, args.head)
        sequences = _load_caches(runner, args.cache)
        extra = _count_data(runner, args.data)
        own = head.d2t.cpu()
        _, before = choose_vocab(sequences, own.numel(), runner.vocab_size, extra=extra, candidates=own)
        d2t, after = choose_vocab(sequences, args.size, runner.vocab_size, runner.eos_token_ids, extra, candidates=own)
        head.with_draft_vocab(d2t).save(args.out)
        return _print(
            {"head": args.out, "size": args.size, "was": own.numel(), "coverage": round(after, 4), "coverage_before": round(before, 4)}
        )

    p.set_defaults(train_handler=run)


def _fit(sub) -> None:
    from specdec.train.fit import FitConfig

    d = FitConfig()
    p = sub.add_parser("fit", help="distil a draft head from cached features (resumes from --out)")
    p.add_argument("--cache", action="append", required=True, help="feature cache folder (repeatable)")
    p.add_argument("--vocab", default=None, help="vocab file (default: CACHE/vocab.safetensors of the first cache)")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl and the exported head/")
    p.add_argument("--variant", choices=["fspad", "eagle2"], default="fspad", help="head variant")
    p.add_argument("--no-feature-sampling", action="store_true", help="FSPAD ablation: plain linear fusion")
    p.add_argument("--no-partial-alignment", action="store_true", help="FSPAD ablation: one output for both losses")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps in the whole run")
    p.add_argument("--tokens-per-step", type=int, default=d.tokens_per_step, help="tokens per batch")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps")
    p.add_argument("--noise", type=float, default=d.noise, help="half-width of the uniform noise on input features")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of init, batch order and noise")
    p.add_argument(
        "--unroll",
        type=int,
        default=d.unroll,
        help="training-time test steps: the head also learns from its own predicted features for K-1 more steps (1 = off)",
    )
    p.add_argument(
        "--init-head",
        default="",
        help="start from this saved head (same variant; --vocab may differ) instead of a random one, e.g. to train it on new data",
    )
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many steps (after one warm-up step) into OUT/profile.txt: ops by self CPU and CUDA time",
    )
    options.add_model_args(p)

    def run(args: argparse.Namespace) -> int:
        from specdec.train.cache import VOCAB_FILE, target_fingerprint
        from specdec.train.fit import epochs, fit
        from specdec.train.vocab import load_vocab

        if args.variant == "eagle2" and (args.no_feature_sampling or args.no_partial_alignment):
            raise ConfigError("the ablation switches apply to --variant fspad")
        if args.unroll < 1:
            raise ConfigError(f"--unroll must be at least 1, got {args.unroll}")
        runner = options.load_runner(args)
        sequences = _load_caches(runner, args.cache)
        d2t = load_vocab(args.vocab or Path(args.cache[0]) / VOCAB_FILE, target_fingerprint(runner), runner.vocab_size)
        on = args.variant == "fspad"
        cfg = FitConfig(
            variant=args.variant,
            feature_sampling=on and not args.no_feature_sampling,
            partial_alignment=on and not args.no_partial_alignment,
            steps=args.steps,
            tokens_per_step=args.tokens_per_step,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            noise=args.noise,
            seed=args.seed,
            unroll=args.unroll,
            data=",".join(str(Path(c).resolve()) for c in args.cache),
            init=str(Path(args.init_head).resolve()) if args.init_head else "",
        )
        result = fit(runner, sequences, d2t, cfg, args.out, args.checkpoint_every, profile_steps=args.profile_steps)
        return _print({**result, "epochs": round(epochs(cfg, sequences), 2), "head": str(Path(args.out) / "head")})

    p.set_defaults(train_handler=run)


def _evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="tau of a head on Spec-Bench-format questions (overall, per category, by depth)")
    p.add_argument("--head", required=True, help="head directory, or 'random'")
    options.add_question_args(p, "every turn is answered, each seeing the earlier answers")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per turn at most")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", default=None, help="write the result here; finished questions go to OUT.progress.jsonl (resumable)")
    options.add_model_args(p)
    options.add_tree_args(p)

    def run(args: argparse.Namespace) -> int:
        from specdec.drafter import load_head_drafter
        from specdec.train.data import select_questions
        from specdec.train.evaluate import evaluate

        questions, report = select_questions(args.questions, args.limit, args.per_category)
        runner = options.load_runner(args)
        drafter = load_head_drafter(runner, args.head, options.tree_from_args(args))
        progress = f"{args.json}.progress.jsonl" if args.json else None
        result = {"head": args.head, "skipped_lines": len(report.skipped)}
        result.update(evaluate(runner, drafter, questions, args.temperature, args.max_new_tokens, args.seed, progress))
        return _print(result, args.json)

    p.set_defaults(train_handler=run)


def _agreement(sub) -> None:
    p = sub.add_parser("agreement", help="teacher-forced top-1/top-k agreement of a head with the target's greedy answers")
    p.add_argument("--head", required=True, help="head directory")
    options.add_question_args(p, "the first turn of each is answered")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length per question")
    p.add_argument("--top-k", type=int, default=6, help="drafts per position that count as a hit")
    p.add_argument("--json", default=None, help="also write the result here")
    options.add_model_args(p)

    def run(args: argparse.Namespace) -> int:
        from specdec.drafter import load_head
        from specdec.train.agreement import agreement
        from specdec.train.data import select_questions

        questions, report = select_questions(args.questions, args.limit, args.per_category)
        runner = options.load_runner(args)
        head = load_head(runner, args.head).eval()
        result = {"head": args.head, "skipped_lines": len(report.skipped)}
        result.update(agreement(runner, head, questions, args.max_new_tokens, args.top_k))
        return _print(result, args.json)

    p.set_defaults(train_handler=run)


def _lookup_stats(sub) -> None:
    p = sub.add_parser(
        "lookup-stats", help="acceptance of lookup chains by suffix-match length, on the target's own answers (calibrates specdec.lookup)"
    )
    p.add_argument("--data", required=True, help="conversations JSONL whose first replies are the target's own answers (regenerate's texts)")
    p.add_argument("--limit", type=int, default=None, help="use the first N valid conversations")
    p.add_argument("--chain", type=int, default=8, help="chain length to score")
    p.add_argument("--json", default=None, help="also write the result here")
    options.add_model_args(p)

    def run(args: argparse.Namespace) -> int:
        from specdec.train.data import read_conversations
        from specdec.train.lookup_stats import chain_stats, conversation_pairs, summarize

        if args.chain < 1:
            raise ConfigError(f"--chain must be >= 1, got {args.chain}")
        conversations, report = read_conversations(args.data, args.limit)
        if report.skipped:
            print(f"skipped {len(report.skipped)} malformed lines of {args.data}", file=sys.stderr)
        runner = options.load_runner(args)
        stats = chain_stats(conversation_pairs(runner, conversations, progress=True), args.chain)
        return _print({"conversations": len(conversations), "skipped_lines": len(report.skipped), "by_match": summarize(stats)}, args.json)

    p.set_defaults(train_handler=run)


SUBCOMMANDS: list[Callable] = [_extract, _prompts, _regenerate, _vocab, _shrink, _fit, _evaluate, _agreement, _lookup_stats]


def train_parser(sub) -> Callable[[argparse.Namespace], int]:
    """Register `specdec train` and its subcommands on the top-level subparsers."""
    p = sub.add_parser("train", help="distil draft heads: extract, prompts, regenerate, vocab, fit, evaluate, agreement, lookup-stats")
    steps = p.add_subparsers(dest="train_command", required=True)
    for make in SUBCOMMANDS:
        make(steps)

    def run(args: argparse.Namespace) -> int:
        return args.train_handler(args)

    return run
