"""Mispredictions: a run that stops at its predicted cap comes back as one continuation."""

from __future__ import annotations

from services.worker.runner import continuation_of
from shared.schemas import QueuedRequest, RequestResult


def _req(**kw: object) -> QueuedRequest:
    base: dict[str, object] = dict(request_id="r", app_id="a", user_id="u", instruction="",
                                   input="x", max_tokens=100, input_tokens=20, queued_at=0.0)
    base.update(kw)
    return QueuedRequest.model_validate(base)


def _res(text: str, generated: int, reason: str) -> RequestResult:
    return RequestResult(request_id="r", batch_id="b", gpu=0, text=text, input_tokens=20,
                         generated_tokens=generated, finish_reason=reason,
                         started_at=0, finished_at=1)


def test_a_run_that_hit_its_cap_early_becomes_a_continuation() -> None:
    cont = continuation_of(_req(), _res("partial", 30, "length"))
    assert cont is not None
    assert (cont.continuation, cont.generated_so_far, cont.continuations) == ("partial", 30, 1)
    assert cont.input_tokens == 50 and cont.remaining_max_tokens == 70


def test_a_second_continuation_accumulates() -> None:
    first = _req(continuation="ab", generated_so_far=30, continuations=1, input_tokens=50)
    cont = continuation_of(first, _res("abcd", 60, "length"))
    assert cont is not None
    assert (cont.generated_so_far, cont.continuations, cont.input_tokens) == (60, 2, 80)


def test_finished_or_exhausted_requests_are_not_continued() -> None:
    assert continuation_of(_req(), _res("done", 30, "stop")) is None
    assert continuation_of(_req(), _res("all", 100, "length")) is None  # its own max reached
    assert continuation_of(_req(), _res("", 0, "error")) is None


def test_the_oracle_plans_with_the_remaining_true_length_until_a_run_outgrows_it() -> None:
    from services.scheduler.main import to_waiting
    from shared.schemas import PredictedRequest, Prediction, PredictorSource

    def waiting(generated_so_far: int) -> int | None:
        req = QueuedRequest(request_id="r", app_id="a", user_id="u", instruction="i", input="x",
                            max_tokens=512, input_tokens=40, true_output_tokens=100,
                            queued_at=0.0, continuation="y" * generated_so_far,
                            generated_so_far=generated_so_far,
                            continuations=int(generated_so_far > 0))
        pred = Prediction(request_id="r", predicted_tokens=60, upper_tokens=90,
                          model_version="t", source=PredictorSource.MODEL, predicted_at=0.0)
        return to_waiting(PredictedRequest(request=req, prediction=pred)).true_output_tokens

    assert waiting(0) == 100
    assert waiting(90) == 10
    # The sampled run generated more than the profiled length: no 1-token runs from here on.
    assert waiting(100) is None and waiting(130) is None
