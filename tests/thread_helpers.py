"""Running test code in threads: start a target that records its exception, join with a
timeout that turns a deadlock into a failure, and poll shared state until it holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll shared state until `condition()` holds (the timeout only catches a hang)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def start(target: Callable[[], object], errors: list) -> threading.Thread:
    """Run `target` in a new thread; an exception it raises lands in `errors`."""
    def run():
        try:
            target()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def join(threads: list[threading.Thread], errors: list, timeout: float = 120.0) -> None:
    """Wait for every thread; a thread still running is a deadlock, an error a failure."""
    for t in threads:
        t.join(timeout=timeout)
        assert not t.is_alive(), "a thread hung: deadlock in the bank's gate"
    assert not errors, errors
