"""The gRPC drafter client: the library's `Drafter`/`DraftSession` interface over the wire.

Every failure (drafter down, stream broken, deadline passed) raises `DrafterUnavailable`, on
which the decode loop continues with plain decoding and retries later. A malformed tree (parents
that do not form one) raises `InvalidTree`: that round decodes plainly, the session goes on.
Open and Extend are sent without waiting; only Propose waits for its tree, for at most `timeout`
seconds: one round trip per round, the Proposes of a batched round's requests all in flight at
once (`RemoteDrafter.propose_many`).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Sequence

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.rpc import CHANNEL_OPTIONS, tensor_to_proto
from services.rpc import drafter_pb2 as pb
from services.rpc import drafter_pb2_grpc as pb_grpc
from specdec.drafter import Drafter, DrafterUnavailable, DraftSession
from specdec.tree import DraftTree, InvalidTree

log = logging.getLogger("specdec.verifier")

# Reconnect quickly after a drafter restart (gRPC's default backoff grows to two minutes).
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_END = object()


class RemoteDrafter(Drafter):
    """Sessions on a drafter service at `address` (HOST:PORT)."""

    def __init__(self, address: str, hidden_size: int, timeout: float, feature_dtype: str = "float16", max_tree_tokens: int = 64):
        self.address, self.hidden_size, self.timeout = address, hidden_size, timeout
        self.feature_dtype, self.max_tree_tokens = feature_dtype, max_tree_tokens
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS + _RECONNECT_OPTIONS)
        self.stub = pb_grpc.DrafterStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._info: pb.InfoResponse | None = None

    @property
    def budget(self) -> int:
        """The drafter's tree size when known, capped by `max_tree_tokens` (larger trees are cut)."""
        if self._info is None:
            return self.max_tree_tokens
        return min(self._info.tree.total_tokens, self.max_tree_tokens)

    def info(self) -> pb.InfoResponse:
        """The drafter's Info (cached until the next failure); DrafterUnavailable if it cannot answer
        or drafts for a target of another width."""
        if self._info is None:
            try:
                info = self.stub.Info(pb.InfoRequest(), timeout=self.timeout)
            except grpc.RpcError as exc:
                raise DrafterUnavailable(f"drafter {self.address}: {_describe(exc)}") from exc
            if info.hidden_size != self.hidden_size:
                raise DrafterUnavailable(f"drafter {self.address} expects features of width {info.hidden_size}, the target has {self.hidden_size}")
            log.info("drafter %s: head %s (%s), tree %s", self.address, info.head, info.head_variant, str(info.tree).replace("\n", " "))
            self._info = info
        return self._info

    def reachable(self) -> bool:
        """Whether the drafter's health service says SERVING right now."""
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=min(self.timeout, 1.0))
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def state(self) -> str:
        """'remote-ok' while the drafter's health service says SERVING, else 'remote-unavailable'."""
        return "remote-ok" if self.reachable() else "remote-unavailable"

    def open(self, token_ids: Sequence[int], features: torch.Tensor) -> "RemoteSession":
        """Sends the prompt's features, only the last `head_context` of them where the drafter
        reads no more (a 4,000-token prompt's float16 features are 4.6 MB for the default target)."""
        window = self.info().tree.head_context
        if 0 < window < features.shape[0]:
            features = features[-window:]
        opening = pb.Open(token_ids=list(token_ids), features=tensor_to_proto(features, self.feature_dtype))
        return RemoteSession(self, pb.SessionRequest(open=opening))

    def propose_many(self, sessions: Sequence[DraftSession]) -> list[DraftTree | Exception]:
        """Every session's Propose is sent before any answer is awaited, so the round trips
        (and the drafter's work on them, on its own threads) overlap: a round waits about one
        round trip, not one per request."""
        asked: list[Exception | None] = []
        for session in sessions:
            try:
                session.ask()  # type: ignore[attr-defined]
                asked.append(None)
            except Exception as exc:  # noqa: BLE001 - that session's failure alone
                asked.append(exc)
        out: list[DraftTree | Exception] = []
        for session, failed in zip(sessions, asked):
            if failed is not None:
                out.append(failed)
                continue
            try:
                out.append(session.answer())  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    def forget(self) -> None:
        """Drop the cached Info after a failure: the drafter may come back with another head."""
        self._info = None

    def close(self) -> None:
        self.channel.close()


class RemoteSession(DraftSession):
    """One Session stream; a reader thread hands its answers over to `propose`."""

    def __init__(self, drafter: RemoteDrafter, opening: pb.SessionRequest):
        self.drafter = drafter
        self._requests: queue.Queue = queue.Queue()
        self._answers: queue.Queue = queue.Queue()
        self._requests.put(opening)
        self._round = 0
        self._failed: str | None = None
        self._call = drafter.stub.Session(iter(self._requests.get, _END))
        threading.Thread(target=self._read, name="drafter-stream", daemon=True).start()

    def _read(self) -> None:
        try:
            for answer in self._call:
                self._answers.put(answer)
        except grpc.RpcError as exc:
            self._answers.put(exc)
        finally:
            self._answers.put(_END)

    def _fail(self, reason: str) -> DrafterUnavailable:
        self._failed = reason
        self._call.cancel()
        self._requests.put(_END)
        self.drafter.forget()
        log.warning("drafter %s: %s; decoding without it for now", self.drafter.address, reason)
        return DrafterUnavailable(reason)

    def extend(self, token_ids: Sequence[int], features: torch.Tensor) -> None:
        if self._failed:
            raise DrafterUnavailable(self._failed)
        features = tensor_to_proto(features, self.drafter.feature_dtype)
        self._requests.put(pb.SessionRequest(extend=pb.Extend(token_ids=list(token_ids), features=features)))

    def propose(self) -> DraftTree:
        self.ask()
        return self.answer()

    def ask(self) -> None:
        """Send this round's Propose without waiting (`answer` waits for its tree)."""
        if self._failed:
            raise DrafterUnavailable(self._failed)
        self._round += 1
        self._requests.put(pb.SessionRequest(propose=pb.Propose(round=self._round)))

    def answer(self) -> DraftTree:
        """The tree for the Propose sent last, within the deadline."""
        if self._failed:
            raise DrafterUnavailable(self._failed)
        try:
            answer = self._answers.get(timeout=self.drafter.timeout)
        except queue.Empty:
            raise self._fail(f"no tree within the {self.drafter.timeout}s deadline") from None
        if answer is _END:
            raise self._fail("the session stream ended")
        if isinstance(answer, grpc.RpcError):
            raise self._fail(_describe(answer))
        tree = answer.tree
        if tree.round != self._round:
            raise self._fail(f"tree for round {tree.round} while waiting for round {self._round}")
        budget = self.drafter.budget
        try:
            scores = list(tree.scores)[:budget] or None
            return DraftTree(tokens=list(tree.tokens)[:budget], parents=list(tree.parents)[:budget], scores=scores)
        except ValueError as exc:
            log.warning("drafter %s: malformed tree for round %d: %s", self.drafter.address, self._round, exc)
            raise InvalidTree(f"malformed tree: {exc}") from exc

    def close(self) -> None:
        if not self._failed:
            self._failed = "session closed"
            self._requests.put(_END)
            self._call.cancel()


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'error'}: {details}"
