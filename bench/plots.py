"""The benchmark figures, one definition for the real stack and the simulator: a response-time
CDF per engine mode, and throughput and mean response time against arrival rate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.metrics import Outcome, RunSummary


def response_times(outcomes: Sequence[Outcome]) -> list[float]:
    """Sorted response times of the requests that completed."""
    return sorted(o.finished_at - o.arrived_at for o in outcomes
                  if o.finished_at is not None and o.status == "completed")


def plot_cdf(summaries: Sequence[RunSummary], responses: Sequence[Sequence[float]], title: str,
             path: Path) -> None:
    """One panel per engine mode present; `responses[i]` are run i's response times. With
    several rates only the highest is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(s.rate_per_s for s in summaries)
    modes = [m for m in ("static", "continuous") if any(s.mode == m for s in summaries)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), sharey=True,
                             squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for s, resp in zip(summaries, responses, strict=True):
            if s.mode != mode or s.rate_per_s != top:
                continue
            times = sorted(resp)
            if not times:
                continue
            y = np.arange(1, len(times) + 1) / len(times)
            ax.plot(times, y, label=s.policy)
        ax.set_xscale("log")
        ax.set_xlabel("response time (s, log)")
        ax.set_title(f"{title}: {mode}, {top:g} req/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("share of requests")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_rate(summaries: Sequence[RunSummary], title: str, path: Path) -> None:
    """Throughput (left) and mean response time (right) against arrival rate, one line per
    (policy, mode): solid circles static, dashed squares continuous."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy, mode in sorted({(s.policy, s.mode) for s in summaries}):
        line = sorted((s for s in summaries if (s.policy, s.mode) == (policy, mode)),
                      key=lambda s: s.rate_per_s)
        rates = [s.rate_per_s for s in line]
        style, marker = ("-", "o") if mode == "static" else ("--", "s")
        left.plot(rates, [s.request_throughput for s in line], style, marker=marker,
                  label=f"{policy} ({mode})", alpha=0.85)
        right.plot(rates, [s.mean_response_s for s in line], style, marker=marker,
                   label=f"{policy} ({mode})", alpha=0.85)
    left.set_xlabel("arrival rate (req/s)")
    left.set_ylabel("throughput (req/s)")
    right.set_xlabel("arrival rate (req/s)")
    right.set_ylabel("mean response time (s, log)")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
