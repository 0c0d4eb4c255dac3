"""`magnus`: the command line for running and preparing the stack.

    magnus run                 the whole stack on this machine until Ctrl-C
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

from shared.settings import LauncherSettings


def run(argv: list[str]) -> int:
    from offline.launcher import Stack
    from offline.model import SMOLLM2_DIR, convert_smollm2

    parser = argparse.ArgumentParser(prog="magnus run")
    parser.add_argument("--gpus", type=int, help="engines to start (default MAGNUS_GPUS or 1)")
    args = parser.parse_args(argv)
    settings = LauncherSettings()
    if args.gpus:
        settings = settings.model_copy(update={"gpus": args.gpus})
    if settings.model_dir == SMOLLM2_DIR:
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
        stack.start()
        ready.set()
        stack.start_supervision()
        durable = ("" if settings.redis_url else
                   f"; accepted requests persist in {settings.run_dir / 'redis'} (fsync every "
                   "second)" if settings.redis_persist else "; MAGNUS_REDIS_PERSIST=false: "
                   "nothing persists")
        print(f"magnus: ready. API at {stack.ingress_url}  (docs at {stack.ingress_url}/docs)\n"
              f"  redis {stack.redis_url}{durable}; logs in {stack.log_dir}\n"
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
        while not stop.wait(1.0):
            if stack.gave_up:
                print(f"magnus: stopping: {stack.gave_up}", file=sys.stderr)
                return 1
        return 0
    finally:
        print("magnus: stopping ...", flush=True)
        stack.stop()
        print("magnus: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    commands = {"run", "model", "workload", "bench", "new-key"}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        return run(rest)
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
