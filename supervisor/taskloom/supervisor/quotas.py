"""Per-principal limits: how fast one may submit, how many streams one may hold.

They keep one broken or hostile client from hurting the service for the
others. Admins are exempt (and so is everyone while authentication is off:
then the only caller is the local admin). The limit on unfinished tasks
lives in the store, where it is checked in the same transaction as the
submit; these live in memory, so a new leader starts them afresh.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

from taskloom.core.auth import Principal
from taskloom.core.errors import ResourceExhausted
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.settings import SupervisorSettings


class _Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self, n: int = 1) -> float:
        """0.0 if ``n`` tokens were taken, else how many seconds until they
        are there. More than ``burst`` are taken once the bucket is full,
        leaving it in debt: the next take waits until it is paid off."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        needed = min(float(n), self.burst)
        if self.tokens >= needed:
            self.tokens -= n
            return 0.0
        return (needed - self.tokens) / self.rate


class Quotas:
    """The in-memory per-principal limits of one supervisor."""

    def __init__(self, settings: SupervisorSettings, metrics: SupervisorMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._buckets: dict[str, _Bucket] = {}
        self._watches: defaultdict[str, int] = defaultdict(int)

    def admit_submit(self, principal: Principal, work: int = 1) -> None:
        """Take ``work`` (a task's subtasks, 1 for a task still to be planned)
        from the principal's allowance, or ResourceExhausted."""
        if principal.admin:
            return
        bucket = self._buckets.get(principal.name)
        if bucket is None:
            bucket = self._buckets[principal.name] = _Bucket(
                self._settings.submit_rate, self._settings.submit_burst
            )
        wait = bucket.take(work)
        if wait:
            self._metrics.refused.labels("submit_rate").inc()
            raise ResourceExhausted(
                f"{principal.name} submits more than {self._settings.submit_rate:g} subtasks "
                f"a second (TASKLOOM_SUBMIT_RATE); retry in {wait:.1f}s",
                subject="submit_rate",
            )

    def admit_load(self, waited: float) -> None:
        """ResourceExhausted while the cluster is behind: the oldest subtask a
        connected worker could run has waited ``waited`` seconds for a slot,
        longer than ``admit_queue_wait``. More work would only make every task
        later; the caller retries once the backlog drains."""
        limit = self._settings.admit_queue_wait
        if limit and waited > limit:
            self._metrics.refused.labels("backlog").inc()
            raise ResourceExhausted(
                f"the cluster is behind: runnable subtasks have waited {waited:.0f}s for a "
                f"worker, more than {limit:g}s (TASKLOOM_ADMIT_QUEUE_WAIT); retry later, "
                "or add workers",
                subject="backlog",
            )

    @contextlib.contextmanager
    def watching(self, principal: Principal) -> Iterator[None]:
        """Hold one of the principal's watch streams for the block's duration."""
        self.take_watch(principal)
        try:
            yield
        finally:
            self.give_watch(principal)

    def take_watch(self, principal: Principal) -> None:
        """Take one of the principal's watch streams, or ResourceExhausted."""
        if principal.admin:
            return
        if self._watches[principal.name] >= self._settings.max_watches:
            self._metrics.refused.labels("max_watches").inc()
            raise ResourceExhausted(
                f"{principal.name} already watches {self._settings.max_watches} tasks at once, "
                "the limit (TASKLOOM_MAX_WATCHES); end a watch first",
                subject="max_watches",
            )
        self._watches[principal.name] += 1

    def give_watch(self, principal: Principal) -> None:
        """Give back what ``take_watch`` took."""
        if principal.admin:
            return
        self._watches[principal.name] -= 1
        if not self._watches[principal.name]:
            del self._watches[principal.name]
