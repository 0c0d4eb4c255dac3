"""Process start-up shared by the service entry points: logging and a stop event on signals."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType


def start_service() -> threading.Event:
    """Configure logging and return an event set on SIGTERM or SIGINT, so a service's loop ends
    its current step and exits cleanly (the launcher and Ctrl-C both send these)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
