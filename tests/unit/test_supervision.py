"""The launcher's restart policy: backoff that doubles with each death in the window, and
giving up on a service that keeps dying."""

from __future__ import annotations

import pytest

from offline.supervision import RestartPolicy
from shared.settings import LauncherSettings

POLICY = RestartPolicy(backoff_s=1.0, backoff_max_s=5.0, window_s=60.0, max_restarts=4)


def test_first_death_restarts_after_the_base_backoff() -> None:
    assert POLICY.delay_s([100.0], now=100.0) == 1.0


def test_backoff_doubles_with_each_death_in_the_window_up_to_the_cap() -> None:
    assert POLICY.delay_s([10.0, 20.0], now=20.0) == 2.0
    assert POLICY.delay_s([10.0, 20.0, 30.0], now=30.0) == 4.0
    assert POLICY.delay_s([10.0, 20.0, 30.0, 40.0], now=40.0) == 5.0  # capped


def test_deaths_outside_the_window_are_forgiven() -> None:
    # three deaths long ago and one now: a fresh first death
    assert POLICY.delay_s([0.0, 1.0, 2.0, 500.0], now=500.0) == 1.0


def test_a_service_that_keeps_dying_is_given_up() -> None:
    deaths = [10.0, 11.0, 12.0, 13.0, 14.0]  # five within a minute, four allowed
    assert POLICY.delay_s(deaths, now=14.0) is None
    assert POLICY.delay_s(deaths[:4], now=13.0) is not None


def test_no_restarts_allowed_gives_up_at_once() -> None:
    assert RestartPolicy(max_restarts=0).delay_s([5.0], now=5.0) is None


def test_from_settings_and_invalid_policies() -> None:
    s = LauncherSettings(restart_backoff_s=2.0, restart_backoff_max_s=8.0, restart_window_s=30.0,
                         max_restarts=3)
    assert RestartPolicy.from_settings(s) == RestartPolicy(2.0, 8.0, 30.0, 3)
    with pytest.raises(AssertionError):
        RestartPolicy(backoff_s=5.0, backoff_max_s=1.0)
