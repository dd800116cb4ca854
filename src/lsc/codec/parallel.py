"""Entropy decoding of a file's tensors in worker processes.

constriction's ANS decoder costs ~10-30 ns per symbol and holds the GIL while it
runs, so on a 22M-parameter model it is most of the decode time and threads
cannot overlap it. Here forked worker processes decode whole tensors (side
information and ANS stream) straight into one anonymous shared memory map, while
the parent turns finished tensors into weights. Results are identical to the
serial decoder: the same :func:`~lsc.codec.entropy.decode_positions` runs, only
elsewhere.

Used only where it pays and is safe: Linux (``fork``), more than one usable CPU,
and at least :data:`MIN_PARALLEL_SYMBOLS` symbols. Anything that stops the pool
(a daemonic caller that may not fork, a worker killed by the OS) falls back to
decoding in the parent. Workers run NumPy and constriction only, never torch, so
forking a process that has torch threads is harmless.
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import mmap
import multiprocessing
import os
import sys
import threading
import warnings

import numpy as np

from ..errors import LscFormatError
from .entropy import decode_positions

__all__ = ["MIN_PARALLEL_SYMBOLS", "default_workers", "StreamDecoder"]

MIN_PARALLEL_SYMBOLS = 1 << 22   # below ~4M symbols forking costs about what it saves
MAX_WORKERS = 8

# Jobs of the decoders in flight, keyed by token: workers are forked after their
# decoder registered here, so they see them without pickling any stream.
_JOBS: dict[int, tuple] = {}
_LOCK = threading.Lock()
_TOKENS = itertools.count()


def default_workers() -> int:
    """Worker processes used by default: the CPUs this process may run on (at most 8), 1 off Linux."""
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - sched_getaffinity exists on Linux
        n = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, n))


def _decode_job(job, out=None):
    """Decode one job in the current process; every failure becomes LscFormatError naming the tensor."""
    side, ans, P, nb, order, bounds, what = job
    try:
        return decode_positions(side, ans, P, nb, order, bounds, what, out=out)
    except LscFormatError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # constriction can raise (or panic) on crafted data
        raise LscFormatError(f"{what}: cannot decode ({type(exc).__name__}: {exc})") from None


def _work(token: int, i: int):
    """Worker side: decode job i into its slice of the shared map; return what did not go there."""
    jobs, shared, offsets = _JOBS[token]
    side, ans, P, nb, order, bounds, what = jobs[i]
    out = np.frombuffer(shared, dtype=np.int32, count=P * nb, offset=offsets[i]).reshape(P, nb)
    q, e = _decode_job(jobs[i], out=out)
    return e, (None if q is out else q)  # int64 tensors (values beyond int32) come back by pipe


class StreamDecoder:
    """Decodes a list of jobs ``(side, ans, P, nb, order, bounds, name)``; :meth:`get` returns ``(q, e)``.

    ``q`` is (P, nb) in row-major position order (int32, or int64 when values need it),
    ``e`` the (P,) int64 exponents. With ``workers > 1`` and enough symbols the jobs run in
    forked processes in the background from construction on; otherwise :meth:`get`
    decodes in the caller. Use as a context manager so the workers always stop.
    """

    def __init__(self, jobs: list, workers: int | None = None):
        self.jobs = jobs
        workers = default_workers() if workers is None else int(workers)
        symbols = sum(j[2] * j[3] for j in jobs)
        self._pool = self._futures = self._shared = None
        if workers > 1 and len(jobs) > 1 and symbols >= MIN_PARALLEL_SYMBOLS:
            self._start(min(workers, len(jobs)))

    def _start(self, workers: int) -> None:
        sizes = [4 * j[2] * j[3] for j in self.jobs]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        try:
            shared = mmap.mmap(-1, max(1, sum(sizes)))  # anonymous + MAP_SHARED: visible to forked children
        except (OSError, ValueError):
            return
        token = next(_TOKENS)
        with _LOCK, warnings.catch_warnings():
            # Python >= 3.12 warns that fork() in a multi-threaded process may deadlock the child; the
            # child runs only NumPy and constriction code, none of which the parent's threads can lock.
            warnings.simplefilter("ignore", DeprecationWarning)
            _JOBS[token] = (self.jobs, shared, offsets)
            try:
                pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
                # the first submit forks every worker (fork start method): they inherit _JOBS[token]
                futures = [pool.submit(_work, token, i) for i in range(len(self.jobs))]
            except (OSError, AssertionError, RuntimeError, ValueError):  # e.g. daemonic caller: no children
                del _JOBS[token]
                shared.close()
                return
        self._pool, self._futures, self._shared, self._offsets, self._token = pool, futures, shared, offsets, token

    @property
    def parallel(self) -> bool:
        return self._pool is not None

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (q, e) of job i (waits for its worker; decodes here when serial or the pool broke)."""
        if self._pool is not None:
            try:
                e, q = self._futures[i].result()
            except LscFormatError:
                raise
            except cf.process.BrokenProcessPool:  # a worker died (killed by the OS?): finish here
                self.close()
            except Exception:  # anything else the pool itself hit: decode this job here
                pass
            else:
                if q is None:
                    P, nb = self.jobs[i][2], self.jobs[i][3]
                    q = np.frombuffer(self._shared, dtype=np.int32, count=P * nb,
                                      offset=self._offsets[i]).reshape(P, nb)
                return q, e
        return _decode_job(self.jobs[i])

    def close(self) -> None:
        if self._pool is not None:
            for f in self._futures:
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
            _JOBS.pop(self._token, None)
        # the shared map is released when the last array viewing it is gone

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
