"""The `specdec` command line: generate (plus subcommands registered by train/ and bench)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch

from specdec.backoff import BackoffConfig
from specdec.config import ACTIVATIONS, ConfigError, SamplingParams, StopConfig, TreeConfig

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


def load_runner(args: argparse.Namespace):
    from specdec.target import TargetRunner

    if args.threads:
        torch.set_num_threads(args.threads)
    return TargetRunner.load(args.model, DTYPES[args.dtype], args.device, args.activations)


def _generate_parser(sub) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("generate", help="generate text for one prompt (speculative or plain)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--mode", choices=["spec", "ar"], default="spec", help="speculative or plain autoregressive")
    p.add_argument("--head", default=None, help="draft head directory, or 'random' (default: the shipped FSPAD head)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k-sampling", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_model_args(p)
    add_tree_args(p)
    add_backoff_args(p)
    return run_generate


def run_generate(args: argparse.Namespace) -> int:
    from specdec.drafter import load_head_drafter
    from specdec.generate import Generation

    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k_sampling, seed=args.seed)
    stop = StopConfig(max_new_tokens=args.max_new_tokens, stop_strings=tuple(args.stop))
    tree, backoff = tree_from_args(args), backoff_from_args(args)
    runner = load_runner(args)
    drafter = load_head_drafter(runner, args.head, tree) if args.mode == "spec" else None
    gen = Generation(runner, runner.encode(args.prompt, args.chat), sampling, stop, drafter, backoff=backoff)
    finish = None
    for chunk in gen:
        finish = chunk.finish_reason
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    s = gen.stats
    if args.json:
        print(
            json.dumps(
                {
                    "text": gen.text,
                    "token_ids": gen.token_ids,
                    "new_tokens": s.new_tokens,
                    "prompt_tokens": s.prompt_tokens,
                    "target_forwards": s.target_forwards,
                    "tau": s.tau,
                    "accepted_per_round": s.accepted_per_round,
                    "paused_rounds": s.paused_rounds,
                    "seconds": s.seconds,
                    "ttft": s.ttft,
                    "tokens_per_s": s.tokens_per_s,
                    "finish_reason": finish,
                    "mode": args.mode,
                }
            )
        )
    else:
        print(f"\n[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tokens/s, tau {s.tau:.2f}, {finish}]", file=sys.stderr)
    return 0


from specdec.train.cli import train_parser  # noqa: E402 (a light module; its imports are lazy)
from specdec.bench.cli import bench_parser  # noqa: E402 (its imports are lazy too)
from specdec.bench.costs import costs_parser  # noqa: E402
from specdec.bench.fidelity import fidelity_parser  # noqa: E402
COMMANDS = [_generate_parser, train_parser, bench_parser, costs_parser, fidelity_parser]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(prog="specdec", description="Lossless speculative decoding (FSPAD / EAGLE-2).")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = {}
    for make in COMMANDS:
        handler = make(sub)
        handlers[list(sub.choices)[-1]] = handler
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"specdec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
