"""When the launcher restarts a service that died: a pure decision over its recent deaths.

A service is restarted after a backoff that doubles with each further death inside the window
(1 s, 2 s, 4 s ... up to a cap), so a crash loop does not spin; one that dies more than
`max_restarts` times inside the window keeps dying for a reason a restart will not fix, and the
stack stops and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.settings import LauncherSettings


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    window_s: float = 300.0
    max_restarts: int = 5

    def __post_init__(self) -> None:
        assert self.backoff_s > 0 and self.backoff_max_s >= self.backoff_s
        assert self.window_s > 0 and self.max_restarts >= 0

    @classmethod
    def from_settings(cls, s: LauncherSettings) -> RestartPolicy:
        return cls(s.restart_backoff_s, max(s.restart_backoff_max_s, s.restart_backoff_s),
                   s.restart_window_s, s.max_restarts)

    def delay_s(self, deaths: Sequence[float], now: float) -> float | None:
        """Seconds until the restart of a service that died at the times `deaths` (monotonic,
        the latest included), or None: it died more than `max_restarts` times within
        `window_s`, give up."""
        recent = sum(1 for t in deaths if now - t <= self.window_s)
        if recent == 0:
            return 0.0
        if recent > self.max_restarts:
            return None
        return float(min(self.backoff_s * 2 ** (recent - 1), self.backoff_max_s))
