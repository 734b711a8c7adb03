"""`specdec fidelity`: how much int8 activations change the default target's greedy answers.

Speculative decoding is lossless against the runner it verifies with, so choosing int8
activations (llama.cpp's way of running a GGUF, faster here) is choosing a slightly different
model. This measures how different: a float32-activation runner and an int8 one answer each
question's first turn greedily; the command reports how many answers are identical, where the
others first part, and the float32 model's top-2 logit margin there (a small margin means the
two disagreed on a near-tie, where any change of summation order may flip the choice).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from specdec import options
from specdec.config import ConfigError, SamplingParams, StopConfig

if TYPE_CHECKING:  # the command line imports this module; the model loads lazily
    from specdec.target import TargetRunner
    from specdec.train.data import Question


def greedy_answer(runner: "TargetRunner", prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    from specdec.generate import Generation

    gen = Generation(runner, prompt, SamplingParams(), StopConfig(max_new_tokens=max_new_tokens))
    for _ in gen:
        pass
    return list(gen.token_ids)


def compare_runners(
    reference: "TargetRunner", other: "TargetRunner", questions: Sequence["Question"], max_new_tokens: int, progress: bool = False
) -> dict:
    """Greedy first-turn answers of both runners, question by question, and their summary."""
    from tqdm import tqdm

    from specdec.bench.harness import find_divergence

    rows = []
    for q in tqdm(questions, desc="fidelity", unit="question", disable=not progress):
        prompt = reference.encode_messages([{"role": "user", "content": q.turns[0]}])
        ref, ids = greedy_answer(reference, prompt, max_new_tokens), greedy_answer(other, prompt, max_new_tokens)
        div = find_divergence(reference, prompt, ref, ids, near_tie=0.0)
        rows.append(
            {
                "question_id": q.question_id,
                "category": q.category,
                "tokens": len(ref),
                "identical": div is None,
                "first_difference": None if div is None else div.position,
                "margin": None if div is None else div.margin,
            }
        )
    parted = [r for r in rows if not r["identical"]]
    return {
        "questions": len(rows),
        "identical": len(rows) - len(parted),
        "reference_tokens": sum(r["tokens"] for r in rows),
        "tokens_before_first_difference": sum(r["tokens"] if r["identical"] else r["first_difference"] for r in rows),
        "median_first_difference": statistics.median(r["first_difference"] for r in parted) if parted else None,
        "median_margin_at_difference": statistics.median(r["margin"] for r in parted) if parted else None,
        "per_question": rows,
    }


def fidelity_parser(sub) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "fidelity",
        help="how much --activations int8 changes the default target's greedy answers",
        description=__doc__.split("\n\n")[1],
    )
    options.add_question_args(p, "the first turn of each is answered")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result JSON here")
    options.add_model_args(p)
    p.set_defaults(activations="int8")
    return run_fidelity


def run_fidelity(args: argparse.Namespace) -> int:
    from specdec.target import TargetRunner
    from specdec.train.data import select_questions

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.activations == "float32":
        raise ConfigError("--activations float32 would compare the float32 runner with itself: pass int8")
    questions, _ = select_questions(args.questions, args.limit, args.per_category)
    if not questions:
        raise ConfigError(f"no valid questions in {args.questions}")
    other = options.load_runner(args)
    reference = TargetRunner.load(args.model, other.dtype, args.device, "float32")
    result = compare_runners(reference, other, questions, args.max_new_tokens, progress=True)
    result["config"] = {"questions_file": str(args.questions), "max_new_tokens": args.max_new_tokens, "activations": args.activations}
    n = result["questions"]
    print("| questions | identical answers | tokens before the first difference | median first difference | median top-2 margin there |")
    print("|---|---|---|---|---|")
    median_pos, median_margin = result["median_first_difference"], result["median_margin_at_difference"]
    print(
        f"| {n} | {result['identical']} ({result['identical'] / n:.0%}) "
        f"| {result['tokens_before_first_difference']} of {result['reference_tokens']} "
        f"| {'-' if median_pos is None else median_pos} | {'-' if median_margin is None else f'{median_margin:.3g}'} |"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
