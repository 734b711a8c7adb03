"""The `specdec` command line: generate (plus subcommands registered by train/ and bench)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from specdec import options
from specdec.bench.cli import bench_parser
from specdec.bench.costs import costs_parser
from specdec.bench.fidelity import fidelity_parser
from specdec.config import ConfigError, SamplingParams, StopConfig
from specdec.train.cli import train_parser


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
    options.add_model_args(p)
    options.add_tree_args(p)
    options.add_backoff_args(p)
    return run_generate


def run_generate(args: argparse.Namespace) -> int:
    from specdec.drafter import load_head_drafter
    from specdec.generate import Generation

    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k_sampling, seed=args.seed)
    stop = StopConfig(max_new_tokens=args.max_new_tokens, stop_strings=tuple(args.stop))
    tree, backoff = options.tree_from_args(args), options.backoff_from_args(args)
    runner = options.load_runner(args)
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
