"""The policy registry: every scheduling policy is one `PolicySpec` entry here.

A spec says, in data, what used to be spread over name tests: how a static batch's candidates are
formed, how candidates (static) or requests (continuous) are ordered, whether the policy plans
with predictions, with true lengths (the oracle) or with neither, and how continuous admission
treats the KV budget. The policy functions (`policy.py`) and the planner (`planning.py`) read only
these attributes, never a policy's name; settings, the benchmark and the simulator read the names
from `POLICIES`. (The same shape as vLLM mapping its scheduling-policy enum to a request-queue
class, or SGLang's small policy classes.)

Adding a policy that combines existing building blocks is one entry below plus its tests; one
with a new building block is that block (a new `Batching` or `Ordering` value handled in
`policy.py`) plus its entry. docs/scheduler.md ("Add a policy") has the path, including the
simulator check every policy gets for free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.scheduler.batching import EngineMode

# How a static batch's candidates are formed from the waiting pool:
# - adaptive: length-homogeneous groups grown within the KV budget and the waste bound
#   (batching.adaptive_batches);
# - length-sorted-fixed: consecutive groups of `batch_size` in planned-length order
#   (batching.fixed_size_batches);
# - arrival-fixed: the `batch_size` oldest (the paper's FCFS baseline);
# - everyone: all who wait, in arrival order, with no budget (plain vLLM).
Batching = Literal["adaptive", "length-sorted-fixed", "arrival-fixed", "everyone"]
# How candidates (static) or single requests (continuous) are ranked:
# - hrrn: highest response ratio (wait + estimated service) / estimated service first;
# - sjf: shortest planned length first;
# - fcfs: oldest first;
# - hrrn-prompt: response ratio with a service estimated from the prompt alone (every request's
#   planned run taken as the median max_tokens): what a scheduler that knows only prompts can do
#   (SGLang's prompt-length rule), the baseline Magnus's predicted lengths must beat.
Ordering = Literal["hrrn", "sjf", "fcfs", "hrrn-prompt"]
# What a policy plans with: the predictor's lengths, the true (profiled) lengths, or nothing
# (its runs go to max_tokens, as plain vLLM's would).
Lengths = Literal["predicted", "true", "none"]


@dataclass(frozen=True)
class PolicySpec:
    name: str
    batching: Batching
    ordering: Ordering
    lengths: Lengths
    # Continuous mode: "budget" admits in policy order while the predicted KV fits the GPU's
    # budget and the GPU runs fewer than its concurrency cap (capacity.py: where the engine's
    # measured throughput stops growing), so the rest wait in Magnus's queue, where the policy
    # orders them; "everyone" sends all who wait at once and lets the engine queue and preempt.
    admission: Literal["budget", "everyone"]
    # The engine modes the benchmark and simulator compare this policy in.
    benchmarked_in: frozenset[EngineMode]
    summary: str
    # The engine orders instead (vLLM --scheduling-policy priority): every request is sent at
    # once with its planned length as its priority, shortest first.
    engine_priority: bool = False

    def __post_init__(self) -> None:
        assert self.name and self.name == self.name.strip().lower(), "policy names are lowercase"
        assert self.lengths != "none" or self.batching in ("arrival-fixed", "everyone"), (
            f"{self.name}: a policy without lengths cannot group by length")
        assert self.lengths != "none" or self.ordering in ("fcfs", "hrrn-prompt"), (
            f"{self.name}: a policy without lengths can only order by arrival or prompt")
        assert not self.engine_priority or (self.admission == "everyone"
                                            and self.lengths != "none"), (
            f"{self.name}: engine priorities need lengths and the engine to hold the queue")

    @property
    def uses_predictions(self) -> bool:
        """False for the baselines that ignore lengths: their runs are never capped."""
        return self.lengths != "none"

    @property
    def oracle(self) -> bool:
        return self.lengths == "true"


_STATIC: frozenset[EngineMode] = frozenset({"static"})
_CONTINUOUS: frozenset[EngineMode] = frozenset({"continuous"})
_BOTH: frozenset[EngineMode] = frozenset({"static", "continuous"})

# Order matters: it is the order of the benchmark's tables.
POLICIES: dict[str, PolicySpec] = {spec.name: spec for spec in (
    PolicySpec("fcfs-fixed", "arrival-fixed", "fcfs", "none", "budget", _STATIC,
               "FCFS in fixed-size batches, runs to max_tokens (the paper's baseline)"),
    PolicySpec("continuous-fcfs", "everyone", "fcfs", "none", "everyone", _CONTINUOUS,
               "send everyone at once, in arrival order (plain vLLM)"),
    PolicySpec("vllm-priority", "everyone", "sjf", "predicted", "everyone", _CONTINUOUS,
               "send everyone at once with the predicted length as vLLM's priority (the "
               "engine started with --scheduling-policy priority): what a vLLM user could do "
               "alone with Magnus's predictor", engine_priority=True),
    PolicySpec("prompt-hrrn", "everyone", "hrrn-prompt", "none", "budget", _CONTINUOUS,
               "hold the queue like magnus, ranked by HRRN on prompt length alone (SGLang's "
               "rule; no output-length prediction)"),
    PolicySpec("sjf-predicted", "length-sorted-fixed", "sjf", "predicted", "budget", _STATIC,
               "length-sorted fixed-size batches, shortest predicted first"),
    PolicySpec("magnus", "adaptive", "hrrn", "predicted", "budget", _BOTH,
               "adaptive length-homogeneous batches within the KV budget, HRRN"),
    PolicySpec("magnus-oracle", "adaptive", "hrrn", "true", "budget", _BOTH,
               "magnus planning with the true (profiled) lengths"),
    PolicySpec("magnus-no-hrrn", "adaptive", "fcfs", "predicted", "budget", _STATIC,
               "magnus's batches, the oldest request's batch first (ablation)"),
    PolicySpec("magnus-fixed-batch", "length-sorted-fixed", "hrrn", "predicted", "budget",
               _STATIC, "length-sorted fixed-size batches with HRRN (ablation)"),
)}


def get_policy(name: str) -> PolicySpec:
    """The registered policy called `name`; a clear error listing the names otherwise."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; registered: {', '.join(POLICIES)}") from None


def policy_names(mode: EngineMode | None = None) -> list[str]:
    """Registered names in registry order; with `mode`, those the benchmark compares in it."""
    return [n for n, s in POLICIES.items() if mode is None or mode in s.benchmarked_in]
