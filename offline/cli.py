"""`magnus`: the command line for running and preparing the stack.

    magnus run                 the whole stack on this machine until Ctrl-C
    magnus control-plane       Redis (unless REDIS_URL), predictor, schedulers, ingress
    magnus node --redis URL --name N --gpus 0,1
                               a GPU node (an engine + worker per GPU) joining a control plane
    magnus model smollm2|tiny  prepare a model folder (offline)
    magnus workload build      rebuild data/workload from ../shared/data
    magnus bench [...]         the benchmarks: `python -m bench` (run from the repository)
    magnus new-key             a new API key and the hash a tenants file keeps of it
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

from shared.settings import LauncherSettings

if TYPE_CHECKING:
    from offline.launcher import Stack


def parse_gpus(value: str) -> list[int]:
    """`--gpus`: a count (`2`: devices 0 and 1) or device indices (`0,1`, `3`... with a comma
    for a single index: `3,`)."""
    parts = [p for p in value.split(",") if p.strip()]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--gpus: a count or device indices, not {value!r}") from None
    if not numbers or min(numbers) < 0 or ("," not in value and numbers[0] < 1):
        raise argparse.ArgumentTypeError(f"--gpus: a count >= 1 or indices >= 0, not {value!r}")
    return numbers if "," in value else list(range(numbers[0]))


def run(argv: list[str], part: str = "all") -> int:
    from offline.launcher import Stack
    from offline.model import SMOLLM2_DIR, convert_smollm2
    from shared.redis_conn import redacted

    parser = argparse.ArgumentParser(prog=f"magnus {'run' if part == 'all' else part}")
    if part != "control-plane":
        parser.add_argument("--gpus", type=parse_gpus,
                            help="engines to start: a count, or device indices such as 0,1 "
                                 "(default MAGNUS_GPUS or 1)")
    if part == "node":
        parser.add_argument("--name", help="this node's name (default MAGNUS_NODE)")
        parser.add_argument("--redis", help="the control plane's Redis URL (MAGNUS_REDIS_URL)")
    args = parser.parse_args(argv)
    update: dict[str, object] = {}
    if getattr(args, "gpus", None):
        update.update(devices=args.gpus, gpus=len(args.gpus))
    if getattr(args, "name", None):
        update["node"] = args.name
    if getattr(args, "redis", None):
        update["MAGNUS_REDIS_URL"] = args.redis  # the field's name in the environment
    # Arguments override the environment and are validated like it: a bad node name fails
    # here, with its rule.
    settings = LauncherSettings(**update)  # type: ignore[arg-type]
    if part != "control-plane" and settings.model_dir == SMOLLM2_DIR:
        convert_smollm2(SMOLLM2_DIR)  # once; later runs find it in the cache
    stop, ready = threading.Event(), threading.Event()
    stack = Stack(settings)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not ready.is_set() or stop.is_set():
            raise KeyboardInterrupt  # still starting (or asked twice): abort to the cleanup below
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        print("magnus: starting (engine start-up takes about 30 s) ...", flush=True)
        stack.start(control_plane=part != "node", gpu_node=part != "control-plane")
        ready.set()
        stack.start_supervision()
        if part == "node":
            print(f"magnus: node {settings.node} ready: GPUs {stack.gpu_ids} (device: id) "
                  f"serving for the control plane at {redacted(stack.redis_url)}; logs in "
                  f"{stack.log_dir}. Ctrl-C stops it; its unfinished batches are rerun "
                  "elsewhere.", flush=True)
            return _serve_until(stop, stack)
        if part == "control-plane" and not settings.redis_url:
            print(f"magnus: nodes join with --redis {redacted(stack.redis_url)} on an address "
                  f"they reach (MAGNUS_REDIS_BIND), the password being the one in "
                  f"{settings.run_dir / 'redis' / 'password'}", flush=True)
        durable = ("" if settings.redis_url else
                   f"; accepted requests persist in {settings.run_dir / 'redis'} (fsync every "
                   "second)" if settings.redis_persist else "; MAGNUS_REDIS_PERSIST=false: "
                   "nothing persists")
        print(f"magnus: ready. API at {stack.ingress_url}  (docs at {stack.ingress_url}/docs)\n"
              f"  redis {redacted(stack.redis_url)}{durable}; logs in {stack.log_dir}\n"
              "  a service that dies is restarted (see the log); Ctrl-C stops everything.\n"
              f"  try: curl -s -XPOST {stack.ingress_url}/v1/requests -H 'content-type: "
              "application/json' -d '{\"app_id\":\"qa\",\"instruction\":\"Answer in one "
              "sentence.\",\"input\":\"What is the capital of France?\",\"max_tokens\":32}'",
              flush=True)
        if settings.tenants_file is None:
            print("  no API keys (MAGNUS_TENANTS_FILE unset): ingress listens on loopback only, "
                  "and any local user may use every app and read every request", flush=True)
        else:
            print(f"  API keys required (tenants in {settings.tenants_file})", flush=True)
        return _serve_until(stop, stack)
    finally:
        print("magnus: stopping ...", flush=True)
        stack.stop()
        print("magnus: stopped", flush=True)


def _serve_until(stop: threading.Event, stack: Stack) -> int:
    while not stop.wait(1.0):
        if stack.gave_up:
            print(f"magnus: stopping: {stack.gave_up}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    commands = {"run", "control-plane", "node", "model", "workload", "bench", "new-key"}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("run", "control-plane", "node"):
        return run(rest, "all" if cmd == "run" else cmd)
    if cmd == "new-key":
        from shared.tenants import hash_key, new_key

        key = new_key()
        print(f"key (give it to the tenant; it is not stored): {key}")
        print(f'key_sha256 (put it in the tenants file):   "{hash_key(key)}"')
        return 0
    if cmd == "bench":
        # bench/ sits above offline/ (it imports offline, never the reverse), so it runs as its own
        # command: `python -m bench`, from the repository root.
        import subprocess

        return subprocess.call([sys.executable, "-m", "bench", *rest])
    if cmd == "model":
        from offline.model import main as model_main

        return model_main(rest)
    from offline.workload.build import main as build_main

    if rest[:1] == ["build"]:
        rest = rest[1:]
    return build_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
