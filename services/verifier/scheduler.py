"""Admission and execution of generations: a bounded queue in front of a fixed number of worker
threads. Torch work never runs on the event loop; chunks cross back to it one round at a time,
and a cancelled consumer stops its generation after the round in flight."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Sequence

from services.verifier.metrics import Metrics
from specdec.generate import Chunk, Generation

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


class Scheduler:
    """At most `max_concurrency` generations run; at most `max_queue` more wait for a slot."""

    def __init__(self, max_concurrency: int, max_queue: int, metrics: Metrics):
        self.max_concurrency, self.max_queue, self.metrics = max_concurrency, max_queue, metrics
        self._slots = asyncio.Semaphore(max_concurrency)
        self._admitted = 0
        self._running = 0
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="generation")

    @property
    def waiting(self) -> int:
        return self._admitted - self._running

    def admit(self) -> Admission:
        """Reserve a place now, or raise QueueFull (the caller answers 429)."""
        if self._admitted >= self.max_concurrency + self.max_queue:
            raise QueueFull(f"server busy: {self._running} running, {self.waiting} waiting")
        self._admitted += 1
        self._update_gauges()
        return Admission(self)

    async def run(self, admission: Admission, generations: Sequence[Generation]) -> AsyncIterator[tuple[int, Chunk]]:
        """Run the generations one after another in one slot; yield (index, chunk) as rounds commit.

        Closing or cancelling the iterator stops the generation in flight after its current round.
        """
        if admission.used:
            raise RuntimeError("an admission runs once")
        admission.used = True
        loop = asyncio.get_running_loop()
        try:
            await self._slots.acquire()
        except BaseException:
            self._leave()
            raise
        self._running += 1
        self._update_gauges()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def deliver(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                for index, gen in enumerate(generations):
                    with contextlib.closing(iter(gen)) as chunks:
                        try:
                            for chunk in chunks:
                                if cancelled.is_set():
                                    return
                                deliver((index, chunk))
                        finally:
                            self.metrics.record_generation(gen.stats)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                deliver(exc)
            finally:
                deliver(_DONE)

        def finished(_: object) -> None:
            self._running -= 1
            self._slots.release()
            self._leave()

        future = loop.run_in_executor(self._executor, work)
        future.add_done_callback(finished)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    def _leave(self) -> None:
        self._admitted -= 1
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.running.set(self._running)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
