"""Shared fixtures: free loopback ports, child processes that are always stopped, and one torch
thread for tiny-model tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny-model forwards are overhead-bound: one thread is faster and immune to a busy CPU
    (modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A process started by a test; its output goes to a log file shown when a test fails."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.args, self.log = args, log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float = 120.0) -> None:
        """Wait until GET url answers 200 (or the process dies)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{url} not up after {timeout}s:\n{self.output()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process and wait for it (SIGKILL after `timeout`); returns its exit code."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def spawn(tmp_path_factory) -> Iterator[Callable[..., Child]]:
    """spawn(name, *args, env=None) starts `python args...` in the repo root; every child is
    stopped when the module's tests end, passed or failed."""
    children: list[Child] = []
    logs = tmp_path_factory.mktemp("logs")

    def start(name: str, *args: str, env: dict[str, str] | None = None) -> Child:
        child = Child([sys.executable, *args], logs / f"{name}-{len(children)}.log", env)
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


def sse_events(response: httpx.Response) -> list[dict | str]:
    """Parse a server-sent-events body into JSON objects (and the final '[DONE]')."""
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
