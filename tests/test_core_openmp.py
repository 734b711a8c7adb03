"""`specdec.openmp.release_pool`: the calling thread's OpenMP workers are released (the
verifier's engine thread then has the CPU's workers to itself; the speed-up is measured by
`deploy/bench_api.py --concurrency`, not here) and parallel work still runs afterwards."""

from __future__ import annotations

import threading

import torch

from specdec.openmp import release_pool


def test_release_pool_pauses_the_runtime_and_work_goes_on():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    expected = a @ b  # parallel work: this thread now has a pool
    runtime_loaded = any(name in open("/proc/self/maps").read() for name in ("libgomp", "libiomp", "libomp"))
    assert release_pool() is runtime_loaded
    assert torch.equal(a @ b, expected)
    results = []
    worker = threading.Thread(target=lambda: results.append(torch.equal(a @ b, expected)))
    worker.start()
    worker.join()
    assert results == [True]
