"""The LLM engines Magnus can drive, behind one interface (`services/engine/base.py`).

    engine = get_engine(settings.engine)     # MAGNUS_ENGINE, default "vllm"

Adding an engine (say SGLang) is one new module and one registry line: write
`services/engine/sglang.py` with a class implementing `base.Engine` (its server's command line and
environment, readiness, KV budget, streamed chat completions, abort), then add
`"sglang": "services.engine.sglang:SglangEngine"` to `ENGINES` below; `MAGNUS_ENGINE=sglang`
selects it everywhere (launcher, workers, ingress token counting, benchmarks).
"""

from __future__ import annotations

import functools
import importlib

from services.engine.base import Engine

# name -> "module:class"; imported only when selected, so an engine's module may need packages the
# others do not.
ENGINES: dict[str, str] = {
    "vllm": "services.engine.vllm:VllmEngine",
}


@functools.cache
def get_engine(name: str) -> Engine:
    """The process's one engine object of that name (one, so `abort` finds what `generate`
    started)."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}") from None
    module_name, _, class_name = target.partition(":")
    engine = getattr(importlib.import_module(module_name), class_name)()
    if not isinstance(engine, Engine):
        raise TypeError(f"{target} does not implement services.engine.base.Engine")
    return engine


__all__ = ["ENGINES", "Engine", "get_engine"]
