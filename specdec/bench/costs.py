"""`specdec costs`: this machine's cost curve, to choose the draft tree from.

A speculative round costs one proposal plus one target forward over the tree, and yields tau
tokens; plain decoding yields one token per one-node forward. On a GPU a forward of 60 nodes
costs about what one node does; on a CPU it grows with the node count, and the proposal's cost
grows with the tree's depth and width. This command measures both (median of repeats, after a
prefill of `context` tokens) so that a tree is picked by measured cost, not by the GPU recipe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from specdec import options
from specdec.config import ConfigError, TreeConfig
from specdec.drafter import HeadDrafter
from specdec.target import TargetRunner
from specdec.tree import DraftTree


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first calls allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def forward_costs(runner: TargetRunner, sizes: Sequence[int], context: int, repeats: int, greedy: bool) -> dict[int, float]:
    """Median ms of one target forward over a tree of n nodes (a chain: the mask differs, the
    work does not), after a prefill of `context` tokens; the tree is dropped after each run.
    greedy: the forward plus the greedy tokens of every row (what a greedy round pays), else the
    forward with every row's logits (what a sampled round pays)."""
    state = runner.new_state(context + max(sizes) + 8)
    runner.prefill(state, [(7 * i) % runner.vocab_size for i in range(context)])
    out = {}
    for n in tqdm(sizes, desc="target forward" + (" (greedy)" if greedy else " (logits)"), unit="size"):
        tree = DraftTree(tokens=[(11 * i + 5) % runner.vocab_size for i in range(n)], parents=[-1] + list(range(n - 1)))

        def verify() -> None:
            _, features = runner.forward_tree(state, tree, logits=not greedy)
            if greedy:
                runner.greedy_tokens(features)
            runner.commit(state, [])  # keep nothing: the context length stays fixed across repeats

        out[n] = _median_ms(verify, repeats)
    return out


def propose_costs(
    runner: TargetRunner, drafter: HeadDrafter, shapes: Sequence[TreeConfig], context: int, repeats: int
) -> dict[str, float]:
    """Median ms of one proposal for each tree shape, with `context` committed tokens."""
    ids = [(7 * i) % runner.vocab_size for i in range(context + 1)]
    state = runner.new_state(context + 8)
    features, _ = runner.prefill(state, ids[:-1])
    out = {}
    for shape in tqdm(shapes, desc="draft proposal", unit="shape"):
        session = HeadDrafter(drafter.head, shape).open(ids, features)
        out[shape_name(shape)] = _median_ms(session.propose, repeats)
        session.close()
    return out


def shape_name(tree: TreeConfig) -> str:
    return f"k{tree.top_k}-d{tree.depth}-n{tree.total_tokens}"


def parse_shape(text: str) -> TreeConfig:
    """'K:D:N' (top-k, depth, total tokens) to a tree config that expands and verifies the whole
    shape (min_prob 0, no lookup chains): a shape's cost must not depend on how confident the
    head is or on whether the text repeats."""
    try:
        k, d, n = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"tree shape {text!r} is not K:D:N (top-k, depth, total tokens)") from None
    return TreeConfig(top_k=k, depth=d, total_tokens=n, min_prob=0.0, lookup_tokens=0)


def costs_parser(sub) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "costs",
        help="this machine's cost curve: target forward ms by tree size (greedy and sampled), proposal ms by tree shape",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--sizes", default="1,2,3,4,5,6,8,12,16,24,32", help="tree sizes (nodes) of the target forward, comma list")
    default = TreeConfig()
    p.add_argument(
        "--shapes",
        default=f"{default.top_k}:{default.depth}:{default.total_tokens},4:3:8,6:3:12,6:4:16,6:5:16,8:5:24,10:6:60",
        help="draft tree shapes K:D:N, comma list (default: the default tree's first, then larger ones)",
    )
    p.add_argument("--context", type=int, default=256, help="committed tokens before each measured call")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per point (the median is reported)")
    p.add_argument("--head", default=None, help="draft head directory, or 'random' (default: the shipped FSPAD head)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the curve here")
    options.add_model_args(p)
    return run_costs


def run_costs(args: argparse.Namespace) -> int:
    from specdec.bench.summary import machine_info
    from specdec.drafter import load_head_drafter

    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        raise ConfigError(f"--sizes must be a comma list of integers, got {args.sizes!r}") from None
    shapes = [parse_shape(s.strip()) for s in args.shapes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--sizes must be positive integers, got {args.sizes!r}")
    if args.context < 1 or args.repeats < 1:
        raise ConfigError("--context and --repeats must be at least 1")
    runner = options.load_runner(args)
    if args.context + max(sizes) > runner.max_length:
        raise ConfigError(f"--context plus the largest size exceeds the model's {runner.max_length} positions")
    drafter = load_head_drafter(runner, args.head, shapes[0] if shapes else TreeConfig())
    with torch.inference_mode():
        forward = forward_costs(runner, sizes, args.context, args.repeats, greedy=True)
        with_logits = forward_costs(runner, sizes, args.context, args.repeats, greedy=False)
        propose = propose_costs(runner, drafter, shapes, args.context, args.repeats)
    result = {
        "forward_ms": forward,  # greedy rounds: forward + greedy tokens
        "forward_logits_ms": with_logits,  # sampled rounds: forward + every row's logits
        "propose_ms": propose,
        "config": {"context": args.context, "repeats": args.repeats, "head": args.head or "default", "model": runner.name},
        "machine": machine_info(runner),
    }
    print(f"| tree nodes | greedy forward ms | x {sizes[0]}-node | with logits (sampling) ms | x {sizes[0]}-node |\n|---|---|---|---|---|")
    for n, ms in forward.items():
        print(f"| {n} | {ms:.1f} | {ms / forward[sizes[0]]:.2f} | {with_logits[n]:.1f} | {with_logits[n] / with_logits[sizes[0]]:.2f} |")
    if propose:
        print("\n| draft shape | proposal ms |\n|---|---|")
        for name, ms in propose.items():
            print(f"| {name} | {ms:.1f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
