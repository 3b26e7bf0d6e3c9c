"""The two clocks every role is given (injected, so tests can drive time).

`now`: monotonic seconds, for every timer and deadline: an NTP step must neither expire keys nor
stall a retransmission. `wall`: Unix seconds, only for what goes on the wire and must be comparable
across machines and restarts (handshake timestamps, record timestamps, envelope freshness).
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Clock:
    now: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time

    def wall_ms(self) -> int:
        """Wall time in integer milliseconds (record and envelope timestamps)."""
        return int(self.wall() * 1000)

    def utc(self) -> datetime.datetime:
        """Wall time as an aware UTC datetime (certificate validity)."""
        return datetime.datetime.fromtimestamp(self.wall(), datetime.timezone.utc)


SYSTEM = Clock()
