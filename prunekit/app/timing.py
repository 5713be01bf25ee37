"""Timing several prepared models side by side (framework-free; the backends prepare the calls).

``time_side_by_side(calls, warmup, repeats, rounds)`` takes one zero-argument callable per model,
each running one batch and returning only once the result exists (a backend synchronises its
device inside). Every callable first runs ``warmup`` times untimed; then ``rounds`` rounds each
time ``repeats`` calls of every callable in turn, so a slow spell of a shared machine falls on all
models alike. Returns per callable its median and fastest time in milliseconds and the count.

``time_handles(handles, batch, deploy, prepare, ...)`` is the body of every backend's
``time_inference``: the models in eval mode (each train flag restored after), one call per
model prepared by the backend, timed side by side.
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Callable, ContextManager, List, Sequence


def time_side_by_side(calls: Sequence[Callable[[], object]], warmup: int = 2, repeats: int = 5,
                      rounds: int = 1) -> List[dict]:
    for call in calls:
        for _ in range(max(0, int(warmup))):
            call()
    times: List[List[float]] = [[] for _ in calls]
    for _ in range(max(1, int(rounds))):
        for i, call in enumerate(calls):
            for _ in range(max(1, int(repeats))):
                t0 = time.perf_counter()
                call()
                times[i].append(time.perf_counter() - t0)
    return [{"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "timed": len(t)} for t in times]


def time_handles(handles: Sequence, batch: int, deploy: str, prepare: Callable[[object], Callable[[], object]],
                 warmup: int = 2, repeats: int = 5, rounds: int = 1,
                 context: Callable[[], ContextManager] = nullcontext) -> List[dict]:
    """:func:`time_side_by_side` of model handles in eval mode: ``prepare(handle)`` returns the
    zero-argument call running one batch of ``batch`` on that model, and is called, like the
    timing, inside ``context()`` (e.g. no gradients). Each figure carries ``batch`` and ``deploy``."""
    modes = [h.set_training(False) for h in handles]
    try:
        with context():
            stats = time_side_by_side([prepare(h) for h in handles], warmup, repeats, rounds)
    finally:
        for h, mode in zip(handles, modes):
            h.set_training(mode)
    return [{**t, "batch": int(batch), "deploy": deploy} for t in stats]
