"""The shipped draft heads load onto the real default target and decode losslessly."""

from __future__ import annotations

from pathlib import Path

import pytest

from specdec.config import StopConfig, TreeConfig
from specdec.drafter import load_head_drafter
from specdec.generate import Generation
from specdec.target import TargetRunner

HEADS = Path(__file__).resolve().parent.parent / "heads"
SHIPPED = ["smollm2-135m-instruct-fspad", "smollm2-135m-instruct-eagle2"]
PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain what a prime number is."]


pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def runner() -> TargetRunner:
    return TargetRunner.load()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_head_decodes_like_the_target(runner: TargetRunner, name: str):
    head = HEADS / name
    assert (head / "config.json").is_file(), f"{name} is not shipped"
    assert sum(f.stat().st_size for f in head.iterdir()) <= 25 * 2**20
    drafter = load_head_drafter(runner, str(head), TreeConfig())
    stop = StopConfig(max_new_tokens=32)
    accepted = 0
    for prompt in PROMPTS:
        ids = runner.encode(prompt, chat=True)
        plain = Generation(runner, ids, stop=stop)
        spec = Generation(runner, ids, stop=stop, drafter=drafter)
        list(plain), list(spec)
        assert spec.token_ids == plain.token_ids, prompt
        accepted += sum(spec.stats.accepted_per_round)
    assert accepted > 0  # a trained head gets drafts accepted
