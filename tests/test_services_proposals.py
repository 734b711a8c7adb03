"""The drafter service's proposal thread (`services.drafter.proposals`): proposals that wait
together are one batched call, each stream gets its own tree (the one its session proposes
alone) or its own error."""

from __future__ import annotations

import threading
import time

import pytest

from services.drafter.proposals import ProposalQueue
from specdec.config import TreeConfig
from specdec.drafter import HeadDrafter
from tests.test_core_batched_proposals import PROMPTS, open_sessions
from tests.tiny import tiny_drafter, tiny_runner

TREE = TreeConfig(top_k=3, depth=3, total_tokens=8, min_prob=0.0, lookup_tokens=0)


class Gate(HeadDrafter):
    """Holds its first call until released, so that the other proposals queue up meanwhile."""

    def __init__(self, inner: HeadDrafter):
        super().__init__(inner.head, inner.tree)
        self.sizes: list[int] = []
        self.release = threading.Event()

    def propose_many(self, sessions):
        self.sizes.append(len(sessions))
        if len(self.sizes) == 1:
            self.release.wait(10)
        return super().propose_many(sessions)


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_waiting_proposals_go_together_and_each_stream_gets_its_own_answer():
    runner = tiny_runner(4)
    gate = Gate(tiny_drafter(runner, tree=TREE))
    alone = [s.propose() for s in open_sessions(runner, gate)]
    sessions = open_sessions(runner, gate)
    sessions[2].close()
    proposals = ProposalQueue(gate)
    results: dict[int, object] = {}

    def ask(i: int) -> None:
        try:
            results[i] = proposals.propose(sessions[i])
        except RuntimeError as exc:
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    threads[0].start()
    wait_for(lambda: gate.sizes == [1])
    for t in threads[1:]:
        t.start()
    wait_for(lambda: proposals._queue.qsize() == len(PROMPTS) - 1)
    gate.release.set()
    for t in threads:
        t.join(10)
    proposals.close()
    assert gate.sizes == [1, len(PROMPTS) - 1]
    assert isinstance(results[2], RuntimeError)
    for i in (0, 1, 3):
        assert (results[i].tokens, results[i].parents) == (alone[i].tokens, alone[i].parents)
        assert results[i].scores == pytest.approx(alone[i].scores, abs=1e-5)
