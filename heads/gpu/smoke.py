"""Checks the CUDA path on tiny random targets before a long GPU run (`heads/gpu/train.sh`).

Run from the repository root: `python3 heads/gpu/smoke.py [--device cuda]`. It exercises, on the
device, what the training run and the server use: regenerate (batched `generate` with the
feature hook), fit (a few steps of both variants, unrolled too), and greedy speculative decoding
against plain decoding in float32, bfloat16 and float16. Prints one JSON line per check and
exits non-zero on the first error; greedy mismatches are counted and printed, not hidden (off
the CPU's row-independent kernels a tree row's float sums may round differently from a
one-token step's, so near-ties can flip).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from specdec.config import SamplingParams, StopConfig, TreeConfig  # noqa: E402
from specdec.drafter import HeadDrafter  # noqa: E402
from specdec.generate import Generation  # noqa: E402
from specdec.target import TargetRunner  # noqa: E402
from specdec.train.cache import load_sequences  # noqa: E402
from specdec.train.fit import FitConfig, fit  # noqa: E402
from specdec.train.regenerate import regenerate  # noqa: E402
from tests.test_train_pipeline import chat_runner, write_conversations  # noqa: E402
from tests.tiny import OracleDrafter, tiny_head, tiny_runner  # noqa: E402


def moved(runner: TargetRunner, device: str, dtype: torch.dtype) -> TargetRunner:
    return TargetRunner(runner.model.to(device, dtype), runner.tokenizer, runner.name)


def report(check: str, **fields) -> None:
    print(json.dumps({"check": check, **fields}), flush=True)


def check_training(device: str, work: Path) -> None:
    runner = moved(chat_runner(), device, torch.float32)
    write_conversations(work / "conv.jsonl", n=12)
    started = time.perf_counter()
    result = regenerate(runner, work / "conv.jsonl", work / "regen", max_new_tokens=24, batch_size=8, shard_size=8, progress=False)
    sequences = load_sequences(work / "regen", runner)
    feature_device = {str(s.features.device) for s in sequences}
    report("regenerate", seconds=round(time.perf_counter() - started, 2), new_tokens=result["new_tokens"], feature_device=sorted(feature_device))
    d2t = torch.arange(runner.vocab_size)
    for variant, unroll in (("fspad", 1), ("eagle2", 1), ("fspad", 2)):
        cfg = FitConfig(variant=variant, feature_sampling=variant == "fspad", partial_alignment=variant == "fspad", steps=8, tokens_per_step=256, warmup_steps=2, unroll=unroll)
        started = time.perf_counter()
        out = fit(runner, sequences, d2t, cfg, work / f"fit-{variant}-{unroll}", checkpoint_every=4, progress=False)
        log = [json.loads(line) for line in (work / f"fit-{variant}-{unroll}" / "log.jsonl").read_text().splitlines()]
        report("fit", variant=variant, unroll=unroll, seconds=round(time.perf_counter() - started, 2), first_loss=log[0]["loss"], last_loss=out["loss"])


def check_decoding(device: str, dtype: torch.dtype) -> None:
    """Greedy speculative decoding against plain decoding with a random head (exercises the
    head's forward there) and with the oracle drafter (accepts deep, exercises every commit)."""
    runner = moved(tiny_runner(seed=3), device, dtype)
    drafters = {
        "head": HeadDrafter(tiny_head(runner).to(device, dtype), TreeConfig(top_k=3, depth=4, total_tokens=10, min_prob=0.0)),
        "oracle": OracleDrafter(runner, width=2, depth=3),
    }
    for name, drafter in drafters.items():
        mismatches, tokens, rounds = 0, 0, 0
        for p in range(4):
            prompt = [(7 * p + 3 * i) % runner.vocab_size for i in range(6 + p)]
            stop = StopConfig(max_new_tokens=48)
            plain = Generation(runner, prompt, SamplingParams(), stop, None)
            list(plain)
            spec = Generation(runner, prompt, SamplingParams(), stop, drafter)
            list(spec)
            mismatches += sum(a != b for a, b in zip(plain.token_ids, spec.token_ids)) + abs(len(plain.token_ids) - len(spec.token_ids))
            tokens += len(plain.token_ids)
            rounds += spec.stats.target_forwards
        report("greedy", drafter=name, dtype=str(dtype), tokens=tokens, spec_target_forwards=rounds, mismatches=mismatches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device to check")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        report("device", name=torch.cuda.get_device_name(), torch=torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        check_training(args.device, Path(tmp))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_decoding(args.device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
