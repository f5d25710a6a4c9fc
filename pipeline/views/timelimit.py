"""Clean stops of a view-generation job before its time limit (``--stop-after``, ``--time-limit``, SIGUSR1).

A job asked to stop finishes the part it is writing, starts no other and raises ``ShardStopped``
(exit 1, one log line naming the stop); the next run of the same job continues from the next
part. Every run writes at least one part before a time budget stops it, so any sequence of runs
completes the shard, however short the budget. A job killed instead (SIGKILL, or the SIGTERM of a limit reached) loses only the part it
was writing: parts are atomic and verified by digest on reuse.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

from pipeline.views.hdf5 import ViewsError

# minutes of a job's time limit kept for startup and assembly (streaming the shard and hashing
# it twice); a limit under twice this keeps half of it
TIME_LIMIT_MARGIN_MIN = 30


class ShardStopped(ViewsError):
    """The shard stopped cleanly between parts: run the job again to go on."""


def stop_after_for_limit(minutes: float) -> float | None:
    """Seconds of part generation a job with a ``minutes`` time limit may start (None: no limit)."""
    if not minutes:
        return None
    return 60.0 * max(minutes - TIME_LIMIT_MARGIN_MIN, minutes / 2)


class StopControl:
    """When to stop between parts: a SIGUSR1 received, or ``stop_after`` seconds that the next
    part (estimated by the longest so far) would overrun."""

    def __init__(self, stop_after: float | None = None):
        self.stop_after = stop_after
        self.requested: str | None = None
        self.longest = 0.0
        self._t0 = time.monotonic()

    def start(self) -> None:
        self._t0, self.longest = time.monotonic(), 0.0

    def part_done(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)

    def check(self, what: str, parts_written: int) -> None:
        """Raise ``ShardStopped`` (its message starts with ``what``) if a stop is due.

        A time budget never stops a run before it has written a part (``parts_written`` in this
        run): a budget shorter than the start-up, or than one part, would otherwise stop every run
        without progress. The part then overruns the budget by at most its own length, which the
        ``--time-limit`` margin absorbs. An explicit request (SIGUSR1) stops at once.
        """
        reason = self.requested
        elapsed = time.monotonic() - self._t0
        if (
            reason is None
            and parts_written > 0
            and self.stop_after is not None
            and elapsed + self.longest > self.stop_after
        ):
            reason = f"--stop-after {self.stop_after:g} s: another part (up to {self.longest:.0f} s) would not fit"
        if reason:
            raise ShardStopped(f"{what}: stopped cleanly ({reason}); run the job again to continue from the next part")

    @contextlib.contextmanager
    def on_sigusr1(self):
        """While active, SIGUSR1 asks for a stop after the current part (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request(signum, frame):
            self.requested = signal.Signals(signum).name

        previous = signal.signal(signal.SIGUSR1, request)
        try:
            yield
        finally:
            signal.signal(signal.SIGUSR1, previous)
