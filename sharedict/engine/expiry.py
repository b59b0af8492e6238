"""The expiry policy: when an entry has expired, and when a read is worth recording.

Times are wall-clock milliseconds, because expiry must hold across restarts of the
daemon. A write that adds an entry records its time exactly. Reads, and writes to an
entry that exists, record theirs at most once per *recording granularity* (1% of
``expire_after``), so that steady reads do not become one disk write each and an
overwrite changes only the value. Activity in between records nothing. The entry then
expires one granularity later than its recorded access alone would give, so that no
activity ends its life early. An entry therefore expires between ``expire_after`` and
``expire_after`` plus 1% after its last activity.

A wall clock that jumps backwards makes entries look younger, never older, and recorded
accesses never move back in time, so such a jump never expires an entry early. A jump
forwards expires entries early by the size of the jump.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# Reads record their access at most once per this share of expire_after.
RECORDING_SHARE = 0.01

# With expiry off, reads are still recorded at the granularity of a 7-day expire_after,
# so that turning expiry on later does not expire entries that were read all along.
RECORDING_GRANULARITY_WHEN_OFF_MS = int(7 * 24 * 3600 * 1000 * RECORDING_SHARE)


class ExpiryPolicy:
    """The expiry rules of one store, with its clock.

    Args:
        expire_after: seconds without activity after which an entry expires; 0 turns
            expiry off.
        clock: wall-clock time in seconds, injectable for tests.

    Raises:
        ValueError: if ``expire_after`` is negative, infinite or NaN.
    """

    def __init__(self, expire_after: float, clock: Callable[[], float] = time.time) -> None:
        if not math.isfinite(expire_after) or expire_after < 0:
            raise ValueError(
                f"expire_after={expire_after!r} is invalid; give zero (no expiry) or a finite number of seconds"
            )
        self.expire_after = float(expire_after)
        self.enabled = self.expire_after > 0
        self._clock = clock

        # Rounding up keeps every entry for at least expire_after.
        expire_after_ms = math.ceil(self.expire_after * 1000)
        if self.enabled:
            self.granularity_ms = max(1, int(expire_after_ms * RECORDING_SHARE))
        else:
            self.granularity_ms = RECORDING_GRANULARITY_WHEN_OFF_MS
        self.lifetime_ms = expire_after_ms + self.granularity_ms

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def cutoff_ms(self, now_ms: int) -> int:
        """Return the access time below which entries have expired at ``now_ms``; 0 when off."""
        if not self.enabled:
            return 0
        return max(0, now_ms - self.lifetime_ms + 1)

    def is_expired(self, access_ms: int, now_ms: int) -> bool:
        return access_ms < self.cutoff_ms(now_ms)

    def is_recording_due(self, access_ms: int, now_ms: int) -> bool:
        """Return whether activity at ``now_ms`` should record its access."""
        return now_ms - access_ms >= self.granularity_ms
