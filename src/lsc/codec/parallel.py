"""Entropy decoding of a file's tensors in worker processes.

constriction's ANS decoder costs ~10-30 ns per symbol and holds the GIL while it
runs, so on a 22M-parameter model it is most of the decode time and threads
cannot overlap it. Here forked worker processes decode whole tensors (side
information and ANS stream) straight into one anonymous shared memory map, while
the parent turns finished tensors into weights. Results are identical to the
serial decoder: the same :func:`~lsc.codec.entropy.decode_positions` runs, only
elsewhere.

The caller decodes a share itself (see :class:`StreamDecoder`), so ``workers=N``
forks N - 1 processes. Used only where it pays and is safe: Linux (``fork``), more than one usable CPU,
and at least :data:`MIN_PARALLEL_SYMBOLS` symbols. Anything that stops the pool
(a daemonic caller that may not fork, a worker killed by the OS) falls back to
decoding in the parent. Workers run NumPy and constriction only, never torch, so
forking a process that has torch threads is harmless.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import mmap
import multiprocessing
import os
import sys
import threading
import warnings

import numpy as np

from ..errors import LscFormatError, format_errors
from .entropy import GroupStream, decode_positions

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


def _decode_job(job, out=None, segment=None, stream=None):
    """Decode one job (or one ANS segment of it) here; every failure becomes LscFormatError naming the tensor.
    ``stream``: the job's :class:`GroupStream` from :func:`_parsed`, when several segments are decoded."""
    side, ans, P, nb, order, bounds, what, segments, classes, units = job
    return format_errors(what, decode_positions, side, ans, P, nb, order, bounds, what, segments, segment, out=out,
                         classes=classes, units=units, stream=stream)


def _parsed(job) -> GroupStream:
    """The job's side information, parsed once for all the segments one process decodes (with row
    classes it is ~15 ms for MiniLM's table: six segments would pay it six times)."""
    side, ans, P, nb, order, bounds, what, segments, classes, units = job
    return format_errors(what, GroupStream, side, ans, P, nb, bounds, what, segments, classes, units)


def _shared_view(shared, offset: int, P: int, nb: int) -> np.ndarray:
    return np.frombuffer(shared, dtype=np.int32, count=P * nb, offset=offset).reshape(P, nb)


_PARSED: dict[tuple[int, int], GroupStream] = {}  # worker side: (token, job) -> its parsed stream


def _work(token: int, j: int, segment):
    """Worker side: decode job j (or one segment) into its rows of the shared map -> (exponents, fitted)."""
    jobs, shared, offsets = _JOBS[token]
    out = _shared_view(shared, offsets[j], jobs[j][2], jobs[j][3])
    stream = None
    if segment is not None:
        if (token, j) not in _PARSED:
            for key in [k for k in _PARSED if k[0] != token]:  # a later decoder's workers: drop older ones
                del _PARSED[key]
            _PARSED[(token, j)] = _parsed(jobs[j])
        stream = _PARSED[(token, j)]
    q, e = _decode_job(jobs[j], out=out, segment=segment, stream=stream)
    return e, q is out  # False: values beyond int32, the caller decodes this tensor itself


def _stop(pool) -> None:
    """Stop a pool whose start failed: kill and reap the workers it did fork (``shutdown`` alone leaves them
    blocked on the call queue when its manager thread never started, and the interpreter then waits for
    them forever at exit)."""
    if pool is None:
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.kill()
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(5)
    with contextlib.suppress(Exception):
        pool.shutdown(wait=False, cancel_futures=True)


