"""Fair shares across tenants: which tenant's waiting requests the next batches come from. Pure.

Virtual token counters (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024):
each tenant's counter is the service it has been given, in tokens (prompt + predicted output of
what was dispatched for it) divided by its weight. The next batch is formed from the waiting
requests of the backlogged tenant with the smallest counter, so over time each backlogged
tenant gets service in proportion to its weight, whatever the others submit. A tenant that was
idle rejoins at the smallest counter of the backlogged tenants (never below it), so it cannot
bank idle time and then starve the others. Within the chosen tenant, the policy's own order
(HRRN over length-sorted batches for `magnus`) decides as before; with one tenant waiting
nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class VirtualCounters:
    counters: dict[str, float] = field(default_factory=dict)
    # Service given since the tenant (re)joined, the tie-break: a tenant lifted to the floor
    # has been given less than the tenant it ties with.
    given: dict[str, float] = field(default_factory=dict)

    def choose(self, backlogged: Iterable[str]) -> str | None:
        """The backlogged tenant to serve next; None when nobody waits. A tenant seen for the
        first time, or back from idle, is lifted to the smallest counter among the backlogged,
        and wins ties at that counter until it is served: otherwise a flood named earlier in
        the alphabet would take every tie from a light tenant that comes and goes. Remaining
        ties go by name, so the choice is reproducible."""
        waiting = sorted(set(backlogged))
        if not waiting:
            return None
        known = [self.counters[t] for t in waiting if t in self.counters]
        floor = min(known) if known else 0.0
        for t in waiting:
            self.counters[t] = max(self.counters.get(t, floor), floor)
        return min(waiting, key=lambda t: (self.counters[t], self.given.get(t, 0.0), t))

    def charge(self, tenant: str, tokens: int, weight: float) -> None:
        """Count `tokens` of service given to `tenant`."""
        assert tokens >= 0 and weight > 0, "service and weights are positive"
        self.counters[tenant] = self.counters.get(tenant, 0.0) + tokens / weight
        self.given[tenant] = self.given.get(tenant, 0.0) + tokens / weight

    def forget_idle(self, backlogged: Iterable[str], in_flight: Mapping[str, int]) -> None:
        """Drop the counters of tenants with nothing waiting and nothing in flight: when they
        come back they rejoin at the floor (`choose`)."""
        active = set(backlogged) | {t for t, n in in_flight.items() if n > 0}
        for t in list(self.counters):
            if t not in active:
                del self.counters[t]
                self.given.pop(t, None)


def staging_depth(configured: int, active_tenants: int, fair_share: bool) -> int:
    """How many batches a static GPU may hold queued behind its running one. A staged batch is
    a choice made before the GPU frees: while two or more tenants are active (waiting or in
    flight) it would commit the GPU to whoever was chosen then, and a light tenant's request
    arriving meanwhile would wait for that batch as well as the running one. So with fair
    sharing and several active tenants nothing is staged and the next batch is chosen when the
    GPU frees (the gap is a dispatch, tens of milliseconds, against batches of seconds)."""
    assert configured >= 0 and active_tenants >= 0, "negative staging or tenants"
    return 0 if fair_share and active_tenants > 1 else configured

