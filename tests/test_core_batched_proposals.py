"""Batched proposals (`specdec.drafter.propose_together`): many draft sessions' trees grown
together, one head forward and one draft LM head product per depth for all of them, give each
session the tree it proposes alone; a batched decode round asks each drafter once."""

from __future__ import annotations

import pytest
import torch

from specdec.batch import Batch
from specdec.config import StopConfig, TreeConfig
from specdec.drafter import HeadDrafter, propose_together
from specdec.gguf_linear import kernel
from specdec.generate import Generation
from tests.tiny import OracleDrafter, tiny_drafter, tiny_head, tiny_runner

needs_stack = pytest.mark.skipif(kernel() is None, reason="no AVX2 CPU or no C++ compiler: no C++ head forward")

TREE = TreeConfig(top_k=3, depth=4, total_tokens=10, min_prob=0.0, lookup_tokens=0)
PROMPTS = [[3, 9, 14, 2], [5] * 17, [40, 41, 42, 43, 44, 45, 46, 1, 2], [7, 7, 8]]


def open_sessions(runner, drafter: HeadDrafter, prompts=PROMPTS):
    """Sessions over each prompt and its greedy next token, the prompt's features unread."""
    sessions = []
    for prompt in prompts:
        features, logits = runner.prefill(runner.new_state(), prompt)
        sessions.append(drafter.open(prompt + [int(logits.argmax())], features))
    return sessions


def same_tree(a, b) -> bool:
    return a.tokens == b.tokens and a.parents == b.parents and a.scores == pytest.approx(b.scores, abs=1e-5)


@pytest.mark.parametrize("quantized", [True, False])
def test_trees_grown_together_are_the_trees_grown_alone(quantized):
    """On the C++ head (rows independent of each other: identical trees) and on the module's
    own forward (sequence by sequence), for sessions with different prompt lengths, through
    a first read of the prompts and a second round after commits."""
    if quantized and kernel() is None:
        pytest.skip("no C++ head forward")
    runner = tiny_runner(3)
    head = tiny_head(runner, seed=1)
    drafter = HeadDrafter(head, TREE)
    if not quantized:
        drafter.head._stack = None  # the module's own forward, sequence by sequence
    assert (drafter.head.batch_rows > 0) == quantized
    alone, together = open_sessions(runner, drafter), open_sessions(runner, drafter)
    for _ in range(2):
        trees_alone = [s.propose() for s in alone]
        trees_together = drafter.propose_many(together)
        assert all(same_tree(a, b) for a, b in zip(trees_alone, trees_together))
        assert [s.cache.length for s in alone] == [s.cache.length for s in together]
        for sessions, trees in ((alone, trees_alone), (together, trees_together)):
            for session, tree in zip(sessions, trees):  # commit the first draft and a bonus
                session.extend([tree.tokens[1], 11], torch.randn(2, runner.config.hidden_size, generator=torch.Generator().manual_seed(len(tree))))


@needs_stack
def test_step_many_rows_equal_each_sequences_own_step():
    """`DraftHead.step_many` over sequences with their own caches and masks, more rows than
    one C++ call takes (so in groups), equals each sequence's `step` bit for bit, and writes
    the same KV."""
    runner = tiny_runner(2)
    head = HeadDrafter(tiny_head(runner, seed=4), TREE).head
    d, limit = head.cfg.hidden_size, head.batch_rows
    gen = torch.Generator().manual_seed(0)
    rows = [3, limit - 2, 1, limit, 5]
    caches_a, caches_b, masks = [], [], []
    for i, n in enumerate(rows):
        ca, cb = head.new_draft_cache(), head.new_draft_cache()
        warm = torch.randn(4 + i, d, generator=gen)
        for cache in (ca, cb):
            head.step(warm, torch.arange(4 + i), torch.arange(4 + i), None, cache)
        caches_a.append(ca)
        caches_b.append(cb)
        mask = torch.rand(n, ca.length + n, generator=gen) > 0.3
        mask[:, ca.length :] |= torch.eye(n, dtype=torch.bool)
        masks.append(mask if i % 2 else None)
    feats = torch.randn(sum(rows), d, generator=gen)
    tokens = torch.randint(0, runner.vocab_size, (sum(rows),), generator=gen)
    positions = torch.randint(0, 20, (sum(rows),), generator=gen)
    hidden, feature = head.step_many(feats, tokens, positions, masks, caches_a, rows)
    at = 0
    for n, mask, ca, cb in zip(rows, masks, caches_a, caches_b):
        h, f = head.step(feats[at : at + n], tokens[at : at + n], positions[at : at + n], mask, cb)
        assert torch.equal(h, hidden[at : at + n]) and torch.equal(f, feature[at : at + n])
        assert ca.length == cb.length and torch.equal(ca.buffer.data[0, :, :, : ca.length], cb.buffer.data[0, :, :, : cb.length])
        at += n


def test_a_closed_session_fails_alone():
    runner = tiny_runner(1)
    drafter = tiny_drafter(runner, tree=TREE)
    sessions = open_sessions(runner, drafter)
    sessions[1].close()
    out = propose_together(drafter.head, drafter.tree, sessions)
    assert isinstance(out[1], RuntimeError)
    assert all(len(t) > 1 for i, t in enumerate(out) if i != 1)


def test_the_default_propose_many_hands_each_sessions_exception_back():
    """A drafter without a batched proposal (the remote one) answers session by session; a
    session's failure is its own."""
    runner = tiny_runner(1)
    drafter = OracleDrafter(runner, fail_every=2)
    sessions = [drafter.open(p, torch.zeros(len(p) - 1, 32)) for p in PROMPTS[:3]]
    out = drafter.propose_many(sessions)
    assert [type(t).__name__ for t in out] == ["DraftTree", "DrafterUnavailable", "DraftTree"]


class CountingDrafter(HeadDrafter):
    def __init__(self, inner: HeadDrafter):
        super().__init__(inner.head, inner.tree)
        self.calls: list[int] = []

    def propose_many(self, sessions):
        self.calls.append(len(sessions))
        return super().propose_many(sessions)


def test_a_batched_round_asks_the_drafter_once_for_all_its_requests():
    runner = tiny_runner(2)
    drafter = CountingDrafter(tiny_drafter(runner, tree=TREE))
    batch = Batch(runner)
    for prompt in PROMPTS:
        batch.add(Generation(runner, prompt, stop=StopConfig(max_new_tokens=12), drafter=drafter))
    rounds = []
    while not batch.empty:
        batch.step()
        if batch.last_round is not None:
            rounds.append(len(batch.last_round.outcomes))
    assert drafter.calls == rounds and max(drafter.calls) == len(PROMPTS)
