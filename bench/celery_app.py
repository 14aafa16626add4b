"""The Celery side of the benchmark: one no-op task, Redis as broker and backend.
Workers: ``celery -A bench.celery_app worker``; the URLs come from the environment."""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery(
    "bench",
    broker=os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/2"),
    backend=os.environ.get("BENCH_CELERY_BACKEND", "redis://127.0.0.1:6379/3"),
)
app.conf.update(
    task_acks_late=True,  # like taskloom: a task is not lost if its worker dies
    worker_prefetch_multiplier=64,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)


@app.task  # type: ignore[untyped-decorator]
def sleep(seconds: float) -> float:
    """Sleeps; returns how long it took, as the body sees it."""
    start = time.perf_counter()
    time.sleep(seconds)
    return time.perf_counter() - start


@app.task  # type: ignore[untyped-decorator]
def noop(*args: object) -> float:
    return time.time()
