"""`python -m bench` (`make bench`): the one-command benchmark.

    python -m bench                 default: the load sweep (bench/load_sweep.py: Magnus against
                                    plain vLLM and the baselines from 0.3x to 1.5x the engine's
                                    measured capacity; about 45 min on 2 cores)
    python -m bench load [ARGS]     the same, with bench/load_sweep.py's options (--long: more)
    python -m bench table           the earlier default: the real-stack table (every policy, both
                                    engine modes, 60 test-split requests at 2 req/s; about 20 min),
                                    the simulator on the same configuration beside it, then
                                    docs/benchmarks.md's tables
    python -m bench real [ARGS]     only the real stack (bench/real_stack.py's options)
    python -m bench sweep [ARGS]    the real-stack load sweep: 40 requests at 0.5, 1 and 2 req/s,
                                    fcfs-fixed and magnus (static), continuous-fcfs and magnus
                                    (continuous); writes results/real_sweep.json
    python -m bench sim [ARGS]      the simulator: real configuration, 1-GPU sweep, 8 and 64 GPUs
                                    (bench/sim_run.py's options)
    python -m bench faults [ARGS]   fault injection on a supervised stack (bench/faults.py)
    python -m bench soak [ARGS]     10 minutes of load while a random process is killed every
                                    minute (bench/soak.py)
    python -m bench fairness [ARGS] two tenants at 10:1 load, fair sharing on and off, against
                                    the light one alone (bench/fairness.py; about 15 min)
    python -m bench vllm-serve ARGS vLLM's own `vllm bench serve` (bench/vllm_serve.py)
    python -m bench targets [ARGS]  where Magnus wins: repeated, interleaved runs on the
                                    isolated engine (bench/targets.py; hours: run in parts)
    python -m bench crosscheck      the harness against `vllm bench serve` at the sweep's highest
                                    load, on plain vLLM and on Magnus (bench/crosscheck.py)
    python -m bench profile-engine  measure the engine's step times for the cost model
    python -m bench report          rewrite docs/benchmarks.md's tables from results/
"""

from __future__ import annotations

import sys
import time

from shared.settings import REPO_ROOT

SWEEP_ARGS = ["--requests", "40", "--rates", "0.5,1.0,2.0",
              "--static-policies", "fcfs-fixed,magnus",
              "--continuous-policies", "continuous-fcfs,magnus",
              "--out", str(REPO_ROOT / "results" / "real_sweep.json"), "--plot-prefix", "real_load"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else ("all", argv)
    if cmd in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    from bench import (
        crosscheck,
        engine_profile,
        fairness,
        faults,
        load_sweep,
        real_stack,
        report,
        sim_run,
        soak,
        vllm_serve,
    )

    if cmd == "real":
        return real_stack.main(rest)
    if cmd == "sweep":
        return real_stack.main(SWEEP_ARGS + rest)
    if cmd == "sim":
        return sim_run.main(rest)
    if cmd == "profile-engine":
        return engine_profile.main(rest)
    if cmd == "faults":
        return faults.main(rest)
    if cmd == "soak":
        return soak.main(rest)
    if cmd == "fairness":
        return fairness.main(rest)
    if cmd == "targets":
        from bench import targets

        return targets.main(rest)
    if cmd == "crosscheck":
        return crosscheck.main(rest)
    if cmd == "vllm-serve":
        return vllm_serve.main(rest)
    if cmd == "report":
        return report.main(rest)
    if cmd in ("all", "load"):
        return load_sweep.main(rest)
    if cmd != "table":
        print(__doc__)
        return 2
    started = time.monotonic()
    code = real_stack.main(rest)
    if code == 0:
        code = sim_run.main(["--parts", "real"])
    if code == 0:
        code = report.main([])
    print(f"bench: {(time.monotonic() - started) / 60:.1f} min in all")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
