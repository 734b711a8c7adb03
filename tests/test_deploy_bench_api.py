"""deploy/bench_api.py's readiness wait: returns on 200, gives up with a message otherwise."""

from __future__ import annotations

import importlib.util
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import REPO, free_port


def _bench_api():
    spec = importlib.util.spec_from_file_location("bench_api", REPO / "deploy" / "bench_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _serve(status: int):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("status", [200, 503])
def test_wait_ready_returns_on_200_and_times_out_otherwise(status: int) -> None:
    server = _serve(status)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        if status == 200:
            _bench_api().wait_ready(base, timeout=5)
        else:
            with pytest.raises(SystemExit, match="did not answer 200 within 1 s .last: 503"):
                _bench_api().wait_ready(base, timeout=1)
    finally:
        server.shutdown()
        server.server_close()


def test_summary_adds_up_the_requests_and_their_latencies() -> None:
    def body(tokens: int, forwards: int, seconds: float) -> dict:
        return {"usage": {"completion_tokens": tokens}, "speculation": {"target_forwards": forwards, "seconds": seconds}}

    results = [(1.0, body(10, 5, 0.5)), (3.0, body(30, 10, 1.5)), (2.0, body(20, 20, 1.0))]
    summary = _bench_api().summarize(results, wall=4.0, concurrency=3)
    assert summary["tokens"] == 60 and summary["wall_tokens_per_s"] == 15.0 and summary["server_tokens_per_s"] == 20.0
    assert summary["latency_p50_s"] == 2.0 and summary["latency_p95_s"] == 3.0 and summary["tau"] == 60 / 35
    assert summary["requests"] == 3 and summary["concurrency"] == 3
