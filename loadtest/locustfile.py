"""Locust load test for a running Magnus stack (`make run`, ingress on :8000 by default).

Two user classes, both drawing real requests from the workload's test split (data/workload):

- `SubmitAndPollUser`: an app client that submits a request, polls until it is final, then
  thinks for a while. Run many of them for a closed-loop load.
- `TraceReplayUser`: one user that replays arrival times, Poisson or the Azure LLM trace
  rescaled to `--trace-rate` requests/s, each request polled in its own greenlet: open-loop load
  that does not slow down when the server does.

Besides Locust's own per-endpoint rows (submit, poll), every finished request is reported as
`request complete` (response time = submit to final status, as the server's timestamps would
say up to one poll interval) and `first token`, so `--csv` and the end-of-run table give the
end-to-end latency percentiles. A request that fails, or is still not final after
`--request-timeout`, is reported as a failure with its reason.

    make run                                  # in another terminal
    make loadtest                             # 2 minutes, headless, both user classes
    .venv/bin/locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 \\
        -u 9 -r 3 -t 5m --trace-rate 1.0 --trace azure --csv results/locust
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import gevent
from locust import HttpUser, between, events, task
from locust.env import Environment
from locust.exception import StopUser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.workload.arrivals import azure_trace_arrivals, poisson_arrivals
from offline.workload.catalog import load_apps, load_records

FINAL = {"completed", "failed", "cancelled"}
_POOL: list[dict[str, Any]] = []


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens per request")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds after which a request not yet final counts as failed")
    parser.add_argument("--trace", choices=["poisson", "azure"], default="poisson",
                        help="TraceReplayUser's arrival process")
    parser.add_argument("--trace-rate", type=float, default=0.5,
                        help="TraceReplayUser's mean arrival rate (requests/s)")
    parser.add_argument("--trace-requests", type=int, default=1000,
                        help="arrivals TraceReplayUser replays before it stops")
    parser.add_argument("--seed", type=int, default=0)


@events.init.add_listener
def _load_workload(environment: Environment, **_: Any) -> None:
    instruction = {a.app_id: a.instruction for a in load_apps()}
    _POOL.extend({"app_id": r.app_id, "user_id": r.user_id, "instruction": instruction[r.app_id],
                  "input": r.input} for r in load_records(split="test"))


def _fire(environment: Environment, name: str, started: float, error: str | None) -> None:
    environment.events.request.fire(
        request_type="MAGNUS", name=name, response_time=(time.time() - started) * 1000,
        response_length=0, exception=RuntimeError(error) if error else None, context={})


class _MagnusUser(HttpUser):
    abstract = True

    def payload(self, rng: random.Random) -> dict[str, Any]:
        return rng.choice(_POOL) | {"max_tokens": self.environment.parsed_options.max_tokens}

    def submit_and_wait(self, body: dict[str, Any]) -> None:
        """Submit, then poll until final; reports `request complete` and `first token`."""
        opts = self.environment.parsed_options
        started = time.time()
        with self.client.post("/v1/requests", json=body, name="submit",
                              catch_response=True) as resp:
            if resp.status_code == 429:
                resp.failure("429: queue full (backpressure)")
                return
            if resp.status_code != 202:  # 202 Accepted: queued
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            request_id = resp.json()["request_id"]
        first_token_seen = False
        while time.time() - started < opts.request_timeout:
            gevent.sleep(opts.poll_interval)
            view = self.client.get(f"/v1/requests/{request_id}", name="poll").json()
            if not first_token_seen and view.get("timestamps", {}).get("first_token"):
                first_token_seen = True
                _fire(self.environment, "first token", started, None)
            if view["status"] in FINAL:
                error = None if view["status"] == "completed" else (
                    f"{view['status']}: {view.get('error') or 'no reason given'}")
                _fire(self.environment, "request complete", started, error)
                return
        _fire(self.environment, "request complete", started,
              f"not final after {opts.request_timeout:g} s (still visible as queued/running)")


class SubmitAndPollUser(_MagnusUser):
    """A closed-loop client: one request at a time, 1-5 s of think time between them."""

    wait_time = between(1, 5)
    weight = 3

    def on_start(self) -> None:
        self.rng = random.Random()

    @task
    def request(self) -> None:
        self.submit_and_wait(self.payload(self.rng))


class TraceReplayUser(_MagnusUser):
    """Open-loop trace replay: submits at the trace's times whatever the server's pace."""

    fixed_count = 1

    def wait_time(self) -> float:  # the task paces itself
        return 0.0

    @task
    def replay(self) -> None:
        opts = self.environment.parsed_options
        n = opts.trace_requests
        arrivals = (azure_trace_arrivals(opts.trace_rate, n, seed=opts.seed)
                    if opts.trace == "azure" else
                    poisson_arrivals(opts.trace_rate, n, seed=opts.seed))
        rng = random.Random(opts.seed)
        start = time.time()
        running = []
        for at in arrivals:
            gevent.sleep(max(0.0, start + at - time.time()))
            running.append(gevent.spawn(self.submit_and_wait, self.payload(rng)))
        gevent.joinall(running)
        raise StopUser()  # the trace is done; Locust does not start this user again
