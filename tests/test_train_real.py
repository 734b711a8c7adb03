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


def test_shrink_command_keeps_a_shipped_head_lossless(runner: TargetRunner, tmp_path: Path, capsys):
    """`specdec train shrink` on the real target: the copy drafts over the most frequent of the
    head's own tokens (counted in a small cache of real conversations) and decodes losslessly."""
    import json

    from specdec.cli import main
    from specdec.head import DraftHead
    from specdec.train.extract import extract

    conversations = tmp_path / "conv.jsonl"
    rows = [[{"role": "user", "content": p}, {"role": "assistant", "content": f"Here is my answer to: {p}"}] for p in PROMPTS]
    conversations.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    extract(runner, conversations, tmp_path / "cache", max_len=128, progress=False)
    head = HEADS / SHIPPED[0]
    assert main(["train", "shrink", "--head", str(head), "--cache", str(tmp_path / "cache"), "--size", "512", "--out", str(tmp_path / "small")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == 512 and report["was"] == json.loads((head / "config.json").read_text())["draft_vocab_size"]
    assert 0 < report["coverage"] <= report["coverage_before"] <= 1
    small = DraftHead.load(tmp_path / "small", runner.embed_tokens, runner.lm_head.weight, runner.config)
    full = DraftHead.load(head, runner.embed_tokens, runner.lm_head.weight, runner.config)
    assert small.cfg.draft_vocab_size == 512 and set(small.d2t.tolist()) <= set(full.d2t.tolist())
    drafter = load_head_drafter(runner, str(tmp_path / "small"), TreeConfig())
    ids = runner.encode(PROMPTS[0], chat=True)
    plain = Generation(runner, ids, stop=StopConfig(max_new_tokens=24))
    spec = Generation(runner, ids, stop=StopConfig(max_new_tokens=24), drafter=drafter)
    list(plain), list(spec)
    assert spec.token_ids == plain.token_ids
