"""The serving-time estimator (services/scheduler/estimator.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.estimator import (
    DEFAULT_COST_MODEL,
    CostModel,
    ServiceRecord,
    ServiceTimeEstimator,
    fit_cost_model,
)
from shared.schemas import BatchRecord


def test_default_cost_model_matches_smollm2_on_two_cpu_cores() -> None:
    one = DEFAULT_COST_MODEL.seconds(1, 0, 100)
    eight = DEFAULT_COST_MODEL.seconds(8, 0, 100)
    assert 30 <= 100 / one <= 40, "about 35 tok/s for one sequence"
    assert 180 <= 8 * 100 / eight <= 220, "about 200 tok/s aggregate at 8 sequences"
    assert DEFAULT_COST_MODEL.seconds(1, 2000, 0) == pytest.approx(1.0), "2000 prefill tok/s"


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 64), st.integers(0, 2000), st.integers(1, 1024))
def test_cold_start_is_monotonic_in_size_and_lengths(size: int, max_input: int,
                                                     max_predicted: int) -> None:
    estimator = ServiceTimeEstimator()
    base = estimator.estimate(size, max_input, max_predicted)
    assert base > 0
    assert estimator.estimate(size + 1, max_input, max_predicted) > base
    assert estimator.estimate(size, max_input + 1, max_predicted) > base
    assert estimator.estimate(size, max_input, max_predicted + 1) > base


def test_cold_start_until_k_records() -> None:
    estimator = ServiceTimeEstimator(k=5)
    for _ in range(4):
        estimator.observe(ServiceRecord(size=4, max_input_tokens=100, max_tokens=50,
                                        measured_s=99.0))
    assert estimator.estimate(4, 100, 50) == pytest.approx(
        float(DEFAULT_COST_MODEL.seconds(4, 100, 50)))
    estimator.observe(ServiceRecord(size=4, max_input_tokens=100, max_tokens=50, measured_s=99.0))
    assert estimator.estimate(4, 100, 50) == pytest.approx(99.0)


def test_knn_returns_the_measured_value_at_a_repeated_point() -> None:
    rng = np.random.default_rng(0)
    estimator = ServiceTimeEstimator()
    for _ in range(200):
        size, max_input, max_tokens = (int(rng.integers(1, 32)), int(rng.integers(10, 1500)),
                                       int(rng.integers(1, 512)))
        estimator.observe(ServiceRecord(size, max_input, max_tokens,
                                        float(rng.uniform(0.5, 2.0))
                                        * float(DEFAULT_COST_MODEL.seconds(size, max_input,
                                                                           max_tokens))))
    estimator.observe(ServiceRecord(size=7, max_input_tokens=333, max_tokens=123, measured_s=4.2))
    assert estimator.estimate(7, 333, 123) == pytest.approx(4.2, rel=1e-9)


def test_knn_extrapolates_through_the_correction_factor() -> None:
    # A machine exactly 10x faster than the default model: kNN learns the factor 0.1 and applies
    # it to a batch twice as long as any seen, instead of returning the longest seen.
    estimator = ServiceTimeEstimator()
    for size in (1, 2, 4, 8):
        for length in (10, 50, 100):
            estimator.observe(ServiceRecord(size, 100, length,
                                            0.1 * float(DEFAULT_COST_MODEL.seconds(size, 100,
                                                                                   length))))
    assert estimator.estimate(8, 100, 200) == pytest.approx(
        0.1 * float(DEFAULT_COST_MODEL.seconds(8, 100, 200)), rel=1e-6)


def test_estimate_many_agrees_with_estimate() -> None:
    rng = np.random.default_rng(1)
    estimator = ServiceTimeEstimator()
    for _ in range(50):
        estimator.observe(ServiceRecord(int(rng.integers(1, 16)), int(rng.integers(10, 500)),
                                        int(rng.integers(1, 300)), float(rng.uniform(1, 20))))
    sizes, inputs, lengths = [3, 9, 1], [40, 400, 1000], [7, 70, 700]
    many = estimator.estimate_many(sizes, inputs, lengths)
    one = [estimator.estimate(s, i, p) for s, i, p in zip(sizes, inputs, lengths, strict=True)]
    assert many.tolist() == pytest.approx(one)


def test_memory_is_bounded_to_the_latest_records() -> None:
    estimator = ServiceTimeEstimator(k=1, max_records=10)
    for i in range(25):
        estimator.observe(ServiceRecord(size=1, max_input_tokens=10, max_tokens=i + 1,
                                        measured_s=float(i)))
    assert len(estimator) == 10
    assert sorted(estimator.records()[:, 3].tolist()) == [float(i) for i in range(15, 25)]


def test_fit_cost_model_recovers_constants_from_synthetic_records() -> None:
    truth = CostModel(prefill_s_per_token=3e-4, decode_step_base_s=0.02,
                      decode_step_per_seq_s=0.004)
    rng = np.random.default_rng(2)
    records = []
    for _ in range(400):
        size, max_input, max_tokens = (int(rng.integers(1, 33)), int(rng.integers(10, 1500)),
                                       int(rng.integers(1, 512)))
        noise = float(rng.normal(1.0, 0.02))
        records.append(ServiceRecord(size, max_input, max_tokens,
                                     noise * float(truth.seconds(size, max_input, max_tokens))))
    fitted = fit_cost_model(records)
    assert fitted.prefill_s_per_token == pytest.approx(truth.prefill_s_per_token, rel=0.05)
    assert fitted.decode_step_base_s == pytest.approx(truth.decode_step_base_s, rel=0.05)
    assert fitted.decode_step_per_seq_s == pytest.approx(truth.decode_step_per_seq_s, rel=0.05)

    estimator = ServiceTimeEstimator()
    for record in records:
        estimator.observe(record)
    assert estimator.refit_cost_model() == fitted


def test_record_from_a_batch_record() -> None:
    batch = BatchRecord(batch_id="b", gpu=0, policy="magnus", size=4, max_input_tokens=200,
                        max_predicted_tokens=60, max_generated_tokens=75,
                        total_generated_tokens=200, estimated_service_s=3.0, measured_s=3.5,
                        started_at=10.0, finished_at=13.5)
    assert ServiceRecord.from_batch_record(batch) == ServiceRecord(4, 200, 60, 3.5)
    assert ServiceRecord.from_batch_record(batch, "generated").max_tokens == 75


def test_incremental_index_answers_as_a_fresh_one_would() -> None:
    """The tree is rebuilt only every few records; in between the newest are searched by brute
    force and overwritten slots are masked. The answers must equal a fresh estimator's."""
    rng = np.random.default_rng(3)
    records = [ServiceRecord(int(rng.integers(1, 64)), int(rng.integers(10, 1500)),
                             int(rng.integers(1, 512)), float(rng.uniform(0.1, 30)))
               for _ in range(260)]
    queries = (rng.integers(1, 64, 30), rng.integers(10, 1500, 30), rng.integers(1, 512, 30))
    incremental = ServiceTimeEstimator(k=5, max_records=100)
    for seen, record in enumerate(records, start=1):
        incremental.observe(record)
        if seen < 5 or seen % 7:
            continue
        fresh = ServiceTimeEstimator(k=5, max_records=100)
        for held in records[max(0, seen - 100): seen]:
            fresh.observe(held)
        assert incremental.estimate_many(*queries).tolist() == pytest.approx(
            fresh.estimate_many(*queries).tolist(), rel=1e-12)
