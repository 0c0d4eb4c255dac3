"""The load benchmark's measuring code: capacity, per-point metrics, SLO and KV pressure."""

from __future__ import annotations

import argparse

import pytest

from bench import load_sweep as ls


def outcome(sent: float, first: float | None, done: float | None, tokens: int = 10,
            prompt: int = 50, status: str = "completed") -> ls.Outcome:
    return ls.Outcome(sent_at=sent, true_tokens=tokens, status=status, input_tokens=prompt,
                      generated_tokens=tokens if done is not None else 0,
                      first_token_at=first, finished_at=done)


ALONE = ls.AloneTime(prompt_tokens=(10, 100), ttft_s=(0.1, 0.2), decode_step_s=0.01)


def test_alone_time_interpolates_prefill_and_adds_a_step_per_further_token() -> None:
    assert ALONE.seconds(55, 1) == pytest.approx(0.15)
    assert ALONE.seconds(10, 11) == pytest.approx(0.1 + 10 * 0.01)


def test_capacity_counts_only_the_steady_window_of_the_closed_loop() -> None:
    # 4 clients; a start-up wave finishing at 1..4 s, then one completion every 0.5 s until the
    # last send at 10 s, then a drain that must not count
    finishes = [1.0, 2.0, 3.0, 4.0] + [4.0 + 0.5 * k for k in range(1, 13)] + [30.0, 40.0]
    outs = [outcome(0.0, None, t) for t in finishes]
    assert ls.capacity_rps(outs, concurrency=4, last_sent=10.0) == pytest.approx(12 / 6.0)


def test_steady_window_counts_the_tokens_generated_inside_it() -> None:
    # four requests decoding 0 -> 4 s (start-up wave), then twelve decoding 2 s each, 20 tokens
    # apiece at 10 tokens/s, finishing every 0.5 s from 4.5 s: the window is 4 -> 10 s
    outs = [outcome(0.0, 0.0, float(t), tokens=40) for t in (1, 2, 3, 4)]
    outs += [outcome(0.0, 2.5 + 0.5 * k, 4.5 + 0.5 * k, tokens=20) for k in range(12)]
    rps, tps = ls.steady_window(outs, concurrency=4, last_sent=10.0)
    assert rps == pytest.approx(12 / 6.0)
    # each request's tokens spread evenly over its decode, counted where it overlaps 4 -> 10 s
    # (the first few began decoding before 4 s); the start-up wave ended by 4 s: none of it
    inside = sum(20 * (min(4.5 + 0.5 * k, 10.0) - max(2.5 + 0.5 * k, 4.0)) / 2.0
                 for k in range(12))
    assert tps == pytest.approx(inside / 6.0)


def test_capacity_refuses_a_loop_that_never_reached_steady_state() -> None:
    outs = [outcome(0.0, None, float(t)) for t in range(1, 8)]
    with pytest.raises(AssertionError):
        ls.capacity_rps(outs, concurrency=4, last_sent=5.0)


def test_summary_metrics_goodput_and_failures() -> None:
    alone_s = ALONE.seconds(50, 10)  # every request's own service time
    outs = [
        outcome(0.0, 0.1, 0.1 + alone_s),  # at once: slowdown ~1, good
        outcome(1.0, 1.2, 1.0 + 10 * alone_s),  # slowdown 10: misses the SLO
        outcome(2.0, 13.0, 13.5),  # TTFT 11 s: misses the SLO
        outcome(3.0, None, None, status="failed"),
    ]
    p = ls.summarise("magnus", "continuous", "poisson", "full", 1.0, 2.0, outs, ALONE, 3.0, 20.0)
    assert (p.requests, p.completed) == (4, 3)
    span = 13.5 - 0.0
    assert p.throughput_rps == pytest.approx(3 / span)
    assert p.throughput_tps == pytest.approx(30 / span)
    assert p.goodput_rps == pytest.approx(1 / span)
    assert p.slo_attained == pytest.approx(1 / 4)  # failures count against attainment
    assert p.max_slowdown == pytest.approx(11.5 / alone_s)
    assert p.mean_e2e_s == pytest.approx((alone_s + 0.1 + 10 * alone_s + 11.5) / 3)
    assert p.mean_ttft_s == pytest.approx((0.1 + 0.2 + 11.0) / 3)
    assert p.mean_tpot_s == pytest.approx(((alone_s) / 9 + (10 * alone_s - 0.2) / 9 + 0.5 / 9) / 3)
    row = p.row()
    for key in ("policy", "mode", "arrivals", "load", "rate", "requests", "completed",
                "throughput_rps", "throughput_tps", "mean_ttft_s", "mean_e2e_s", "p50_e2e_s",
                "p99_e2e_s", "goodput_rps"):
        assert key in row
    assert "outcomes" not in row


