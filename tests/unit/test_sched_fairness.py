"""Virtual token counters: service in proportion to weight, no banking of idle time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.fairness import VirtualCounters, staging_depth


def serve(counters: VirtualCounters, weights: dict[str, float], rounds: int,
          cost: dict[str, int]) -> dict[str, int]:
    """Every tenant always backlogged; each round one batch of `cost[t]` tokens for the chosen."""
    served = dict.fromkeys(weights, 0)
    for _ in range(rounds):
        t = counters.choose(weights)
        assert t is not None
        counters.charge(t, cost[t], weights[t])
        served[t] += cost[t]
    return served


def test_backlogged_tenants_get_service_in_proportion_to_their_weights() -> None:
    served = serve(VirtualCounters(), {"a": 1.0, "b": 3.0}, 400, {"a": 100, "b": 100})
    assert abs(served["b"] / served["a"] - 3.0) < 0.1


def test_a_tenant_with_long_requests_does_not_get_more_tokens() -> None:
    # Equal weights: the one whose batches cost 10x gets about 1/10 of the batches.
    served = serve(VirtualCounters(), {"big": 1.0, "small": 1.0}, 1100,
                   {"big": 1000, "small": 100})
    assert abs(served["big"] / served["small"] - 1.0) < 0.1


def test_an_idle_tenant_does_not_bank_its_idle_time() -> None:
    counters = VirtualCounters()
    serve(counters, {"a": 1.0}, 50, {"a": 100})  # a alone for a while
    # b arrives: it starts at a's counter, so a is not starved while b "catches up".
    served = serve(counters, {"a": 1.0, "b": 1.0}, 100, {"a": 100, "b": 100})
    assert abs(served["a"] - served["b"]) <= 100


def test_a_tenant_back_from_idle_rejoins_at_the_floor() -> None:
    counters = VirtualCounters()
    serve(counters, {"a": 1.0, "b": 1.0}, 10, {"a": 100, "b": 100})
    counters.forget_idle(backlogged=["a"], in_flight={"b": 0})
    assert "b" not in counters.counters
    serve(counters, {"a": 1.0}, 30, {"a": 100})
    assert counters.choose(["a", "b"]) in ("a", "b")
    assert counters.counters["b"] == counters.counters["a"]


@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
def test_the_choice_is_always_a_backlogged_tenant(backlogged: list[str]) -> None:
    counters = VirtualCounters({"a": 5.0, "z": 0.0})
    assert counters.choose(backlogged) in backlogged
    assert counters.choose([]) is None


def test_nothing_is_staged_while_several_tenants_are_active() -> None:
    assert staging_depth(1, active_tenants=1, fair_share=True) == 1
    assert staging_depth(2, active_tenants=0, fair_share=True) == 2
    assert staging_depth(1, active_tenants=2, fair_share=True) == 0
    assert staging_depth(1, active_tenants=3, fair_share=False) == 1


def test_a_tenant_back_from_idle_wins_the_tie_at_the_floor_until_served() -> None:
    fair = VirtualCounters()
    fair.charge("heavy", 400, 1.0)
    # "heavy" sorts before "light": the tie goes to the newcomer, not to the name.
    assert fair.choose({"heavy", "light"}) == "light"
    assert fair.counters["light"] == fair.counters["heavy"] == 400
    # Still unserved (its batch could not go yet): it keeps the tie.
    assert fair.choose({"heavy", "light"}) == "light"
    fair.charge("light", 40, 1.0)
    assert fair.choose({"heavy", "light"}) == "heavy"
