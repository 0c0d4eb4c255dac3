"""The launcher's reaper: a small process whose only job is to stop what the launcher started
if the launcher dies without stopping it (SIGKILL, the OOM killer, a crash).

    python -m offline.reaper   (stdin: the read end of a pipe only the launcher writes)

Why a process of its own: `PR_SET_PDEATHSIG` fires when the *thread* that spawned a child exits
(the launcher's supervisor thread, which restarts services, exits at every stop: it killed the
restarted engine and Redis first), reaches only direct children (not vLLM's engine core nor its
resource tracker), and a Celery worker answers its SIGTERM with a warm shutdown that waits on a
dead Redis for minutes. A pipe closes when its last writer is gone, whatever killed it.

The protocol, one line per write (a write of under PIPE_BUF bytes to a pipe is atomic, so the
launcher's threads and its forked children never interleave):

    <pgid> <name>   a process group to stop (written by each child itself, after fork and before
                    exec: no window in which the launcher could die with a child unregistered)
    -<pgid>         the launcher stopped that group itself (forget it: pids are reused)
    bye             the launcher stopped cleanly: exit without touching anything

End of input without `bye`: the launcher is gone. Every known group gets SIGTERM, then SIGKILL
after `SERVICES_GRACE_S`; Redis last (its SIGTERM writes the append-only file), so everything is
gone within `REAP_DEADLINE_S`. Standard library only: it must start in milliseconds and cannot
fail on an import.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator

# Services (workers included: their batches run again after the next start) get this long after
# SIGTERM, Redis this long after them; the total stays under REAP_DEADLINE_S.
SERVICES_GRACE_S = 2.0
REDIS_GRACE_S = 1.5
REAP_DEADLINE_S = 5.0
assert SERVICES_GRACE_S + REDIS_GRACE_S + 1.0 <= REAP_DEADLINE_S
BYE = "bye"
# The name the launcher gives its Redis (stopped last: everything else writes to it).
REDIS_NAME = "redis"


def register_line(pgid: int, name: str) -> bytes:
    assert " " not in name and "\n" not in name, name
    return f"{pgid} {name}\n".encode()


def forget_line(pgid: int) -> bytes:
    return f"-{pgid}\n".encode()


def read_groups(lines: Iterable[str]) -> tuple[dict[int, str], bool]:
    """The groups still registered when the input ends, and whether it ended with `bye`."""
    groups: dict[int, str] = {}
    for raw in lines:
        line = raw.strip()
        if line == BYE:
            return groups, True
        if line.startswith("-"):
            with contextlib.suppress(ValueError):
                groups.pop(int(line[1:]), None)
            continue
        pgid, _, name = line.partition(" ")
        with contextlib.suppress(ValueError):
            groups[int(pgid)] = name
    return groups, False


def _members(pgids: set[int]) -> Iterator[int]:
    """Pids of live (not zombie) processes in any of `pgids`: a killed process whose parent
    (the dead launcher) can no longer reap it stays a zombie, which is gone for our purposes."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces: the fields after its ')' are fixed.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) in pgids:
            yield int(entry)


def _signal_groups(pgids: set[int], sig: int) -> None:
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def stop_groups(pgids: set[int], grace_s: float) -> None:
    """SIGTERM every group, SIGKILL what is left after `grace_s`."""
    if not pgids:
        return
    _signal_groups(pgids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(True for _ in _members(pgids)):
        time.sleep(0.05)
    _signal_groups(pgids, signal.SIGKILL)


def reap(groups: dict[int, str]) -> None:
    services = {pgid for pgid, name in groups.items() if name != REDIS_NAME}
    stop_groups(services, SERVICES_GRACE_S)
    stop_groups({pgid for pgid, name in groups.items() if name == REDIS_NAME}, REDIS_GRACE_S)


def main() -> int:
    # In a session of its own (the launcher starts it so): a terminal's Ctrl-C is the launcher's
    # to handle, and the reaper must outlive it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups, clean = read_groups(sys.stdin)
    if clean:
        return 0
    print(f"reaper: the launcher is gone; stopping {len(groups)} process groups: "
          f"{sorted(groups.values())}", flush=True)
    reap(groups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
