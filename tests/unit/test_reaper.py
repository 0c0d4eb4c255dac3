"""The reaper's protocol (offline/reaper.py): what it stops when its input ends."""

from __future__ import annotations

from offline import reaper
from offline.launcher import STOP_WAVES, service_kind


def lines(*raw: bytes) -> list[str]:
    return [line for chunk in raw for line in chunk.decode().splitlines(True)]


def test_a_launcher_that_dies_leaves_its_registered_groups_to_stop() -> None:
    groups, clean = reaper.read_groups(lines(
        reaper.register_line(100, "redis"), reaper.register_line(101, "engine0"),
        reaper.register_line(102, "worker0"), reaper.forget_line(101),
        reaper.register_line(103, "engine0")))
    assert not clean
    assert groups == {100: "redis", 102: "worker0", 103: "engine0"}


def test_a_clean_stop_says_bye_and_nothing_is_stopped() -> None:
    groups, clean = reaper.read_groups(lines(reaper.register_line(7, "ingress"), b"bye\n",
                                             reaper.register_line(8, "worker0")))
    assert clean and groups == {7: "ingress"}


def test_garbage_is_skipped_not_fatal() -> None:
    groups, clean = reaper.read_groups(["not a pid\n", "-x\n", "\n", "12 predictor\n"])
    assert (groups, clean) == ({12: "predictor"}, False)


def test_every_service_has_a_place_in_the_stop_order_and_redis_is_last() -> None:
    names = ["ingress", "predictor", "scheduler0", "scheduler1", "worker0", "worker3",
             "engine0", "engine3", "redis"]
    wave_of = {n: next(i for i, w in enumerate(STOP_WAVES) if service_kind(n) in w)
               for n in names}
    assert wave_of["ingress"] < wave_of["worker0"] < wave_of["engine0"] < wave_of["redis"]
    assert wave_of["scheduler1"] < wave_of["worker3"]
    assert STOP_WAVES[-1] == {reaper.REDIS_NAME}
    assert reaper.SERVICES_GRACE_S + reaper.REDIS_GRACE_S < reaper.REAP_DEADLINE_S
