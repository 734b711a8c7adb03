"""`specdec bench`: load the target, the draft head and the peers, run the harness, print and save."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from specdec import options
from specdec.config import DEFAULT_PREFIX_CACHE_TOKENS, ConfigError

HEAD_ALONE = "head"  # the --peers name of our speculative path without lookup drafting


def bench_parser(sub) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "bench",
        help="Spec-Bench speed: plain vs speculative (and peers) on the same runner",
        description="Decode Spec-Bench questions with the plain and the speculative path alternately "
        "(and Hugging Face peers when asked); print tau, tokens/s and speedup per category. "
        "Exits 1 if greedy speculative output differs from plain output anywhere but at a near-tie.",
    )
    options.add_question_args(p, "every turn is answered")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per turn at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; sampled runs compare our paths at the same seed")
    p.add_argument("--seed", type=int, default=0, help="base sampling seed (turn i uses seed + i)")
    p.add_argument("--head", default=None, help="draft head directory, or 'random' (default: the shipped FSPAD head)")
    p.add_argument(
        "--peers",
        default="",
        help="comma list of paths beside ours on the same model: hf (Hugging Face generate), pld (its prompt lookup), "
        "head (our speculative path with lookup drafting off: the head alone)",
    )
    p.add_argument("--pld-tokens", type=int, default=10, help="draft tokens per prompt-lookup step (pld peer)")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens of the untimed warm-up per path (0 = none)")
    p.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=DEFAULT_PREFIX_CACHE_TOKENS,
        help="tokens of finished turns each of our paths keeps for reuse by a later prompt (its own next turn); 0 = off",
    )
    p.add_argument("--near-tie", type=float, default=1e-4, help="top-2 logit margin below which a mismatch is a float near-tie")
    p.add_argument(
        "--concurrency",
        default=None,
        metavar="LEVELS",
        help="comma list of concurrent users, e.g. 1,2,4,8: measure batched serving instead (first turns, closed loop, "
        "plain batched decoding against load-adaptive speculation; tokens/s and latency percentiles per level)",
    )
    p.add_argument("--full-trees", action="store_true", help="with --concurrency: also run speculation with full trees every round")
    p.add_argument("--prefill-chunk", type=int, default=128, help="with --concurrency: most prompt tokens prefilled per round (0 = whole)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result JSON here")
    p.add_argument("--report", default=None, metavar="DIR", help="write report.md and PNG plots here")
    options.add_model_args(p)
    options.add_tree_args(p)
    options.add_backoff_args(p)
    return run_bench_command


def run_bench_command(args: argparse.Namespace) -> int:
    from specdec.bench.harness import BenchConfig, run_bench
    from specdec.bench.peers import PEER_NAMES, make_peers
    from specdec.bench.report import markdown_table, write_report
    from specdec.bench.summary import machine_info, summarize
    from specdec.drafter import load_head_drafter
    from specdec.train.data import select_questions

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    questions, _ = select_questions(args.questions, args.limit, args.per_category)
    if not questions:
        raise ConfigError(f"no valid questions in {args.questions}")
    if args.prefix_cache_tokens < 0:
        raise ConfigError(f"--prefix-cache-tokens must be >= 0, got {args.prefix_cache_tokens}")
    config = BenchConfig(
        args.max_new_tokens, args.temperature, args.seed, args.warmup_tokens, args.near_tie, args.prefix_cache_tokens,
        options.backoff_from_args(args),
    )
    tree = options.tree_from_args(args)
    peer_names = list(dict.fromkeys(n.strip() for n in args.peers.split(",") if n.strip()))
    unknown = [n for n in peer_names if n not in (*PEER_NAMES, HEAD_ALONE)]
    if unknown:
        raise ConfigError(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join((*PEER_NAMES, HEAD_ALONE))}")
    runner = options.load_runner(args)
    drafter = load_head_drafter(runner, args.head, tree)
    if args.concurrency is not None:
        return _run_concurrency(args, runner, drafter, questions, tree)
    variants = {}
    if HEAD_ALONE in peer_names:
        if not tree.lookup_tokens:
            raise ConfigError("the head peer is the speculative path without lookup drafting; --lookup-tokens is already 0")
        variants[HEAD_ALONE] = load_head_drafter(runner, args.head, replace(tree, lookup_tokens=0))
    peers = make_peers(runner, [n for n in peer_names if n != HEAD_ALONE], args.pld_tokens)
    records = run_bench(runner, drafter, questions, config, peers, progress=True, variants=variants)
    settings = {
        **asdict(config),
        "questions_file": str(args.questions),
        "questions": len(questions),
        "limit": args.limit,
        "per_category": args.per_category,
        "model": runner.name,
        "head": args.head or "default",
        "tree": asdict(tree),
        "peers": peer_names,
        "pld_tokens": args.pld_tokens,
    }
    result = summarize(records, config.greedy, settings, machine_info(runner))
    print(markdown_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.report:
        for path in write_report(result, args.report):
            print(f"wrote {path}", file=sys.stderr)
    for m in result["mismatches"]:
        kind = "near-tie" if m["near_tie"] else "MISMATCH"
        print(
            f"{kind}: question {m['question_id']} turn {m['turn']} {m['path']} position {m['position']}: "
            f"AR {m['ar_token']} vs {m['token']} (top-2 margin {m['margin']:.3g})",
            file=sys.stderr,
        )
    overall = result["overall"]
    ours = [overall["greedy_mismatches"], overall["sampled_mismatches"]] + [overall["peers"][name]["mismatches_vs_ar"] for name in variants]
    return 1 if any(ours) else 0


def _run_concurrency(args: argparse.Namespace, runner, drafter, questions, tree) -> int:
    from specdec.bench.concurrency import markdown, run_concurrency
    from specdec.bench.summary import machine_info

    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--concurrency takes a comma list of user counts, got {args.concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise ConfigError(f"--concurrency needs user counts >= 1, got {args.concurrency!r}")
    if args.prefill_chunk < 0:
        raise ConfigError(f"--prefill-chunk must be >= 0, got {args.prefill_chunk}")
    result = run_concurrency(
        runner, drafter, questions, levels, args.max_new_tokens, args.temperature, args.seed, args.prefill_chunk, args.full_trees
    )
    result["settings"] = {
        "questions_file": str(args.questions), "questions": len(questions), "levels": levels, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "seed": args.seed, "prefill_chunk": args.prefill_chunk, "model": runner.name,
        "head": args.head or "default", "tree": asdict(tree),
    }
    result["machine"] = machine_info(runner)
    print(markdown(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if any(r["mismatches"] for r in result["rows"]) else 0
