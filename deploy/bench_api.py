"""Speed and acceptance through the HTTP API: greedy chat completions for Spec-Bench questions,
one at a time; prints per-request figures and a JSON summary (tokens/s and tau as the server
measured them, plus wall-clock tokens/s).

    python deploy/bench_api.py --base http://127.0.0.1:8000 -n 5
"""

from __future__ import annotations

import argparse
import json
import os
import time

import httpx

from specdec.bench.data import DEV_QUESTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="http://127.0.0.1:8000", help="verifier base URL")
    parser.add_argument(
        "--questions",
        default=str(DEV_QUESTIONS),
        help="Spec-Bench style JSONL, the first turn of each question is sent (default: benchmarks/data/spec_bench_dev.jsonl)",
    )
    parser.add_argument("-n", type=int, default=5, help="questions to send (the first n)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    key = os.environ.get("SPECDEC_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with open(args.questions) as f:
        questions = [json.loads(line)["turns"][0] for line in f if line.strip()][: args.n]
    wait_ready(args.base, timeout=300)
    tokens = forwards = 0
    seconds = wall = 0.0
    for question in questions:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": args.max_tokens, "temperature": 0}
        start = time.perf_counter()
        reply = httpx.post(args.base + "/v1/chat/completions", json=body, headers=headers, timeout=600)
        reply.raise_for_status()
        wall += time.perf_counter() - start
        spec, usage = reply.json()["speculation"], reply.json()["usage"]
        tokens += usage["completion_tokens"]
        forwards += spec["target_forwards"]
        seconds += spec["seconds"]
        print(f"{usage['completion_tokens']:4d} tokens  {spec['tokens_per_s']:6.2f} tok/s  tau {spec['tau']:.2f}  fallbacks {spec['fallback_rounds']}")
    summary = {
        "requests": len(questions),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "wall_tokens_per_s": tokens / wall if wall else 0.0,
        "tau": tokens / forwards if forwards else 0.0,
    }
    print(json.dumps(summary))


def wait_ready(base: str, timeout: float) -> None:
    """Block until GET /ready answers 200 (the server may still be loading)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = httpx.get(base + "/ready", timeout=5).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        if status == 200:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{base}/ready did not answer 200 within {timeout:.0f} s (last: {status})")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
