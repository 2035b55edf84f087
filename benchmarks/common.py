"""What several benchmarks share: running one measurement in a fresh process (so its peak
RSS is its own) and reading that peak."""

from __future__ import annotations

import multiprocessing as mp
import queue
import resource


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(target, *args):
    """``target(*args, out)`` in a spawned process; returns what it put on ``out``. A child
    that dies before answering raises SystemExit with its exit code (no endless wait)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, out))
    proc.start()
    while True:
        try:
            result = out.get(timeout=1.0)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise SystemExit(f"{target.__name__} failed with exit code {proc.exitcode}") from None
    proc.join()
    return result
