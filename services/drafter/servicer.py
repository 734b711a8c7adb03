"""The gRPC servicer: one library `DraftSession` per Session stream, freed when the stream ends
or is cancelled; a cap on live sessions; Info describes the head. Proposals run on one thread,
those of concurrent streams batched (`services.drafter.proposals`)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from itertools import count
from typing import Iterator

import grpc

import specdec
from services.drafter.proposals import ProposalQueue
from services.rpc import DTYPES, PROTOCOL_VERSION, tensor_from_proto
from services.rpc import drafter_pb2 as pb
from services.rpc import drafter_pb2_grpc as pb_grpc
from specdec.drafter import DraftSession, HeadDrafter

log = logging.getLogger("specdec.drafter")


class DrafterServicer(pb_grpc.DrafterServicer):
    """Serves `drafter` (a head drafter in this process) to remote verifiers."""

    def __init__(self, drafter: HeadDrafter, head_name: str, max_sessions: int):
        self.drafter, self.head_name, self.max_sessions = drafter, head_name, max_sessions
        self.proposals = ProposalQueue(drafter)
        self._lock = threading.Lock()
        self._active = 0
        self._ids = count(1)

    @property
    def active_sessions(self) -> int:
        return self._active

    def close(self) -> None:
        """Stop the proposal thread (after the server has stopped)."""
        self.proposals.close()

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        cfg, tree = self.drafter.head.cfg, self.drafter.tree
        return pb.InfoResponse(
            head=self.head_name,
            head_variant=cfg.variant,
            target=cfg.target,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            draft_vocab_size=cfg.draft_vocab_size,
            tree=pb.TreeSettings(**asdict(tree)),
            specdec_version=specdec.__version__,
            protocol_version=PROTOCOL_VERSION,
            max_sessions=self.max_sessions,
            active_sessions=self._active,
            feature_dtypes=list(DTYPES.values()),
        )

    def Session(self, requests: Iterator[pb.SessionRequest], context: grpc.ServicerContext) -> Iterator[pb.SessionResponse]:
        with self._lock:
            if self._active >= self.max_sessions:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"drafter at its cap of {self.max_sessions} sessions")
            self._active += 1
        sid = next(self._ids)
        session: DraftSession | None = None
        rounds, started = 0, time.perf_counter()
        try:
            for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the session is already open")
                    ids, features = self._decode(request.open, context, extra_token=1)
                    session = self.drafter.open(ids, features)
                    log.debug("session %d opened with %d tokens", sid, len(ids))
                elif session is None:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be open")
                elif kind == "extend":
                    ids, features = self._decode(request.extend, context, extra_token=0)
                    session.extend(ids, features)
                elif kind == "propose":
                    t0 = time.perf_counter()
                    tree = self.proposals.propose(session)
                    rounds += 1
                    yield pb.SessionResponse(
                        tree=pb.Tree(
                            round=request.propose.round,
                            tokens=tree.tokens,
                            parents=tree.parents,
                            draft_seconds=time.perf_counter() - t0,
                            scores=tree.scores or [],
                        )
                    )
                else:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty session request")
        finally:
            if session is not None:
                session.close()
            with self._lock:
                self._active -= 1
            log.info("session %d closed after %d rounds, %.1fs (%s)", sid, rounds, time.perf_counter() - started,
                     "active" if context.is_active() else "ended by client")

    def _decode(self, message: pb.Open | pb.Extend, context: grpc.ServicerContext, extra_token: int):
        """Token ids and features of an Open (features of the tokens before the last one: all of
        them, or at least the last head_context) or Extend (as many as tokens)."""
        ids = list(message.token_ids)
        cfg = self.drafter.head.cfg
        try:
            features = tensor_from_proto(message.features)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"features: {exc}")
        rows = len(ids) - extra_token
        fewest = min(rows, self.drafter.tree.head_context or rows) if extra_token else rows
        shape = tuple(features.shape)
        if len(shape) != 2 or shape[1] != cfg.hidden_size or not fewest <= shape[0] <= rows or (extra_token and not ids):
            want = f"({rows}, {cfg.hidden_size})" if fewest == rows else f"(n, {cfg.hidden_size}) with {fewest} <= n <= {rows}"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(ids)} token ids need features of shape {want}, got {shape}")
        if any(not 0 <= t < cfg.vocab_size for t in ids):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token ids must be in [0, {cfg.vocab_size})")
        return ids, features
