"""Arrival processes for replaying the workload: Poisson, bursty (gamma), or a rescaled Azure
trace window."""

from __future__ import annotations

import csv
import functools
import gzip
import math
import random
from pathlib import Path

from offline.workload.catalog import ARRIVALS_FILE, DEFAULT_DIR

DEFAULT_TRACE = DEFAULT_DIR / ARRIVALS_FILE


def _check(rate_per_s: float, n: int) -> None:
    if not (isinstance(rate_per_s, int | float) and math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s must be a finite number > 0, got {rate_per_s!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")


def poisson_arrivals(rate_per_s: float, n: int, seed: int) -> list[float]:
    """``n`` sorted arrival offsets (s) of a Poisson process with mean rate ``rate_per_s``."""
    _check(rate_per_s, n)
    rng = random.Random(seed)
    arrivals: list[float] = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        arrivals.append(t)
    return arrivals


def gamma_arrivals(rate_per_s: float, n: int, seed: int, cv: float = 2.0) -> list[float]:
    """``n`` sorted arrival offsets (s) with gamma-distributed gaps: mean rate ``rate_per_s`` and
    coefficient of variation ``cv`` (1 is Poisson; larger is burstier: `vllm bench serve`'s
    --burstiness is 1 / cv^2)."""
    _check(rate_per_s, n)
    if not (math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be a finite number > 0, got {cv!r}")
    shape = 1.0 / cv**2
    rng = random.Random(seed)
    arrivals: list[float] = []
    t = 0.0
    for _ in range(n):
        t += rng.gammavariate(shape, 1.0 / (rate_per_s * shape))
        arrivals.append(t)
    return arrivals


@functools.lru_cache(maxsize=4)
def _trace(path: Path) -> tuple[float, ...]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        return tuple(sorted(float(row["arrival_s"]) for row in csv.DictReader(f)))


def azure_trace_arrivals(
    rate_per_s: float, n: int, seed: int = 0, path: Path = DEFAULT_TRACE
) -> list[float]:
    """``n`` consecutive arrivals of the Azure trace, starting at 0 and rescaled in time.

    The window start is drawn from ``seed``. Time is scaled so that the mean rate, (n - 1) gaps
    over the window's span, equals ``rate_per_s``; relative gaps, hence burstiness, are kept.
    """
    _check(rate_per_s, n)
    if n == 0:
        return []
    trace = _trace(path)
    if n > len(trace):
        raise ValueError(f"n must be <= {len(trace)} (arrivals in {path.name}), got {n}")
    start = random.Random(seed).randrange(len(trace) - n + 1)
    window = trace[start : start + n]
    span = window[-1] - window[0]
    if span <= 0:  # n == 1, or all arrivals in one millisecond: no gaps left to rescale
        return [i / rate_per_s for i in range(n)]
    scale = (n - 1) / (rate_per_s * span)
    return [(t - window[0]) * scale for t in window]
