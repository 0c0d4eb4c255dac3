"""The isolated-engine configuration: the engine's compute on a core of its own, everything else
on the rest, checked while a benchmark runs.

On a GPU host the accelerator is the engine's alone; on this CPU machine the engine's forward
pass runs on the cores the control plane would otherwise take (18% slower per output token beside
it, issue 11), which charges Magnus for its processes twice. Isolation reproduces the GPU host:

- `Isolation.for_machine()`: the engine computes on the last core (vLLM's
  `VLLM_CPU_OMP_THREADS_BIND`, the launcher's `cpu_omp_threads_bind`), every other process runs
  on the others (`service_cpus`: harness, ingress, predictor, schedulers, Celery worker, Redis,
  the engine's API server and helper threads, as a GPU host's CPU runs them).
- The launcher starts each engine with an affinity of both sets (vLLM's Worker cannot bind a
  thread outside its parent's affinity) and pins every other child to the service cores; the
  harness pins itself (`pin_this_process`).
- `settle_engine_threads(stack)`, once the engine serves: every thread of the engine's processes
  not bound to the compute cores (vLLM's Worker binds its OpenMP threads itself, at start) moves
  to the service cores. (Pinning the engine's processes as they appear, instead, pins the Worker
  before it binds and leaves the compute core idle.)
- `CoreWatch`, around a run: samples every thread of the stack and the harness (its affinity,
  the core it last ran on, its CPU time since the last sample) and the kernel's per-core busy
  time; `CoreReport.check` fails the run if anything but the engine's compute threads may run on
  the compute cores, if the compute ran elsewhere, or if anything else (another process on the
  machine included) took more than `MAX_FOREIGN_SHARE` of the compute cores' busy time.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offline.launcher import Stack, service_kind
from shared.settings import LauncherSettings

# Busy time of the compute cores not spent by the engine's compute threads, at most (interrupts,
# the kernel, a process outside the stack).
MAX_FOREIGN_SHARE = 0.10
# Of the compute threads' CPU time, at least this much on their own cores.
MIN_COMPUTE_ON_OWN = 0.95
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class SharedCore(RuntimeError):
    """The engine did not have its core to itself: the run does not measure what it claims."""


def _cpu_list(cores: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


@dataclass(frozen=True)
class Isolation:
    engine_cpus: frozenset[int]
    service_cpus: frozenset[int]

    def __post_init__(self) -> None:
        assert self.engine_cpus and self.service_cpus, "both sets need a core"
        assert not self.engine_cpus & self.service_cpus, "the sets share a core"

    @classmethod
    def for_machine(cls) -> Isolation:
        """The last allowed core for the engine, the others for everything else."""
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            raise SharedCore(f"isolation needs two cores; this process may use {allowed}")
        return cls(frozenset(allowed[-1:]), frozenset(allowed[:-1]))

    def settings(self, settings: LauncherSettings) -> LauncherSettings:
        return settings.model_copy(update={
            "service_cpus": _cpu_list(self.service_cpus),
            "cpu_omp_threads_bind": _cpu_list(self.engine_cpus)})

    def describe(self) -> dict[str, Any]:
        return {"engine_cpus": sorted(self.engine_cpus),
                "service_cpus": sorted(self.service_cpus)}

    def pin_this_process(self) -> None:
        """The harness on the service cores (its threads made later inherit it)."""
        os.sched_setaffinity(0, self.service_cpus)


# --- /proc ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThreadSample:
    pid: int
    tid: int
    cpu_ticks: int  # utime + stime
    last_core: int
    affinity: frozenset[int]


def _thread_sample(pid: int, tid: int) -> ThreadSample | None:
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        affinity = frozenset(os.sched_getaffinity(tid))
    except (OSError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # After the command: field 3 (state) is fields[0]; utime 14, stime 15, processor 39.
    return ThreadSample(pid, tid, int(fields[11]) + int(fields[12]), int(fields[36]), affinity)


def _group_pids(pgids: set[int]) -> dict[int, int]:
    """pid -> pgid of every live process in `pgids`."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()
            if fields[0] != "Z" and int(fields[2]) in pgids:
                out[int(entry)] = int(fields[2])
    return out


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def core_busy_ticks() -> dict[int, int]:
    """Per core, the kernel's busy time so far (user, nice, system, irq, softirq, steal)."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            v = [int(x) for x in values]
            busy[int(name[3:])] = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return busy


def engine_groups(stack: Stack) -> set[int]:
    return {c.proc.pid for c in stack.children if service_kind(c.name) == "engine"}


def settle_engine_threads(stack: Stack, isolation: Isolation) -> int:
    """Move every engine thread not bound to the compute cores to the service cores; how many
    moved. Raises `SharedCore` when no engine thread is bound to the compute cores (the Worker
    did not bind: the run would measure a shared core)."""
    moved, bound = 0, 0
    for pid in _group_pids(engine_groups(stack)):
        for tid in _threads(pid):
            sample = _thread_sample(pid, tid)
            if sample is None:
                continue
            if sample.affinity <= isolation.engine_cpus:
                bound += 1
            elif sample.affinity & isolation.engine_cpus:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, isolation.service_cpus)
                    moved += 1
    if bound == 0:
        raise SharedCore("no engine thread is bound to the compute cores "
                         f"{sorted(isolation.engine_cpus)}: vLLM's Worker did not bind")
    return moved


# --- watching a run -----------------------------------------------------------------------
@dataclass
class CoreReport:
    isolation: Isolation
    seconds: float = 0.0
    # CPU seconds by (role, core): role is engine-compute, engine-other, service or harness.
    cpu_s: dict[str, dict[int, float]] = field(default_factory=dict)
    busy_s: dict[int, float] = field(default_factory=dict)  # the kernel's, per core
    # Threads of the stack or harness that were allowed on the compute cores without being
    # compute threads: "pid/tid role affinity".
    trespassers: list[str] = field(default_factory=list)

    def compute_s(self, on_own: bool | None = None) -> float:
        cores = self.cpu_s.get("engine-compute", {})
        return sum(v for c, v in cores.items()
                   if on_own is None or (c in self.isolation.engine_cpus) == on_own)

    @property
    def compute_own_share(self) -> float:
        total = self.compute_s()
        return self.compute_s(True) / total if total > 0 else 0.0

    @property
    def foreign_share(self) -> float:
        """Of the compute cores' busy time, what the engine's compute did not spend."""
        busy = sum(self.busy_s.get(c, 0.0) for c in self.isolation.engine_cpus)
        return max(0.0, busy - self.compute_s(True)) / busy if busy > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.isolation.describe(), "seconds": round(self.seconds, 1),
                "cpu_s_by_role_and_core": {role: {str(c): round(v, 1)
                                                  for c, v in sorted(cores.items())}
                                           for role, cores in sorted(self.cpu_s.items())},
                "busy_s_by_core": {str(c): round(v, 1) for c, v in sorted(self.busy_s.items())},
                "compute_on_own_cores": round(self.compute_own_share, 4),
                "foreign_share_of_compute_cores": round(self.foreign_share, 4),
                "trespassers": self.trespassers[:20]}

    def check(self) -> None:
        problems = []
        if self.trespassers:
            problems.append(f"{len(self.trespassers)} threads other than the engine's compute "
                            f"may run on its cores: {self.trespassers[:5]}")
        if self.compute_s() <= 0:
            problems.append("the engine's compute threads used no CPU")
        elif self.compute_own_share < MIN_COMPUTE_ON_OWN:
            problems.append(f"the engine computed only {self.compute_own_share:.0%} of its time "
                            "on its own cores")
        if self.foreign_share > MAX_FOREIGN_SHARE:
            problems.append(f"{self.foreign_share:.0%} of the compute cores' busy time was not "
                            "the engine's")
        if problems:
            raise SharedCore("; ".join(problems))

    def line(self) -> str:
        return (f"isolation: engine compute {self.compute_s():.0f} CPU s, "
                f"{self.compute_own_share:.1%} on core(s) {sorted(self.isolation.engine_cpus)}; "
                f"{self.foreign_share:.1%} of those cores' busy time was anything else; "
                f"{len(self.trespassers)} other threads allowed there")


class CoreWatch:
    """Samples the stack's and the harness's threads every `interval_s` while open."""

    def __init__(self, stack: Stack, isolation: Isolation, interval_s: float = 0.5) -> None:
        self.stack, self.isolation, self.interval_s = stack, isolation, interval_s
        self.report = CoreReport(isolation)
        self._last: dict[int, int] = {}  # tid -> cpu ticks at its last sample
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy0: dict[int, int] = {}
        self._t0 = 0.0

    def _role(self, pgid: int | None, sample: ThreadSample, engines: set[int]) -> str:
        if pgid is None:
            return "harness"
        if pgid in engines:
            return ("engine-compute" if sample.affinity <= self.isolation.engine_cpus
                    else "engine-other")
        return "service"

    def sample(self) -> None:
        engines = engine_groups(self.stack)
        pids: dict[int, int | None] = {pid: g for pid, g in _group_pids(
            {c.proc.pid for c in self.stack.children}).items()}
        pids[os.getpid()] = None
        for pid, pgid in pids.items():
            for tid in _threads(pid):
                s = _thread_sample(pid, tid)
                if s is None:
                    continue
                role = self._role(pgid, s, engines)
                delta = s.cpu_ticks - self._last.get(tid, s.cpu_ticks)
                self._last[tid] = s.cpu_ticks
                if delta > 0:
                    cores = self.report.cpu_s.setdefault(role, defaultdict(float))
                    cores[s.last_core] += delta / _CLK_TCK
                if role != "engine-compute" and s.affinity & self.isolation.engine_cpus:
                    note = f"{pid}/{tid} {role} {sorted(s.affinity)}"
                    if note not in self.report.trespassers:
                        self.report.trespassers.append(note)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> CoreWatch:
        self._t0 = time.monotonic()
        self._busy0 = core_busy_ticks()
        self.sample()  # the baseline of every thread's CPU time
        self._thread = threading.Thread(target=self._loop, name="core-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()
        busy = core_busy_ticks()
        self.report.seconds = time.monotonic() - self._t0
        self.report.busy_s = {c: (busy[c] - self._busy0.get(c, 0)) / _CLK_TCK for c in busy}
        self.report.cpu_s = {role: dict(cores) for role, cores in self.report.cpu_s.items()}
