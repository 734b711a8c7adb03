"""The gRPC drafter on a tiny target, in-process: the remote client proposes the same trees as
the embedded drafter; a down, slow or full drafter never changes the output (plain-decoding
fallback); the servicer rejects malformed sessions and frees sessions when streams end."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from types import SimpleNamespace
from typing import Iterator

import grpc
import pytest
import torch

from services.drafter.servicer import DrafterServicer
from services.rpc import CHANNEL_OPTIONS, tensor_to_proto
from services.rpc import drafter_pb2 as pb
from services.rpc import drafter_pb2_grpc as pb_grpc
import services.verifier.remote_drafter as remote_module
from services.verifier.engine import Engine
from services.verifier.remote_drafter import RemoteDrafter
from specdec.config import SamplingParams, StopConfig
from specdec.drafter import DrafterUnavailable, HeadDrafter
from specdec.generate import Generation
from specdec.tree import InvalidTree
from tests.conftest import free_port
from tests.tiny import SlowDrafter, tiny_drafter, tiny_runner

PROMPT = [5, 9, 14, 3, 22, 7]


def serve(drafter: HeadDrafter, max_sessions: int = 4) -> tuple[grpc.Server, DrafterServicer, str]:
    servicer = DrafterServicer(drafter, "random", max_sessions)
    server = grpc.server(ThreadPoolExecutor(max_sessions + 4), options=CHANNEL_OPTIONS)
    pb_grpc.add_DrafterServicer_to_server(servicer, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    server.start()
    return server, servicer, address


@pytest.fixture(scope="module")
def runner():
    return tiny_runner(3)


@pytest.fixture(scope="module")
def drafter(runner) -> HeadDrafter:
    return tiny_drafter(runner, seed=3)


@pytest.fixture
def remote(drafter) -> Iterator[tuple[DrafterServicer, str]]:
    server, servicer, address = serve(drafter, max_sessions=1)
    yield servicer, address
    server.stop(None)


def generate(runner, drafter=None, max_new_tokens: int = 30) -> Generation:
    gen = Generation(runner, PROMPT, SamplingParams(), StopConfig(max_new_tokens=max_new_tokens), drafter, retry_rounds=2)
    list(gen)
    return gen


def client(runner, address: str, timeout: float = 5.0, dtype: str = "float32") -> RemoteDrafter:
    return RemoteDrafter(address, hidden_size=runner.hidden_size, timeout=timeout, feature_dtype=dtype)


def test_remote_drafter_matches_embedded_round_for_round(runner, drafter, remote) -> None:
    servicer, address = remote
    embedded = generate(runner, drafter)
    remote_drafter = client(runner, address)
    via_grpc = generate(runner, remote_drafter)
    assert via_grpc.token_ids == embedded.token_ids
    assert via_grpc.stats.accepted_per_round == embedded.stats.accepted_per_round
    assert via_grpc.stats.draft_tokens == embedded.stats.draft_tokens > 0
    assert via_grpc.stats.drafter_failures == 0
    assert remote_drafter.budget == drafter.budget
    remote_drafter.close()
    deadline = time.monotonic() + 5
    while servicer.active_sessions:
        assert time.monotonic() < deadline, "the session was not freed when its stream ended"
        time.sleep(0.02)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_features_stay_lossless(runner, remote, dtype) -> None:
    plain = generate(runner)
    via_grpc = generate(runner, client(runner, remote[1], dtype=dtype))
    assert via_grpc.token_ids == plain.token_ids and via_grpc.stats.draft_tokens > 0


def test_drafter_down_falls_back_to_plain_decoding(runner) -> None:
    plain = generate(runner)
    gen = generate(runner, client(runner, f"127.0.0.1:{free_port()}", timeout=1.0))
    assert gen.token_ids == plain.token_ids
    assert gen.stats.drafter_failures > 0 and gen.stats.fallback_rounds > 0 and gen.stats.draft_tokens == 0


def test_slow_drafter_misses_its_deadline_and_output_is_unchanged(runner, drafter) -> None:
    server, _, address = serve(SlowDrafter(drafter, delay=0.5))
    try:
        plain = generate(runner, max_new_tokens=10)
        start = time.monotonic()
        gen = generate(runner, client(runner, address, timeout=0.1), max_new_tokens=10)
        assert gen.token_ids == plain.token_ids
        assert gen.stats.drafter_failures > 0 and gen.stats.fallback_rounds > 0
        assert time.monotonic() - start < 10 * 0.5, "each failure should cost one deadline, not the drafter's delay"
    finally:
        server.stop(None)


def test_session_cap_is_resource_exhausted_and_falls_back(runner, remote) -> None:
    servicer, address = remote
    features = torch.zeros(len(PROMPT), runner.hidden_size)
    first = client(runner, address).open(PROMPT + [1], features)
    first.propose()
    assert servicer.active_sessions == 1
    second = client(runner, address).open(PROMPT + [1], features)
    with pytest.raises(DrafterUnavailable, match="RESOURCE_EXHAUSTED"):
        second.propose()
    first.close()


class MalformedFirstTree(HeadDrafter):
    """A head drafter whose sessions answer the first Propose with a tree of `parents` and
    `scores` (by default parents that form no tree: node 1's parent comes after it), then
    propose as usual."""

    def __init__(self, inner: HeadDrafter, parents=(-1, 2, 0), scores=None):
        super().__init__(inner.head, inner.tree)
        self.parents, self.scores = list(parents), scores
        self.rounds: dict[int, int] = {}

    def propose_many(self, sessions):
        out = super().propose_many(sessions)
        for i, session in enumerate(sessions):
            self.rounds[id(session)] = self.rounds.get(id(session), 0) + 1
            if self.rounds[id(session)] == 1:
                out[i] = SimpleNamespace(tokens=[session.tokens[-1], 1, 2], parents=self.parents, scores=self.scores)
        return out


@pytest.mark.parametrize("parents, scores", [((-1, 2, 0), None), ((-1, 0, 1), [0.0, -0.5])])
def test_a_malformed_tree_is_invalid_and_the_session_goes_on(runner, drafter, parents, scores) -> None:
    """The client turns parents from the wire that form no tree, or scores that are not one
    per node, into InvalidTree, which the decode loop rejects for that round; the stream stays
    open and the next round drafts (with each node's score)."""
    server, servicer, address = serve(MalformedFirstTree(drafter, parents, scores))
    remote_drafter = client(runner, address)
    try:
        session = remote_drafter.open(PROMPT + [1], torch.zeros(len(PROMPT), runner.hidden_size))
        with pytest.raises(InvalidTree, match="malformed tree"):
            session.propose()
        tree = session.propose()
        assert tree.tokens[0] == 1 and len(tree) > 1 and len(tree.scores) == len(tree) and tree.scores[0] == 0.0
        assert servicer.active_sessions == 1
        session.close()
    finally:
        remote_drafter.close()
        server.stop(None)


def test_the_engine_reports_its_drafter_state(runner, drafter) -> None:
    """/ready's drafter field: from the drafter itself, 'none' without one ('remote-ok' is
    covered end to end in test_services.py)."""
    down = Engine(runner, client(runner, f"127.0.0.1:{free_port()}", timeout=0.5), "tiny")
    assert down.drafter_state() == "remote-unavailable"
    down.close()
    assert Engine(runner, drafter, "tiny").drafter_state() == "embedded"
    assert Engine(runner, None, "tiny").drafter_state() == "none"


def raw_session(address: str, *requests: pb.SessionRequest) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            list(pb_grpc.DrafterStub(channel).Session(iter(requests), timeout=10))
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_malformed_sessions_are_rejected(runner, remote) -> None:
    _, address = remote
    d = runner.hidden_size
    ok_open = pb.Open(token_ids=[1, 2, 3], features=tensor_to_proto(torch.zeros(2, d), "float16"))
    propose = pb.SessionRequest(propose=pb.Propose(round=1))
    assert raw_session(address, pb.SessionRequest(open=ok_open), propose) == grpc.StatusCode.OK
    wrong_shape = pb.Open(token_ids=[1, 2, 3], features=tensor_to_proto(torch.zeros(3, d), "float16"))
    assert raw_session(address, pb.SessionRequest(open=wrong_shape)) == grpc.StatusCode.INVALID_ARGUMENT
    bad_token = pb.Open(token_ids=[1, 10**6], features=tensor_to_proto(torch.zeros(1, d), "float16"))
    assert raw_session(address, pb.SessionRequest(open=bad_token)) == grpc.StatusCode.INVALID_ARGUMENT
    assert raw_session(address, propose) == grpc.StatusCode.FAILED_PRECONDITION
    assert raw_session(address, pb.SessionRequest(open=ok_open), pb.SessionRequest(open=ok_open)) == grpc.StatusCode.FAILED_PRECONDITION
    assert raw_session(address, pb.SessionRequest()) == grpc.StatusCode.FAILED_PRECONDITION


def test_open_carries_only_the_features_the_head_reads(runner, drafter, monkeypatch) -> None:
    """With head_context 3 the client sends the prompt's last 3 features, the servicer accepts
    from 3 to all of them (fewer is INVALID_ARGUMENT), and decoding matches the embedded drafter
    with the same window round for round."""
    windowed = tiny_drafter(runner, replace(drafter.tree, head_context=3), seed=3)
    server, _, address = serve(windowed)
    try:
        d = runner.hidden_size

        def opening(rows: int) -> pb.SessionRequest:
            return pb.SessionRequest(open=pb.Open(token_ids=PROMPT, features=tensor_to_proto(torch.zeros(rows, d), "float32")))

        propose = pb.SessionRequest(propose=pb.Propose(round=1))
        assert raw_session(address, opening(3), propose) == grpc.StatusCode.OK
        assert raw_session(address, opening(len(PROMPT) - 1), propose) == grpc.StatusCode.OK
        assert raw_session(address, opening(2)) == grpc.StatusCode.INVALID_ARGUMENT
        sent = []

        def recording(tensor: torch.Tensor, dtype: str) -> pb.Tensor:
            sent.append(tuple(tensor.shape))
            return tensor_to_proto(tensor, dtype)

        monkeypatch.setattr(remote_module, "tensor_to_proto", recording)
        via_grpc = generate(runner, client(runner, address))
        embedded = generate(runner, windowed)
        assert sent[0] == (3, d), "Open carries the last head_context features"
        assert via_grpc.token_ids == embedded.token_ids
        assert via_grpc.stats.accepted_per_round == embedded.stats.accepted_per_round and via_grpc.stats.draft_tokens > 0
    finally:
        server.stop(None)


def test_info_describes_the_head(runner, drafter, remote) -> None:
    with grpc.insecure_channel(remote[1]) as channel:
        info = pb_grpc.DrafterStub(channel).Info(pb.InfoRequest(), timeout=5)
    assert info.hidden_size == runner.hidden_size and info.vocab_size == runner.vocab_size
    assert info.head == "random" and info.head_variant == "fspad" and info.protocol_version == "v1"
    assert (info.tree.top_k, info.tree.depth, info.tree.total_tokens) == (drafter.tree.top_k, drafter.tree.depth, drafter.tree.total_tokens)
    assert info.max_sessions == 1 and pb.DTYPE_BFLOAT16 in info.feature_dtypes


def test_a_batched_round_sends_every_propose_before_waiting(runner, drafter) -> None:
    """`RemoteDrafter.propose_many`: each session gets the tree the embedded drafter proposes
    for it, all Proposes are in flight before the first answer is read, and a failed session
    fails alone."""
    server, _, address = serve(drafter, max_sessions=4)
    remote_drafter = client(runner, address)
    try:
        prompts = [PROMPT, PROMPT[:3], PROMPT + [1, 2, 3]]
        sessions, embedded = [], []
        for prompt in prompts:
            features, _ = runner.prefill(runner.new_state(), prompt)
            sessions.append(remote_drafter.open(prompt + [4], features))
            embedded.append(drafter.open(prompt + [4], features).propose())
        order: list[str] = []
        for session in sessions:
            ask, answer = session.ask, session.answer
            session.ask = lambda ask=ask: (order.append("ask"), ask())[1]
            session.answer = lambda answer=answer: (order.append("answer"), answer())[1]
        trees = remote_drafter.propose_many(sessions)
        assert order == ["ask"] * 3 + ["answer"] * 3
        assert [(t.tokens, t.parents) for t in trees] == [(t.tokens, t.parents) for t in embedded]
        assert all(t.scores == pytest.approx(e.scores, abs=1e-5) for t, e in zip(trees, embedded))  # the budget reads them
        sessions[1].close()
        again = remote_drafter.propose_many(sessions)
        assert isinstance(again[1], DrafterUnavailable) and len(again[0]) > 1 and len(again[2]) > 1
    finally:
        remote_drafter.close()
        server.stop(None)
