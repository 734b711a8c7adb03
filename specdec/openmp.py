"""Hand the CPU's OpenMP workers over to the thread that runs the model.

The OpenMP runtime torch ships (libgomp) keeps a pool of worker threads for every host thread
that has run parallel work. With more such workers than CPUs it stops spinning between
parallel regions and puts them to sleep, and every region then waits for a wake-up: a forward
of the default target runs some 150 regions, so on the 2-core CPU a 4-row forward took 24 ms on
the verifier's engine thread once the model had been loaded on the main thread, and 11 ms after
the main thread's pool was released (the same as on the main thread).
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_RUNTIMES = ("libgomp", "libiomp", "libomp")
_PAUSE_SOFT = 1  # omp_pause_soft: threads released, state kept


def release_pool() -> bool:
    """Release the calling thread's OpenMP worker threads (OpenMP 5.0's
    `omp_pause_resource_all`); they come back if this thread runs parallel work again. Call it
    on a thread that is done with torch work before another thread takes over. Returns whether
    the loaded runtime did it (False: none found, or it cannot pause)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if any(name in line for name in _RUNTIMES)}
    except OSError:
        return False
    for path in sorted(paths):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        if pause(_PAUSE_SOFT) == 0:
            return True
    log.debug("no OpenMP runtime here could release its threads")
    return False
