"""Admission and continuous batching of generations: a bounded queue in front of one engine
thread that decodes every running generation together (`specdec.batch.Batch`: one target
forward per round for all of them). A request joins the batch at the next round while fewer than
`max_concurrency` generations run, and leaves as soon as it is done. Torch work never runs on
the event loop; chunks cross back to it one round at a time, and a cancelled consumer's
generations leave the batch before the next round (their KV caches freed, the others untouched).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from typing import AsyncIterator, Sequence

from services.verifier.metrics import Metrics
from specdec.batch import Batch
from specdec.generate import Chunk, Generation
from specdec.openmp import release_pool

log = logging.getLogger("specdec.verifier")

_DONE = object()


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its limit."""


class Admission:
    """A request's place in the scheduler, from `admit` until its generations finish or it is dropped."""

    def __init__(self, scheduler: "Scheduler"):
        self.scheduler = scheduler
        self.used = False

    def drop(self) -> None:
        """Give the place back without running anything (e.g. the request failed validation)."""
        if not self.used:
            self.used = True
            self.scheduler._leave()


class _Request:
    """One request's generations on their way through the engine thread, and the way back to
    its consumer on the event loop."""

    def __init__(self, generations: Sequence[Generation], loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.generations, self.loop, self.queue = list(generations), loop, queue
        self.index = {id(g): i for i, g in enumerate(self.generations)}
        self.left = len(self.generations)
        self.cancelled = False

    def deliver(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Scheduler:
    """At most `max_concurrency` generations decode together; requests beyond them wait, at
    most `max_queue` of them (then `admit` refuses)."""

    def __init__(self, batch: Batch, max_concurrency: int, max_queue: int, metrics: Metrics):
        self.batch, self.max_concurrency, self.max_queue, self.metrics = batch, max_concurrency, max_queue, metrics
        self._admitted = 0
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._owner: dict[int, _Request] = {}
        self._wake = threading.Condition()
        self._stopping = False
        # The thread that loaded the model hands its OpenMP workers over to the engine thread:
        # with both pools alive, every parallel region of a forward waits for a sleeping worker.
        release_pool()
        self._thread = threading.Thread(target=self._engine, name="batch-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests admitted whose generations have not joined the batch yet."""
        return self._admitted - len(self._running)

    def admit(self) -> Admission:
        """Reserve a place now, or raise QueueFull (the caller answers 429)."""
        with self._wake:
            if self._admitted >= self.max_concurrency + self.max_queue:
                raise QueueFull(f"server busy: {len(self.batch)} generations running, {self.waiting} requests waiting")
            self._admitted += 1
            self._update_gauges()
        return Admission(self)

    async def run(self, admission: Admission, generations: Sequence[Generation]) -> AsyncIterator[tuple[int, Chunk]]:
        """Decode the generations in the shared batch; yield (index, chunk) as rounds commit.

        Closing or cancelling the iterator takes the generations out of the batch before its
        next round. An exception that ends one of them is raised here, and ends the others.
        """
        if admission.used:
            raise RuntimeError("an admission runs once")
        admission.used = True
        queue: asyncio.Queue = asyncio.Queue()
        request = _Request(generations, asyncio.get_running_loop(), queue)
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            with self._wake:
                request.cancelled = True
                self._wake.notify()

    def shutdown(self) -> None:
        """Stop the engine thread after its current round; unfinished generations are closed."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _engine(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    break
                cancelled = [r for r in self._running if r.cancelled]
                for request in [r for r in self._waiting if r.cancelled]:
                    self._waiting.remove(request)
                    request.deliver(_DONE)
                    self._leave()
                joining = self._take_joining()
            for request in cancelled:
                self._end(request, None)
            for request in joining:
                for gen in request.generations:
                    self._owner[id(gen)] = request
                    self.batch.add(gen)
            if self.batch.empty:
                continue
            try:
                events = self.batch.step()
            except Exception as exc:  # noqa: BLE001 - a failed forward ends every request in it
                log.exception("batched round failed")
                for request in list(self._running):
                    self._end(request, exc)
                continue
            self._deliver(events)
        for request in list(self._running):
            self._end(request, None)

    def _take_joining(self) -> list[_Request]:
        """Waiting requests that fit in the batch now (the first one always fits an empty
        batch); called with the lock held."""
        joining = []
        room = self.max_concurrency - len(self.batch)
        while self._waiting and (len(self._waiting[0].generations) <= room or (not self._running and not joining)):
            request = self._waiting.popleft()
            room -= len(request.generations)
            joining.append(request)
            self._running.append(request)
        if joining:
            self._update_gauges()
        return joining

    def _deliver(self, events: list[tuple[Generation, Chunk | Exception]]) -> None:
        if self.batch.last_round is not None:
            self.metrics.record_round(self.batch.last_round)
        for gen, outcome in events:
            request = self._owner.get(id(gen))
            if request is None:
                continue
            if isinstance(outcome, Exception):
                log.error("generation failed: %s: %s", type(outcome).__name__, outcome)
                self._end(request, outcome)
                continue
            request.deliver((request.index[id(gen)], outcome))
            if gen.finished:
                self._finish(request, gen)

    def _finish(self, request: _Request, gen: Generation) -> None:
        self._owner.pop(id(gen), None)
        self.metrics.record_generation(gen.stats)
        request.left -= 1
        if request.left == 0:
            self._end(request, None)

    def _end(self, request: _Request, error: Exception | None) -> None:
        """Take a request's remaining generations out of the batch and tell its consumer."""
        if request not in self._running:
            return
        for gen in request.generations:
            if self._owner.pop(id(gen), None) is not None:
                self.batch.remove(gen)
                self.metrics.record_generation(gen.stats)
        if error is not None:
            request.deliver(error)
        request.deliver(_DONE)
        with self._wake:
            self._running.remove(request)
            self._leave()

    def _leave(self) -> None:
        with self._wake:
            self._admitted -= 1
            self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.running.set(len(self.batch))
