"""Options shared by the command lines (`specdec` and its bench and train commands) and the
services: target dtypes, model / tree / back-off / question flags and what they build.

The sub-CLIs import this module rather than `specdec.cli`, which imports them."""

from __future__ import annotations

import argparse

import torch

from specdec.backoff import BackoffConfig
from specdec.bench.data import DEV_QUESTIONS
from specdec.config import ACTIVATIONS, TreeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads the target."""
    parser.add_argument("--model", default=None, help="Llama-family model directory (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="target weights dtype")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--activations",
        choices=ACTIVATIONS,
        default="float32",
        help="inputs of the default target's 4-bit products: float32 (the float32 model's numbers) or int8 "
        "(as llama.cpp runs a GGUF: faster, numbers change slightly; speculative output still equals plain)",
    )


def load_runner(args: argparse.Namespace):
    """The target named by `add_model_args`' options."""
    from specdec.target import TargetRunner

    if args.threads:
        torch.set_num_threads(args.threads)
    return TargetRunner.load(args.model, DTYPES[args.dtype], args.device, args.activations)


def add_tree_args(parser: argparse.ArgumentParser) -> None:
    defaults = TreeConfig()
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="children expanded per draft node")
    parser.add_argument("--depth", type=int, default=defaults.depth, help="draft tree depth")
    parser.add_argument("--total-tokens", type=int, default=defaults.total_tokens, help="tree nodes verified per round, root included")
    parser.add_argument(
        "--min-prob", type=float, default=defaults.min_prob, help="verify only draft nodes whose cumulative draft probability is at least this"
    )
    parser.add_argument(
        "--lookup-tokens",
        type=int,
        default=defaults.lookup_tokens,
        help="longest chain of tokens that followed an earlier occurrence of the current suffix to add to each tree (0 = off)",
    )
    parser.add_argument(
        "--lookup-alone",
        type=float,
        default=defaults.lookup_alone,
        help="propose a lookup chain whose first token is at least this likely without running the draft head (1 = never)",
    )
    parser.add_argument(
        "--head-context",
        type=int,
        default=defaults.head_context,
        help="prompt tokens the draft head reads when a generation starts: the last N (0 = all)",
    )


def tree_from_args(args: argparse.Namespace) -> TreeConfig:
    return TreeConfig.from_attributes(args)


def add_backoff_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backoff-below",
        type=float,
        default=BackoffConfig().break_even,
        help="sampled requests: decode plainly for a while when the last speculative rounds accepted fewer drafts than "
        "this on average (0 = always speculate; see specdec/backoff.py)",
    )


def backoff_from_args(args: argparse.Namespace) -> BackoffConfig:
    return BackoffConfig(break_even=args.backoff_below)


def add_question_args(parser: argparse.ArgumentParser, used: str) -> None:
    """Which Spec-Bench-format questions a command runs over (see `select_questions`); `used`
    says which turns of them it answers."""
    parser.add_argument(
        "--questions",
        default=str(DEV_QUESTIONS),
        help=f"Spec-Bench-format JSONL (question_id, category, turns); {used} "
        "(default: the 90 dev questions shipped in benchmarks/data/spec_bench_dev.jsonl)",
    )
    parser.add_argument("--limit", type=int, default=None, help="use the first N valid questions")
    parser.add_argument("--per-category", type=int, default=None, help="use only the first N questions of each category")
