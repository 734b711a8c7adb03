"""One thread runs the proposals of every session stream: those that arrive together go to the
drafter in one call (`Drafter.propose_many`: the embedded head grows all their trees at once,
reading its weights once per depth), and the CPU's OpenMP workers serve that one thread instead
of a pool per gRPC thread (`specdec.openmp`)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

from specdec.drafter import Drafter, DraftSession
from specdec.openmp import release_pool
from specdec.tree import DraftTree

_STOP = None


class ProposalQueue:
    """`propose(session)` from any thread; the answers come from one worker thread, which takes
    every proposal waiting when it is free as one batch."""

    def __init__(self, drafter: Drafter):
        self.drafter = drafter
        self._queue: queue.Queue[tuple[DraftSession, Future] | None] = queue.Queue()
        release_pool()  # the thread that loaded the head hands its OpenMP workers over
        self._thread = threading.Thread(target=self._run, name="proposals", daemon=True)
        self._thread.start()

    def propose(self, session: DraftSession) -> DraftTree:
        """The session's tree (or the exception its proposal raised), once the worker has run it."""
        future: Future = Future()
        self._queue.put((session, future))
        return future.result()

    def close(self) -> None:
        """Stop the worker after the proposals already queued."""
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = _STOP in batch
            work = [item for item in batch if item is not _STOP]
            if not work:
                continue
            try:
                results = self.drafter.propose_many([session for session, _ in work])
            except Exception as exc:  # noqa: BLE001 - every waiting stream gets the error
                results = [exc] * len(work)
            for (_, future), result in zip(work, results):
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
