"""Submitting runs to a queue on PostgreSQL, and worker processes that drive them.

The queue is procrastinate's (PostgreSQL tables in the store's own schema, ``SELECT … FOR
UPDATE SKIP LOCKED`` to take a job, LISTEN/NOTIFY wake-ups, retries, stalled-job recovery
from worker heartbeats). One job kind, ``scopegraph.drive_run``, carries a run id; the job
for a run is locked on that id, so jobs of one run never run side by side, and the
runtime's run lease refuses a second driver even if they did.

A worker also watches the store for runs that can move on: a run paused for approval
whose approvals were answered after it paused (from any machine, by any means) gets a
resume job; a job left ``doing`` by a worker that stopped sending heartbeats (killed) is
put back in the queue, and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import procrastinate
import psycopg
from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.schema import SchemaManager
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from .approvals import ApprovalRequest
from .errors import ConfigError, RunBusyError, StoreError
from .loader import load_workflow
from .runtime import Runtime
from .store import RunRecord, open_store
from .store.postgres import ensure_schema, redact_url
from .timestamps import iso

DRIVE_TASK = "scopegraph.drive_run"
QUEUE = "scopegraph_runs"
# Retried: a store outage. Anything else ends the job. A run another driver holds is not
# retried in place: a retried job goes back to "todo" under its queueing lock, which a
# resume job queued meanwhile may hold (a unique violation that would stop the worker);
# it is queued again, later, as a new job instead (see ``Worker._drive``).
RETRY = procrastinate.RetryStrategy(max_attempts=20, exponential_wait=1, retry_exceptions={StoreError})
BUSY_RETRIES = 20
# Installing the queue's tables is serialised across processes with this advisory lock key.
_SCHEMA_LOCK = 0x5C09E6A


def require_postgres(store_url: str) -> None:
    """Raises:
    ConfigError: the store is not PostgreSQL (workers share runs through it).
    """
    if not store_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("workers need a postgresql:// store")


def install_queue(store_url: str) -> None:
    """Create the queue's tables in the store's schema unless they are there.

    Raises:
        ConfigError: the store is not PostgreSQL.
        StoreError: the database cannot be reached, or the store's schema is missing and
            cannot be created (the message gives the command that creates it).
    """
    require_postgres(store_url)
    try:
        with psycopg.connect(store_url, connect_timeout=5) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            ensure_schema(conn, redact_url(store_url))  # the queue's tables go in the store's schema
            row = conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()
            if not (row and row[0]):
                conn.execute(SchemaManager.get_schema())
    except psycopg.Error as exc:
        raise StoreError(f"cannot reach the queue's database: {_first_line(exc)}") from exc


def _outcome_line(report: Any) -> str:
    """One line for a run that stopped: paused (and for which approvals) or finished (and why not well)."""
    if report.status == "paused":
        pending = [a["id"] for a in report.approvals if a.get("status") == "pending"]
        return f"run {report.run_id} paused, waiting for approval {', '.join(pending) or '(answered)'}"
    tail = f": {_one_line(report.error)}" if report.error else ""
    return f"run {report.run_id} {report.status}{tail}"


def _one_line(text: str) -> str:
    """``text`` on one line, control and bidirectional characters escaped."""
    return "".join(c if unicodedata.category(c) not in ("Cc", "Cf") else c.encode("unicode_escape").decode()
                   for c in text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _app(store_url: str, drive: Callable[..., Any] | None = None) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=store_url))
    if drive is None:
        def drive(**_: Any) -> None:  # the submitter only defers; it never runs jobs
            raise RuntimeError("not a worker")
    app.task(name=DRIVE_TASK, queue=QUEUE, retry=RETRY)(drive)
    return app


def submit(workflow_target: str, task: str, initiator: str, store_url: str) -> str:
    """Queue a new run of ``workflow_target`` for ``task``; return its run id.

    The workflow is loaded here too, so a bad target fails now rather than on a worker.
    The run is recorded with status ``queued`` until a worker starts it.

    Raises:
        ConfigError: not a PostgreSQL store, bad target, or empty task.
        StoreError: the database cannot be reached.
    """
    return submit_many(workflow_target, [task], initiator, store_url)[0]


def submit_many(workflow_target: str, tasks: list[str], initiator: str, store_url: str) -> list[str]:
    """Queue one run per task over a single connection; return their run ids in order.

    Raises:
        ConfigError: not a PostgreSQL store, bad target, or an empty task.
        StoreError: the database cannot be reached.
    """
    require_postgres(store_url)
    if any(not task or not task.strip() for task in tasks):
        raise ConfigError("the task is empty")
    workflow = load_workflow(workflow_target)
    install_queue(store_url)
    run_ids = [uuid.uuid4().hex for _ in tasks]
    store = open_store(store_url)
    try:  # the run exists, as "queued", from the moment it is submitted
        now = time.time()
        with store.atomic():
            for run_id in run_ids:
                store.upsert_run(RunRecord(run_id=run_id, workflow=workflow.name, target=workflow_target,
                                           initiator=initiator, status="queued", created_at=now,
                                           updated_at=now))
    finally:
        store.close()
    _defer(store_url, [dict(run_id=r, target=workflow_target, task=t, initiator=initiator)
                       for r, t in zip(run_ids, tasks, strict=True)])
    return run_ids


def _defer(store_url: str, jobs: list[dict[str, Any]], *, dedupe: bool = False, delay: float = 0.0) -> int:
    """Queue drive jobs; with ``dedupe``, a run with a job already waiting gets no second one;
    with ``delay`` (seconds), the jobs wait that long before a worker may take them."""

    async def go() -> int:
        app = _app(store_url)
        queued = 0
        try:
            async with app.open_async():
                task = app.tasks[DRIVE_TASK]
                for job in jobs:
                    lock = job["run_id"]
                    deferrer = task.configure(lock=lock, queueing_lock=lock if dedupe else None,
                                              schedule_in={"seconds": int(delay)} if delay > 0 else None)
                    try:
                        await deferrer.defer_async(**job)
                        queued += 1
                    except AlreadyEnqueued:
                        pass
        except (OSError, psycopg.Error, procrastinate.exceptions.ConnectorException) as exc:
            raise StoreError(f"cannot reach the queue's database: {_first_line(exc)}") from exc
        return queued

    return asyncio.run(go())


def enqueue_resume(store_url: str, run_id: str) -> bool:
    """Queue a resume job for ``run_id`` if workers serve this store; return whether one was queued.

    Nothing is queued when the queue was never installed (nobody runs workers here), when the
    run is unknown, or when a job for the run is already waiting.

    Raises:
        StoreError: the database cannot be reached.
    """
    if not store_url.startswith(("postgresql://", "postgres://")):
        return False
    try:
        with psycopg.connect(store_url, connect_timeout=5) as conn:
            row = conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()
    except psycopg.Error as exc:
        raise StoreError(f"cannot reach the queue's database: {_first_line(exc)}") from exc
    if not (row and row[0]):
        return False
    store = open_store(store_url)
    try:
        record = store.get_run(run_id)
    finally:
        store.close()
    if record is None:
        return False
    return _defer(store_url, [dict(run_id=run_id, target=record.target)], dedupe=True) == 1


def resumable_runs(store_url: str) -> list[tuple[str, str]]:
    """``(run_id, target)`` of every paused run with an approval answered since it paused.

    Raises:
        StoreError: the store cannot be reached.
    """
    store = open_store(store_url)
    try:
        found = []
        for run in store.list_runs():
            if run.status != "paused":
                continue
            answers = [ApprovalRequest.model_validate_json(p) for p in store.list_approvals(run_id=run.run_id)]
            if any(a.decided_at is not None and a.decided_at >= run.updated_at for a in answers):
                found.append((run.run_id, run.target))
        return found
    finally:
        store.close()


def enqueue_resumable(store_url: str) -> int:
    """Queue a resume job for each run :func:`resumable_runs` finds; return how many were queued."""
    runs = resumable_runs(store_url)
    if not runs:
        return 0
    return _defer(store_url, [dict(run_id=r, target=t) for r, t in runs], dedupe=True)


@dataclass
class Worker:
    """Takes drive jobs from the queue and runs them, ``concurrency`` at a time.

    ``stalled_after`` is how long (seconds) a worker may go without a heartbeat before its
    jobs are put back in the queue; ``poll`` how often the store is checked for answered
    approvals and stalled jobs. ``on_event`` is told one line per run started (or
    resumed), paused and finished, and when a run another driver holds is put off.
    """

    store_url: str
    concurrency: int = 1
    stalled_after: float = 30.0
    poll: float = 2.0
    on_event: Callable[[str], None] | None = None
    _runtimes: threading.local = field(default_factory=threading.local, repr=False)
    _opened: list[Runtime] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        require_postgres(self.store_url)
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, not {self.concurrency!r}")
        for name in ("stalled_after", "poll"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"{name} {value!r} must be a finite number of seconds above 0")

    def run(self, *, once: bool = False,
            on_outage: Callable[[StoreError, float], None] | None = None) -> None:
        """Work until stopped; with ``once``, until nothing is left to do.

        A long-running worker (not ``once``) outlives an outage: while the database is
        unreachable it does nothing (no store, no work) and tries again with back-off,
        telling ``on_outage(error, seconds_until_retry)``; work resumes when it is back.

        Raises:
            StoreError: with ``once``, the database cannot be reached (fail closed, stop).
        """
        if once:
            self._run_connected(once=True)
            return
        for attempt in Retrying(
            retry=retry_if_exception_type(StoreError),
            wait=wait_exponential(multiplier=0.5, max=30.0),
            before_sleep=lambda state: on_outage(state.outcome.exception(), state.upcoming_sleep)  # type: ignore[arg-type, union-attr]
            if on_outage is not None else None,
        ):
            with attempt:
                self._run_connected(once=False)

    def _run_connected(self, *, once: bool) -> None:
        try:
            install_queue(self.store_url)
            asyncio.run(self._run(once))
        except (OSError, psycopg.Error, procrastinate.exceptions.ConnectorException) as exc:
            raise StoreError(f"cannot reach the queue's database: {_first_line(exc)}") from exc
        finally:
            self._close_runtimes()

    async def _run(self, once: bool) -> None:
        app = _app(self.store_url, self._drive)
        async with app.open_async():
            if once:
                while True:
                    await self._housekeep(app)
                    await app.run_worker_async(queues=[QUEUE], concurrency=self.concurrency, wait=False,
                                               install_signal_handlers=False)
                    if not await self._housekeep(app):
                        return
            # SIGINT/SIGTERM: stop taking jobs, let the runs in flight finish, then return.
            worker = asyncio.create_task(app.run_worker_async(
                queues=[QUEUE], concurrency=self.concurrency, wait=True, install_signal_handlers=True))
            try:
                while not worker.done():
                    await self._housekeep(app)
                    await asyncio.wait({worker}, timeout=self.poll)
                await worker
            finally:
                worker.cancel()

    async def _housekeep(self, app: procrastinate.App) -> int:
        """Requeue stalled jobs and answered runs; return how many jobs that queued."""
        requeued = 0
        for job in await app.job_manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=self.stalled_after):
            if job.id is not None:
                await app.job_manager.retry_job_by_id_async(
                    job.id, retry_at=datetime.datetime.now(datetime.timezone.utc))
                requeued += 1
        requeued += await asyncio.to_thread(enqueue_resumable, self.store_url)
        return requeued

    def _runtime(self, target: str) -> Runtime:
        """One runtime per target per worker thread (a runtime is not shared across threads)."""
        cache: dict[str, Runtime] = self._runtimes.__dict__.setdefault("by_target", {})
        if target not in cache:
            cache[target] = Runtime(load_workflow(target), store=self.store_url, target=target)
            with self._lock:
                self._opened.append(cache[target])
        return cache[target]

    def _drive(self, *, run_id: str, target: str, task: str | None = None, initiator: str = "anonymous",
               busy: int = 0) -> str:
        rt = self._runtime(target)
        record = rt.store.get_run(run_id)
        fresh = task is not None and (record is None or record.status == "queued")
        self._tell(f"run {run_id} {'started' if fresh else 'resumed'} ({rt.workflow.name})")
        try:
            if fresh:
                assert task is not None
                report = rt.run(task, initiator=initiator, run_id=run_id)
            else:  # an answered approval, or a job retried after its worker died
                report = rt.resume(run_id)
        except RunBusyError:
            # Another driver holds the run and takes it to its next stop. Look again later,
            # in case that driver dies: a new job, unless one for the run already waits.
            later = busy + 1 < BUSY_RETRIES
            if later:
                job: dict[str, Any] = {"run_id": run_id, "target": target, "busy": busy + 1}
                if task is not None:
                    job.update(task=task, initiator=initiator)
                _defer(self.store_url, [job], dedupe=True, delay=min(60.0, 2.0 ** busy))
            self._tell(f"run {run_id} busy: another driver holds it"
                       + (f"; looking again in {min(60.0, 2.0 ** busy):g} s" if later else ""))
            return "busy"
        self._tell(_outcome_line(report))
        return str(report.status)

    def _tell(self, line: str) -> None:
        if self.on_event is None:
            return
        stamped = f"{iso(time.time())} {line}"
        with self._lock:
            self.on_event(stamped)

    def _close_runtimes(self) -> None:
        with self._lock:
            runtimes, self._opened[:] = list(self._opened), []
        for rt in runtimes:
            try:
                rt.close()
            except Exception:  # closing is best effort; the process is ending
                pass


__all__ = ["Worker", "enqueue_resumable", "enqueue_resume", "install_queue", "require_postgres", "resumable_runs",
           "submit", "submit_many"]
