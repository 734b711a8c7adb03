"""Unrolled training steps (training-time test) compute exactly what drafting at depth k does."""

from __future__ import annotations

import json

import torch

from specdec.head import HeadCache
from specdec.train.fit import FitConfig, fit, unroll_mask, unrolled_forward
from tests.test_train_pipeline import chat_runner, write_conversations
from tests.tiny import tiny_head, tiny_runner


def test_unroll_mask_rows_see_root_prefix_and_ancestors():
    mask = unroll_mask(5, 3)
    assert mask.shape == (5, 15)
    row4 = mask[4].view(3, 5)  # step-1 keys up to the root (position 2), then position 3 of step 2, then itself
    assert row4[0].tolist() == [True, True, True, False, False]
    assert row4[1].tolist() == [False, False, False, True, False]
    assert row4[2].tolist() == [False, False, False, False, True]
    assert mask.any(-1).all()  # every row attends to something (itself at least)


@torch.inference_mode()
def test_unrolled_steps_equal_cached_drafting_chain():
    runner = tiny_runner(0)
    head = tiny_head(runner, "fspad").eval()
    t = 9
    feats, toks = torch.randn(2, t, 32), torch.randint(0, 64, (2, t))
    outputs = unrolled_forward(head, feats, toks, torch.arange(t).expand(2, -1), steps=3)
    for b in range(2):
        single = unrolled_forward(head, feats[b], toks[b], torch.arange(t), steps=3)
        for (h, f), (hb, fb) in zip(single, outputs):
            torch.testing.assert_close(hb[b], h, atol=1e-5, rtol=1e-5)
        for j in range(2, t):
            # Drafting: true pairs up to the root j-2 cached, then two steps on predicted features.
            cache = HeadCache()
            _, f = head(feats[b, : j - 1], toks[b, : j - 1], torch.arange(j - 1), None, cache)
            x = f[-1:]
            for step, row in ((2, j - 1), (3, j)):
                h, f = head(x, toks[b, row : row + 1], torch.tensor([row]), None, cache)
                torch.testing.assert_close(h[0], outputs[step - 1][0][b, row], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(f[0], outputs[step - 1][1][b, row], atol=1e-5, rtol=1e-5)
                x = f


def test_fit_with_unroll_logs_every_step_and_resumes_old_checkpoints(tmp_path):
    from specdec.train.cache import load_sequences
    from specdec.train.extract import extract

    torch.set_num_threads(1)
    runner = chat_runner()
    write_conversations(tmp_path / "conv.jsonl", n=6)
    extract(runner, tmp_path / "conv.jsonl", tmp_path / "cache", max_len=48, progress=False)
    sequences = load_sequences(tmp_path / "cache", runner)
    d2t = torch.arange(runner.vocab_size)
    cfg = FitConfig(steps=6, tokens_per_step=96, lr=3e-3, warmup_steps=2, unroll=3)
    result = fit(runner, sequences, d2t, cfg, tmp_path / "run", checkpoint_every=3, progress=False)
    assert result["finished"] and {"acc", "acc2", "acc3"} <= result.keys()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # A checkpoint written before `unroll` existed resumes as unroll=1.
    plain = FitConfig(steps=4, tokens_per_step=96, lr=3e-3, warmup_steps=2)
    fit(runner, sequences, d2t, plain, tmp_path / "old", stop_at=2, progress=False)
    state = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=False)
    del state["fit"]["unroll"]
    torch.save(state, tmp_path / "old" / "checkpoint.pt")
    assert fit(runner, sequences, d2t, plain, tmp_path / "old", progress=False)["step"] == 4
