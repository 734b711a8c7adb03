"""Teacher-forced agreement: how often a head's top-k drafts contain the target's greedy next
token when the head sees the target's true features (a depth-1 draft at every position).

Why beside `evaluate`: live acceptance mixes the head's quality with the tree's shape; this
isolates the head, and run on questions of two distributions it shows whether a weak τ comes
from the head not generalising (the case that motivated `specdec train prompts`) or from the
drafting code (live depth-1 acceptance far below this figure would point there).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm import tqdm

from specdec.config import SamplingParams, StopConfig
from specdec.generate import Generation
from specdec.head import DraftHead
from specdec.target import TargetRunner
from specdec.train.data import Question
from specdec.train.extract import features_of


@torch.inference_mode()
def agreement(
    runner: TargetRunner, head: DraftHead, questions: list[Question], max_new_tokens: int = 64, top_k: int = 6, progress: bool = True
) -> dict:
    """Top-1 and top-`top_k` agreement over the greedy answers to each question's first turn,
    overall and per category. Position i's draft (feature i, token i+1) is scored against
    answer token i+2, so the first answer token (the verifier's own) is not scored."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # scored, top-1 hits, top-k hits
    for q in tqdm(questions, desc="agreement", unit="question", disable=not progress):
        prompt = runner.encode_messages([{"role": "user", "content": q.turns[0]}])
        gen = Generation(runner, prompt, SamplingParams(temperature=0.0), StopConfig(max_new_tokens=max_new_tokens))
        for _ in gen:
            pass
        ids = prompt + gen.token_ids
        if len(gen.token_ids) < 2:
            continue
        feats = features_of(runner, ids).to(head.fc.weight.dtype)
        tokens = torch.tensor(ids, device=feats.device)
        hidden, _ = head(feats[None, :-1], tokens[None, 1:], torch.arange(len(ids) - 1, device=feats.device)[None])
        # Rows len(prompt)-1 .. len(ids)-3 predict the answer tokens 1 .. end.
        rows = hidden[0, len(prompt) - 1 : len(ids) - 2]
        drafts = head.d2t[head.logits(rows).topk(min(top_k, head.cfg.draft_vocab_size), -1).indices]
        truth = tokens[len(prompt) + 1 :, None]
        c = counts[q.category]
        c[0] += truth.shape[0]
        c[1] += int((drafts[:, :1] == truth).sum())
        c[2] += int((drafts == truth).any(-1).sum())

    def block(scored: int, top1: int, topk: int) -> dict:
        shares = {"top1": top1, f"top{top_k}": topk}  # one key when top_k is 1
        return {"scored": scored} | {k: round(v / scored, 4) if scored else 0.0 for k, v in shares.items()}

    total = [sum(c[i] for c in counts.values()) for i in range(3)]
    return {"overall": block(*total), "per_category": {k: block(*v) for k, v in sorted(counts.items())}}
