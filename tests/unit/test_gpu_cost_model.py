"""The GPU engine cost models fitted to the committed H200 step times (data/gpu_profile_h200/)."""

from __future__ import annotations

import json

import pytest

from bench.gpu_cost_model import DEFAULT_OUT, load_gpu_model, load_profiles


def test_graphs_fit_reproduces_the_measured_law() -> None:
    """The README's fit of the CUDA-graph decode steps, 5.80 + 0.0166 B + 0.0000282 B (L + 1)
    ms, comes out of the data again, and covers every point within 8%."""
    fit = load_profiles()["graphs"]
    m = fit.model
    assert m.step_base_s * 1e3 == pytest.approx(5.80, rel=0.02)
    assert m.step_per_seq_s * 1e3 == pytest.approx(0.0166, rel=0.05)
    assert m.step_per_context_token_s * 1e3 == pytest.approx(0.0000282, rel=0.05)
    assert fit.decode.points >= 20 and fit.decode.max_relative_error <= 0.085
    # Prefill near 35k tokens/s on an H200 for an 8B model.
    assert 1 / m.prefill_per_token_s == pytest.approx(35_000, rel=0.15)
    # A batch-256 step at 2,048 tokens of context each was measured at 25.0 ms.
    assert m.step_time(256, 256 * 2049) * 1e3 == pytest.approx(25.0, rel=0.08)


def test_eager_fit_is_launch_bound_and_its_error_reported() -> None:
    fit = load_profiles()["eager"]
    assert 0.025 < fit.model.step_base_s < 0.045  # ~38 ms per step whatever the small batch
    assert fit.decode.max_relative_error < 0.35  # a linear law over a flat-then-linear curve


def test_committed_results_are_the_refit() -> None:
    committed = json.loads(DEFAULT_OUT.read_text())
    for engine, fit in load_profiles().items():
        assert committed[engine]["model"] == pytest.approx(fit.model.as_dict())
        # The same fit to the last bits a BLAS may round differently on another machine.
        assert load_gpu_model(engine).as_dict() == pytest.approx(fit.model.as_dict(), rel=1e-12)
