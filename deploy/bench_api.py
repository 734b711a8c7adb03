"""Speed and acceptance through the HTTP API: greedy chat completions for Spec-Bench questions,
`--concurrency` at a time; prints per-request figures and a JSON summary (wall-clock tokens/s
of the whole run, per-request latency p50/p95, and tokens/s and tau as the server measured them).

    python deploy/bench_api.py --base http://127.0.0.1:8000 -n 16 --concurrency 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default 1: one after another)")
    args = parser.parse_args()
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    key = os.environ.get("SPECDEC_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with open(args.questions) as f:
        questions = [json.loads(line)["turns"][0] for line in f if line.strip()][: args.n]
    wait_ready(args.base, timeout=300)
    printing = threading.Lock()

    def ask(question: str) -> tuple[float, dict]:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": args.max_tokens, "temperature": 0}
        start = time.perf_counter()
        reply = httpx.post(args.base + "/v1/chat/completions", json=body, headers=headers, timeout=600)
        reply.raise_for_status()
        latency, answer = time.perf_counter() - start, reply.json()
        spec, usage = answer["speculation"], answer["usage"]
        with printing:
            print(f"{usage['completion_tokens']:4d} tokens  {latency:6.2f} s  {spec['tokens_per_s']:6.2f} tok/s  tau {spec['tau']:.2f}  fallbacks {spec['fallback_rounds']}")
        return latency, answer

    began = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(ask, questions))
    wall = time.perf_counter() - began
    print(json.dumps(summarize(results, wall, args.concurrency)))


def summarize(results: list[tuple[float, dict]], wall: float, concurrency: int) -> dict:
    """The run's figures from each request's (latency, response body) and the run's wall time."""
    tokens = sum(body["usage"]["completion_tokens"] for _, body in results)
    forwards = sum(body["speculation"]["target_forwards"] for _, body in results)
    seconds = sum(body["speculation"]["seconds"] for _, body in results)
    latencies = sorted(latency for latency, _ in results)
    return {
        "requests": len(results),
        "concurrency": concurrency,
        "tokens": tokens,
        "wall_tokens_per_s": tokens / wall if wall else 0.0,
        "latency_p50_s": statistics.median(latencies) if latencies else 0.0,
        "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else 0.0,
        "server_tokens_per_s": tokens / seconds if seconds else 0.0,
        "tau": tokens / forwards if forwards else 0.0,
    }


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
