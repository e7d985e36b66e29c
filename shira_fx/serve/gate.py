"""The bank's reader-writer gate: requests computing with the active adapter read together,
a switch (or a load, an unload, a bare activate) writes alone. `shira_fx.serve.bank` and
`shira_fx.serve.mixed` enter it; the policy that keeps anything from starving is below.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

MIXED = "per_request"  # what a thread inside per_request holds of the gate


class Gate:
    """The bank's reader-writer gate. Readers are requests computing with the active adapter;
    writers are switches (a request for another adapter, or a bare activate/deactivate/load/
    unload). Many readers run together; a writer runs alone, once the readers have left.

    Policy (why nothing starves): a request that finds its adapter active joins the readers
    only while no switch is waiting; otherwise it waits behind the switch, so a stream of
    requests for a busy adapter cannot hold a switch off. A request that had to queue for a
    switch may join its adapter's readers as soon as that adapter is active (each does so
    once, so this cannot hold a switch off either). Switches among themselves are not
    ordered: whichever gets the lock first when the gate frees goes first.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.readers = 0  # requests inside their block
        self.writing = False  # a switch is changing the weights
        self.waiting = 0  # switches waiting for the gate (new readers queue behind them)
        self.blocked = 0  # requests waiting to enter (observability: tests, stats)
        self.local = threading.local()  # per thread: the spec it holds inside `using`, and depth

    def held(self) -> tuple[dict | None, int] | None:
        return getattr(self.local, "held", None)

    def enter(self, ready: Callable[[], bool]) -> bool:
        """Wait for the gate as a request: join the readers once `ready()` holds (checked under
        the gate: what readers need is in place), or become the one writer that makes it hold.
        True means writer: do the switch, then `release_write(then_read=True)`."""
        queued = False
        with self.cond:
            self.blocked += 1
            try:
                while True:
                    if not self.writing:
                        if ready():
                            if queued or not self.waiting:
                                self.readers += 1
                                return False
                        elif not self.readers:
                            self.writing = True
                            return True
                    if not queued and not ready():  # queue as a switch
                        self.waiting += 1
                        queued = True
                    self.cond.wait()
            finally:
                self.blocked -= 1
                if queued:
                    self.waiting -= 1
                    if not self.waiting:  # readers held back by waiting switches may enter
                        self.cond.notify_all()

    def acquire_write(self) -> None:
        with self.cond:
            self.waiting += 1
            try:
                while self.writing or self.readers:
                    self.cond.wait()
            except BaseException:  # interrupted: readers held back by this switch may enter
                self.waiting -= 1
                self.cond.notify_all()
                raise
            self.waiting -= 1
            self.writing = True

    def release_write(self, then_read: bool = False) -> None:
        """End a switch; `then_read` turns the switcher into a reader of what it activated,
        atomically, so nothing can switch it away before its forward runs."""
        with self.cond:
            self.writing = False
            if then_read:
                self.readers += 1
            self.cond.notify_all()

    def release_read(self) -> None:
        with self.cond:
            self.readers -= 1
            if not self.readers:  # only an empty gate lets anyone new in
                self.cond.notify_all()

