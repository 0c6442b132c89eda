"""Progress lines for logs: where a tqdm bar cannot show (stderr is a file or a pipe), a line
every PEFTVISION_PROGRESS_EVERY seconds (default 30) says how far a long loop has come."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

ENV = "PEFTVISION_PROGRESS_EVERY"
DEFAULT_SECONDS = 30.0


def interval() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV, DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


class Heartbeat:
    """`due()` is True once `every` seconds have passed since the last True (or the start):
    `if beat.due(): say(...)` inside a loop."""

    def __init__(self, *, active: bool = True, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.active, self.clock = active, clock
        self.every = interval() if every is None else every
        self.last = clock()

    def due(self) -> bool:
        if not self.active or self.clock() - self.last < self.every:
            return False
        self.last = self.clock()
        return True