class StreamDecoder:
    """Decodes a list of jobs ``(side, ans, P, nb, order, bounds, name, segments, classes, units)``;
    :meth:`get` returns ``(q, e)``.

    ``q`` is (P, nb) in row-major position order (int32, or int64 when values need it),
    ``e`` the (P,) int64 exponents. The units of work are tensors, or the ANS segments of
    big ones. With ``workers > 1`` and enough symbols, ``workers - 1`` forked processes
    decode their share of the units in the background from construction on and the caller
    decodes the rest while iterating :meth:`completed` (its share is smaller: it also
    rebuilds every weight), so every core works and none is oversubscribed. Otherwise
    :meth:`get` decodes in the caller. Use as a context manager so the workers always stop.
    """

    # Cost model (fit on MiniLM files of 12.5 and 23.3 MB, one core): entropy decoding costs one
    # unit per symbol plus BIT_COST per coded bit (~11 ns per unit); rebuilding a weight in the
    # caller REBUILD_COST units per element (position-major separable rebuild, ~7 ns per element).
    BIT_COST = 0.33
    REBUILD_COST = 0.65

    def __init__(self, jobs: list, workers: int | None = None):
        self.jobs = jobs
        workers = default_workers() if workers is None else int(workers)
        self._pool = None
        self._remote: dict[int, dict] = {}   # job -> {segment: future}
        self._ready: dict[int, tuple] = {}   # job -> (q, e) decoded here
        self._failed: dict[int, BaseException] = {}
        units = [(j, k) for j, job in enumerate(jobs) for k in (range(len(job[7])) if job[7] else [None])]
        costs = [self._unit_cost(u) for u in units]
        symbols = sum(job[2] * job[3] for job in jobs)
        if workers > 1 and len(units) > 1 and symbols >= MIN_PARALLEL_SYMBOLS:
            self._start(units, costs, min(workers, len(units)), self.REBUILD_COST * symbols)

    def _unit_cost(self, unit) -> float:
        j, k = unit
        side, ans, P, nb, order, bounds, what, segments, _, _ = self.jobs[j]
        if k is None:
            return P * nb + self.BIT_COST * 8 * len(ans)
        G = bounds.size - 1
        g0 = min(max(int(segments[k][0]), 0), G)
        g1 = min(max(int(segments[k + 1][0]), g0), G) if k + 1 < len(segments) else G
        return int(bounds[g1] - bounds[g0]) * nb + self.BIT_COST * 32 * int(segments[k][1])

    @staticmethod
    def _plan(costs: list[float], workers: int, caller_load: float) -> list[bool]:
        """Which units go to worker processes: costliest first onto the least loaded of ``workers``
        bins, bin 0 being the caller, which starts loaded with its rebuilding work."""
        load = [caller_load] + [0.0] * (workers - 1)
        remote = [False] * len(costs)
        for u in sorted(range(len(costs)), key=lambda u: -costs[u]):
            b = min(range(workers), key=load.__getitem__)
            load[b] += costs[u]
            remote[u] = b > 0
        return remote

    def _start(self, units, costs, workers: int, caller_load: float) -> None:
        remote = self._plan(costs, workers, caller_load)
        if not any(remote):
            return
        shared_jobs = sorted({units[u][0] for u in range(len(units)) if remote[u]})
        offsets, total = {}, 0
        for j in shared_jobs:
            offsets[j] = total
            total += 4 * self.jobs[j][2] * self.jobs[j][3]
        try:
            shared = mmap.mmap(-1, max(1, total))  # anonymous + MAP_SHARED: visible to forked children
        except (OSError, ValueError):
            return
        token = next(_TOKENS)
        with _LOCK, warnings.catch_warnings():
            # Python >= 3.12 warns that fork() in a multi-threaded process may deadlock the child; the
            # child runs only NumPy and constriction code, none of which the parent's threads can lock.
            warnings.simplefilter("ignore", DeprecationWarning)
            _JOBS[token] = (self.jobs, shared, offsets)
            pool = None
            try:
                pool = cf.ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("fork"))
                # the first submit forks every worker (fork start method): they inherit _JOBS[token]
                for u in sorted(range(len(units)), key=lambda u: -costs[u]):  # costliest first
                    if remote[u]:
                        j, k = units[u]
                        self._remote.setdefault(j, {})[k] = pool.submit(_work, token, j, k)
            except (OSError, AssertionError, RuntimeError, ValueError):  # e.g. daemonic caller: no children
                _stop(pool)  # a fork that failed part-way leaves the workers forked before it waiting
                self._remote.clear()
                del _JOBS[token]
                shared.close()
                return
        self._pool, self._shared, self._offsets, self._token = pool, shared, offsets, token
        self._local = [units[u] for u in range(len(units)) if not remote[u]]

    @property
    def parallel(self) -> bool:
        return self._pool is not None

    def completed(self):
        """Every job index once, when its result is available. Parallel: the caller first decodes
        its own units here, then the jobs the workers finish, as they finish."""
        if self._pool is None:
            yield from range(len(self.jobs))
            return
        local: dict[int, list] = {}
        for j, k in self._local:
            local.setdefault(j, []).append(k)
        for j, segs in local.items():
            try:
                if j not in self._remote:  # all of it is ours
                    self._ready[j] = _decode_job(self.jobs[j])
                else:  # our segments go into the shared rows the workers fill too
                    out = _shared_view(self._shared, self._offsets[j], *self.jobs[j][2:4])
                    stream = _parsed(self.jobs[j])
                    for k in segs:
                        q, _ = _decode_job(self.jobs[j], out=out, segment=k, stream=stream)
                        if q is not out:  # values beyond int32: decode it all here, ignore the workers
                            self._ready[j] = _decode_job(self.jobs[j])
                            del self._remote[j]
                            break
            except LscFormatError as exc:
                self._failed[j] = exc
            if j not in self._remote:
                yield j
        waiting = {f: j for j, futs in self._remote.items() for f in futs.values()}
        left = {j: len(futs) for j, futs in self._remote.items()}
        for f in cf.as_completed(list(waiting)):
            j = waiting[f]
            left[j] -= 1
            if not left[j]:
                yield j

    def get(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (q, e) of job j (decodes here when serial, or when its worker could not)."""
        if j in self._failed:
            raise self._failed[j]
        futs = self._remote.get(j)
        if not futs:
            return self._ready[j] if j in self._ready else _decode_job(self.jobs[j])
        e = None
        try:
            for f in futs.values():
                e, fitted = f.result()
                if not fitted:
                    return _decode_job(self.jobs[j])
        except LscFormatError:
            raise
        except cf.process.BrokenProcessPool:  # a worker died (killed by the OS?): finish here
            self.close()
            return _decode_job(self.jobs[j])
        except Exception:  # anything else the pool itself hit: decode this job here
            return _decode_job(self.jobs[j])
        return _shared_view(self._shared, self._offsets[j], *self.jobs[j][2:4]), e

    def close(self) -> None:
        if self._pool is not None:
            for futs in self._remote.values():
                for f in futs.values():
                    f.cancel()
            self._pool.shutdown(wait=False)  # idle workers exit on their own; nothing to wait for
            self._pool = None
            _JOBS.pop(self._token, None)
        # the shared map is released when the last array viewing it is gone

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