def test_saturation_on_the_fitted_step_time_reaches_its_share_of_peak_throughput() -> None:
    a, b, k, ctx, share = 5.8e-3, 1.66e-5, 2.82e-8, 200.0, 0.97
    batch = ls.saturation_on_model(a, b, k, ctx, share)
    per_seq = b + k * ctx
    throughput = batch / (a + batch * per_seq)
    assert throughput == pytest.approx(share / per_seq)


def test_kv_pressure_carries_the_gpu_ratio_to_this_engine() -> None:
    p = ls.kv_pressure(150.0)
    assert p.ratio == pytest.approx(p.gpu_kv_tokens / (p.gpu_saturation * 150.0))
    assert p.cut_kv_tokens == int(p.ratio * p.cpu_saturation * 150.0)
    # a longer context needs more KV per sequence: the cache binds sooner on the GPU
    assert ls.kv_pressure(600.0).ratio < p.ratio


def plans(argv: list[str]) -> list[ls.Plan]:
    parser = argparse.Namespace(
        loads="0.3,1.0,1.5", arrivals="poisson", long=False, bursty_load=1.5,
        policies="vllm-direct,vllm-priority,prompt-hrrn,magnus,magnus-oracle",
        cut_policies="vllm-direct,magnus,magnus-oracle", no_cut=False, no_static=False,
        static_points="burst", static_policies="fcfs-fixed,magnus,magnus-oracle")
    for arg in argv:
        key, value = arg.split("=")
        setattr(parser, key, value)
    return ls.default_plans(parser)


def test_default_plans_split_engines_by_configuration() -> None:
    got = plans([])
    by = {(p.mode, p.kv, p.engine_priority): p for p in got}
    full = by[("continuous", "full", False)]
    assert full.policies == ("vllm-direct", "prompt-hrrn", "magnus", "magnus-oracle")
    assert full.points == (("poisson", 0.3), ("poisson", 1.0), ("poisson", 1.5))
    # vLLM's priority scheduling needs an engine started with it
    assert by[("continuous", "full", True)].policies == ("vllm-priority",)
    cut = by[("continuous", "cut", False)]
    assert cut.points == (("poisson", 1.5),)
    assert cut.policies == ("vllm-direct", "magnus", "magnus-oracle")
    assert by[("static", "full", False)].points == (("burst", 0.0),)


def test_a_policy_with_the_compared_predictor_runs_beside_the_same_policy() -> None:
    got = plans(["policies=vllm-direct,magnus,magnus@compare,vllm-priority@compare",
                 "no_cut=True", "static_policies=magnus@compare,magnus"])
    by = {(p.mode, p.kv, p.engine_priority): p for p in got}
    # "@compare" only swaps the predictor: the engine configuration follows the base policy.
    assert by[("continuous", "full", False)].policies == (
        "vllm-direct", "magnus", "magnus@compare")
    assert by[("continuous", "full", True)].policies == ("vllm-priority@compare",)
    assert by[("static", "full", False)].policies == ("magnus@compare", "magnus")
    assert ls.base_policy("magnus@compare") == "magnus" and ls.base_policy("magnus") == "magnus"


def test_arrival_seeds_do_not_depend_on_the_process() -> None:
    # str hash() is salted per process; the sample each point draws must not be
    assert set(ls.ARRIVAL_SEEDS) == {"poisson", "gamma", "azure", "burst"}
    a = ls.arrivals("gamma", 2.0, 50, 7)
    assert a == ls.arrivals("gamma", 2.0, 50, 7) and len(a) == 50
    assert ls.arrivals("burst", 0.0, 5, 0) == [0.0] * 5
    with pytest.raises(ValueError):
        ls.arrivals("nope", 1.0, 5, 0)
