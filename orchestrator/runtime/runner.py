"""``Runtime``: one workflow bound to one store, ready to run tasks.

Building a runtime does the expensive work once: open the store, bind its keystore
(see ``scopegraph.trust``), parse and validate the policies, compile the graph. Each run then
only mints, verifies, decides and revokes. Every grant of a run is revoked when the
run ends, whether it completes, pauses, fails, raises or is cancelled.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context

from .. import tracing as tr
from ..approvals import ApprovalRequest
from ..approvers import Principal
from ..clock import Clock
from ..errors import ConfigError, RunBusyError, StoreError
from ..gateway import CALLER_LOOP
from ..guard import Guard, owner_alive
from ..keys import Keystore
from ..plan import Plan
from ..policy import PolicyEngine
from ..run_events import Listener, RunEvent
from ..session import Session
from ..store import SqliteStore, Store
from ..store.postgres import PostgresStore, checkpointer_for_postgres
from ..store.sqlite import WAL_AUTOCHECKPOINT_PAGES
from ..workflow import Workflow
from .graph import build_graph, final_status
from .repeat import plan_view
from .report import CallReport, RunReport, StepReport
from .routing import Routing

RUN_LEASE_SECONDS = 3600.0
_NOTHING_TO_DO = object()  # ``Runtime._resumption``: the run is finished, or still waits


@dataclass
class _Resumed:
    """What ``Runtime.resume`` read under the run's lease, for the drive it starts."""

    plan: Any  # the plan of the checkpoint it resumes from (see ``current_plan``)
    answered: dict[str, ApprovalRequest]  # each handed over once (see ``answered_request``)



class Runtime:
    """Runs one workflow against one store. Use as a context manager, or call ``close``."""

    def __init__(
        self,
        workflow: Workflow,
        *,
        store: str | Store | None = None,
        clock: Clock | None = None,
        policy: PolicyEngine | None = None,
        target: str = "",
        keystore: Keystore | None = None,
    ) -> None:
        """``keystore`` holds the private keys; by default the one configured for the store
        (``$SCOPEGRAPH_KEYSTORE``, or ``keys/`` beside a SQLite store: see ``scopegraph.trust``)."""
        workflow.require_executor()
        self.workflow = workflow
        # Every decision of every run goes through the guard's sessions (see ``scopegraph.session``).
        self.guard = Guard(workflow, store=store, clock=clock, policy=policy, target=target, keystore=keystore)
        g = self.guard
        self.clock, self.target, self.store, self.policy, self.trust = g.clock, g.target, g.store, g.policy, g.trust
        self.domain, self.issuer, self.ledger, self.metrics = g.domain, g.issuer, g.ledger, g.metrics
        self.approvers, self.approvals, self.secrets, self.gateway = g.approvers, g.approvals, g.secrets, g.gateway
        try:
            self._trace_contexts: dict[str, Context] = {}
            self._listeners: dict[str, Listener] = {}
            self._plans: dict[str, tuple[Any, Plan]] = {}
            self._routings: dict[str, Routing] = {}
            self._resumed: dict[str, _Resumed] = {}
            self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            self._saver_conn, self.checkpointer = _checkpointer_for(self.store)
            self.graph = build_graph(self).compile(checkpointer=self.checkpointer)
            self.secrets.sweep()  # downstream credentials a crash left behind (ended or abandoned steps)
        except BaseException:
            g.close()  # a refused start leaves nothing open
            raise

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._saver_conn.close()
        self.guard.close()

    def session(self, run_id: str, *, initiator: str | None = None, plan: Plan | None = None) -> Session:
        """The decision session of run ``run_id`` (see ``Guard.session``), telling the
        listener of the drive in progress, if any."""
        return self.guard.session(run_id, initiator=initiator, plan=plan, listener=self._listeners.get(run_id))

    def run(self, task: str, *, initiator: str | Principal | None = None, run_id: str | None = None,
            on_event: Listener | None = None) -> RunReport:
        """Plan and execute ``task``; return the run record.

        ``on_event`` is told of each event of the run as it happens (see
        ``scopegraph.run_events``), from the thread that drives it: parallel steps run in
        threads of their own, so a listener must be thread-safe.

        ``initiator`` is who starts the run, an authenticated principal: the operating-system
        user by default, or one the embedding application passes (a name it vouches for, or
        a ``Principal``). Nobody answers the run's approvals under any spelling of that name.

        Raises:
            ConfigError: empty task, bad run id, or an invalid initiator name.
        """
        with self.store.atomic():  # the run, its lease and its first audit record land together
            session = self.guard.start_run(task, initiator=initiator, run_id=run_id, listener=on_event)
            self._take_lease(session.run_id, self.clock.now())
        run_id = session.run_id
        if on_event is not None:
            self._listeners[run_id] = on_event
        # Only what the run needs from the start: every channel written is a row per checkpoint
        # (``steps`` and ``data_labels`` start empty; ``on_denial`` defaults to "fail").
        initial = {
            "run_id": run_id, "workflow": self.workflow.name, "task": task, "initiator": session.initiator,
            "planner_id": str(session.planner_id),
        }
        if self.workflow.on_denial != "fail":
            initial["on_denial"] = self.workflow.on_denial
        try:
            with self._lease(run_id, taken=True) as leased:
                return self._drive_leased(run_id, initial, None, leased, session)
        finally:
            self._listeners.pop(run_id, None)

    def resume(self, run_id: str, *, on_event: Listener | None = None) -> RunReport:
        """Continue a paused or crashed run from its last checkpoint (``on_event`` as for ``run``).

        Answered approvals are resumed each by its own interrupt id; unanswered ones stay
        pending. A run that crashed mid-step re-runs that step: calls that completed are
        replayed from their idempotency records, never run twice.

        Raises:
            ConfigError: the run is unknown, or belongs to another workflow.
        """
        record = self.store.get_run(run_id)
        if record is None:
            raise ConfigError(f"unknown run {run_id!r}")
        if record.workflow != self.workflow.name:
            raise ConfigError(f"run {run_id!r} belongs to workflow {record.workflow!r}, not {self.workflow.name!r}")
        if on_event is not None:
            self._listeners[run_id] = on_event
        try:
            return self._resume(run_id, record.initiator)
        finally:
            self._listeners.pop(run_id, None)

    def _resume(self, run_id: str, initiator: str) -> RunReport:
        # The lease first: the checkpoint is read, and grants revoked, only by the one driver.
        # (Read before it, another driver could finish the run meanwhile, or have its live
        # grants revoked under it.) The lease, that read and, when the run goes on, its
        # revocations and ``run_resumed`` are one transaction: while it is open no other
        # driver can take the lease (it waits on the run's row: PostgreSQL's row lock,
        # SQLite's one writer), and it commits before anything new is minted.
        with self.store.atomic():
            self._take_lease(run_id, self.clock.now())
            snapshot = self.graph.get_state(self._config(run_id))
            graph_input, answered = self._resumption(snapshot)
            if graph_input is _NOTHING_TO_DO:
                self.store.release_run(run_id, owner=self._owner)
            else:
                # Grants a crashed process left behind are revoked before anything new is minted.
                self.store.set_run_status(run_id, "running", at=self.clock.now())
                self.guard.revoke_run(run_id, reason="resumed after interruption")
                self.ledger.append("run_resumed", run_id,
                                   reason="approval answered" if snapshot.interrupts else "crash recovery")
        if graph_input is _NOTHING_TO_DO:  # finished, or nothing answered yet: nothing changes
            return self.report(run_id, state=dict(snapshot.values or {}))
        with self._lease(run_id, taken=True) as leased:
            self._resumed[run_id] = _Resumed(plan=snapshot.values.get("plan"), answered=answered)
            parent = tr.extract_context(snapshot.values.get("trace"))
            return self._drive_leased(run_id, graph_input, parent, leased,
                                      self.session(run_id, initiator=initiator))

    def _resumption(self, snapshot: Any) -> tuple[Any, dict[str, ApprovalRequest]]:
        """What to resume the graph with from its last checkpoint (``_NOTHING_TO_DO``: the
        run has finished, or none of its approvals is answered yet), and the answered
        requests as read for it."""
        if not snapshot.next:
            return _NOTHING_TO_DO, {}
        if not snapshot.interrupts:
            return None, {}  # crash recovery: the checkpoint's tasks run again
        now = self.clock.now()
        waiting = {intr.id: self.approvals.get(intr.value["approval_id"]) for intr in snapshot.interrupts}
        if all(a.effective_status(now) == "pending" for a in waiting.values()):
            return _NOTHING_TO_DO, {}
        # Every interrupt is resumed by its own id. An approval node whose request is
        # still pending returns unchanged, so steps that do not depend on it can run
        # before the run pauses again for it.
        answered = {a.id: a for a in waiting.values() if a.effective_status(now) != "pending"}
        return Command(resume={intr_id: a.id for intr_id, a in waiting.items()}), answered

    def answered_request(self, run_id: str, approval_id: str) -> ApprovalRequest:
        """The answered approval request ``approval_id`` of ``run_id``, for the approval node
        it woke: as ``resume`` read it under the run's lease, handed over once, or read now.

        An answer is final once given (approved only turns consumed, by the run's own call,
        or expired, which ``effective_status`` tells at the time it is asked): the node
        decides from it only which way the step goes on. What authorizes the call (the
        gateway's check of the approval, and its consumption with the call's use) reads
        the request afresh. A request still pending is never handed over: it is read now.
        """
        resumed = self._resumed.get(run_id)
        request = resumed.answered.pop(approval_id, None) if resumed is not None else None
        return request if request is not None else self.approvals.get(approval_id)

    # async -----------------------------------------------------------------------------------
    # The checkpointer and the store are synchronous, so a run is driven in one worker
    # thread; every async tool it calls is awaited on the caller's own loop (see
    # ``gateway.CALLER_LOOP``), never on a loop or a thread of its own.
    async def arun(self, task: str, *, initiator: str | Principal | None = None, run_id: str | None = None,
                   on_event: Listener | None = None) -> RunReport:
        """``run`` for a host on an event loop (``on_event`` is called from the driving thread)."""
        return await _drive_in_worker(lambda: self.run(task, initiator=initiator, run_id=run_id, on_event=on_event))

    async def aresume(self, run_id: str, *, on_event: Listener | None = None) -> RunReport:
        """``resume`` for a host on an event loop."""
        return await _drive_in_worker(lambda: self.resume(run_id, on_event=on_event))

    def astream(self, task: str, *, initiator: str | Principal | None = None,
                run_id: str | None = None) -> AsyncIterator[RunEvent]:
        """Run ``task``, yielding its events as they happen (a plan fixed, steps started and
        ended, decisions, approvals requested and answered), ``RunEnded`` last. The
        report is then ``report(event.run_id)``."""
        return _events_of(lambda listener: self.arun(task, initiator=initiator, run_id=run_id, on_event=listener))

    def astream_resume(self, run_id: str) -> AsyncIterator[RunEvent]:
        """``astream`` for ``resume``."""
        return _events_of(lambda listener: self.aresume(run_id, on_event=listener))

    def plan_for(self, run_id: str, data: dict[str, Any]) -> Plan:
        """The validated plan of a run, parsed once per plan object rather than once per step.

        LangGraph hands every node of one invocation the same plan object, or a shallow
        copy of it (the ``plan`` channel copies its value for a node's view), which holds
        the same list of steps; holding a reference makes the identity check sound (the id
        cannot be reused while cached).
        """
        cached = self._plans.get(run_id)
        if cached is not None and (cached[0] is data or cached[0].get("steps") is data.get("steps") is not None):
            return cached[1]
        plan = Plan.model_validate(data)
        self._plans[run_id] = (data, plan)
        return plan

    def routing_for(self, run_id: str, plan: Plan) -> Routing:
        """What routing knows of ``run_id``'s records under ``plan``, for this drive."""
        routing = self._routings.get(run_id)
        if routing is None or routing.plan is not plan:
            routing = self._routings[run_id] = Routing(plan)
        return routing

    def current_plan(self, run_id: str) -> Plan:
        """The plan of ``run_id`` that the drive in progress routes by: the one ``plan_for``
        parsed last, or, for tasks a resumed drive runs before it routes at all, the plan
        of the run's latest checkpoint (the one those tasks were sent from).

        Raises:
            StoreError: the run has no checkpoint with a plan.
        """
        cached = self._plans.get(run_id)
        if cached is not None:
            return cached[1]
        resumed = self._resumed.get(run_id)
        if resumed is not None:
            data = resumed.plan  # that checkpoint, as ``resume`` read it under the lease
        else:
            # The state, not the raw checkpoint: the plan is in a delta channel (see ``state``),
            # which a checkpoint holds only as the writes that made it.
            data = self.graph.get_state(self._config(run_id)).values.get("plan")
        if not isinstance(data, dict):
            raise StoreError(f"run {run_id!r} has no plan in its checkpoint")
        return self.plan_for(run_id, data)

    def trace_context(self, run_id: str) -> Context | None:
        """The span context nodes of ``run_id`` nest under (the current drive's root span)."""
        return self._trace_contexts.get(run_id)

    def revoke_run(self, run_id: str, *, reason: str) -> int:
        """Revoke every live grant of ``run_id``, and audit it (its downstream credentials too)."""
        return self.guard.revoke_run(run_id, reason=reason)

    def _config(self, run_id: str) -> RunnableConfig:
        return {"configurable": {"thread_id": run_id}, "recursion_limit": 10_000}

    @contextmanager
    def _lease(self, run_id: str, *, taken: bool = False) -> Iterator[list[bool]]:
        """Hold the run's lease (unless ``taken`` already); release it at the end unless the
        drive released it already (``leased[0]`` false).

        Raises:
            RunBusyError: another runtime holds the lease.
        """
        if not taken:
            self._take_lease(run_id, self.clock.now())
        leased = [True]
        try:
            yield leased
        finally:
            if leased[0]:  # only if ``_drive_leased`` did not get to release it itself
                self.store.release_run(run_id, owner=self._owner)

    def _take_lease(self, run_id: str, now: float) -> None:
        """Take the right to drive ``run_id`` (in the caller's transaction, if any).

        Raises:
            RunBusyError: another runtime holds the lease.
        """
        holder = self.store.acquire_run(run_id, owner=self._owner, until=now + RUN_LEASE_SECONDS,
                                        now=now, owner_alive=owner_alive)
        if holder is not None:
            raise RunBusyError(f"run {run_id!r} is being driven by another runtime ({holder})")

    def _drive_leased(self, run_id: str, graph_input: Any, parent: Context | None,
                      leased: list[bool], session: Session) -> RunReport:
        config = self._config(run_id)
        status, error = "failed", None
        final: dict[str, Any] | None = None
        with tr.span(f"{tr.INVOKE_WORKFLOW} {self.workflow.name}", {
            tr.GEN_AI_OPERATION: "invoke_workflow", tr.WORKFLOW: self.workflow.name, tr.RUN_ID: run_id,
            "scopegraph.resumed": parent is not None,
        }, context=parent) as root:
            self._trace_contexts[run_id] = otel_trace.set_span_in_context(root)
            if isinstance(graph_input, dict):
                carrier = tr.inject_traceparent()
                if carrier:  # nothing to carry when tracing is off
                    graph_input["trace"] = carrier
            try:
                final = self.graph.invoke(graph_input, config, durability="sync")
                if final.get("__interrupt__"):
                    status = "paused"
                else:
                    status = final_status(final)
                error = final.get("error")
            except BaseException as exc:
                status = "cancelled" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
                error = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, Exception):
                    raise
            finally:
                # Whatever happened above, no grant of this run outlives it; the revocations,
                # the outcome, its audit record, the signed head and the lease land in one write.
                with self.store.atomic():
                    session.end_run(status=status, error=error)
                    self.store.release_run(run_id, owner=self._owner)
                    leased[0] = False
                self._trace_contexts.pop(run_id, None)
                self._plans.pop(run_id, None)
                self._routings.pop(run_id, None)
                self._resumed.pop(run_id, None)
                root.set_attribute(tr.RUN_STATUS, status)
                if status not in ("completed", "paused", "denied"):  # a denial is an outcome, not an error
                    tr.set_error(root, status)
        # The status just written with the run's end: its record is not read back for it.
        return self._report(run_id, error=error, state=final, status=status)

    def report(self, run_id: str, *, error: str | None = None,
               state: dict[str, Any] | None = None) -> RunReport:
        """Build the run record from the last checkpoint (or ``state``) and the store."""
        return self._report(run_id, error=error, state=state)

    def _report(self, run_id: str, *, error: str | None = None, state: dict[str, Any] | None = None,
                status: str | None = None) -> RunReport:
        """``report``; ``status``: the run's status, when the caller has just written it."""
        if state is None:
            state = dict(self.graph.get_state(self._config(run_id)).values or {})
        if status is None:
            record = self.store.get_run(run_id)
            if record is None and not state:
                raise ConfigError(f"unknown run {run_id!r}")
            status = record.status if record else state.get("status", "failed")
        grants = self.store.grants_for_run(run_id)
        now = self.clock.now()
        approvals = [
            {"id": a.id, "digest": a.digest, "tool": a.tool, "step_id": a.step_id,
             "status": a.effective_status(now), "approver": ", ".join(a.approvers) or None,
             "approvers": a.approvers, "required_approvals": a.required_approvals,
             "decided_at": a.decided_at, "consumed": a.consumed_at is not None,
             "denied_by": a.denial.approver if a.denial else None,
             "reason": a.denial.reason if a.denial else None,
             "answers": a.answers(), "still_needed": a.still_needed}
            for a in self.approvals.list(run_id=run_id)
        ]
        steps_state = state.get("steps") or {}
        steps: list[StepReport] = []
        if state.get("plan"):
            plan = Plan.model_validate(state["plan"])
            view = plan_view(plan, steps_state)  # a repeated step: one record, its iterations as children
            by_step: dict[str, list[Any]] = {}
            for g in grants:  # grouped once: a scan of all grants per step is O(N²) per report
                by_step.setdefault(g.step_id, []).append(g)
            for step in plan.steps:
                s = view.get(step.id)
                if s is None:
                    steps.append(StepReport(step_id=step.id, tool=step.tool, status="not_started"))
                    continue
                widened = step.id in (state.get("widened") or ())
                steps.append(_step_report(s, step.tool, by_step, widened))
        return RunReport(
            run_id=run_id, workflow=self.workflow.name, status=status,  # type: ignore[arg-type]
            error=error or state.get("error"), planner_spiffe_id=state.get("planner_id"),
            steps=steps, grants_minted=len(grants),
            grants_revoked=sum(1 for g in grants if g.revoked_at is not None),
            approvals=approvals, replans=int(state.get("replans") or 0),
        )


def _step_report(s: dict[str, Any], tool: str, grants: dict[str, list[Any]], widened: bool = False) -> StepReport:
    sid = s["step_id"]
    status: Any = "failed" if s["status"] == "running" else s["status"]  # a repeated step cut short
    return StepReport(
        step_id=sid, tool=s.get("tool") or tool, status=status, spiffe_id=s.get("spiffe_id"),
        grant_id=s.get("grant_id"), decision=s.get("decision"),
        policy_ids=s.get("policy_ids") or [], reason=s.get("reason") or "",
        revoked=all(g.revoked_at is not None for g in grants.get(sid, ())),
        approval_id=s.get("approval_id"),
        calls=[CallReport(**c) for c in s.get("calls") or []],
        widened=widened,
        children=[_step_report(c, c.get("tool") or tool, grants) for c in s.get("children") or []],
    )


async def _drive_in_worker(drive: Callable[[], RunReport]) -> RunReport:
    """Drive a run in one worker thread, its async tools awaited on this loop."""
    token = CALLER_LOOP.set(asyncio.get_running_loop())
    try:
        return await asyncio.to_thread(drive)  # the thread runs in a copy of this context
    finally:
        CALLER_LOOP.reset(token)


async def _events_of(start: Callable[[Listener], Awaitable[RunReport]]) -> AsyncIterator[RunEvent]:
    """The events of the drive ``start`` begins, as they arrive from its thread."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[RunEvent | None] = asyncio.Queue()

    def listener(event: RunEvent) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    drive = asyncio.ensure_future(start(listener))
    # Queued after every event the thread sent: the thread's end reaches this loop last.
    drive.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (event := await queue.get()) is not None:
            yield event
        drive.result()  # a drive that raised raises here
    finally:
        if not drive.done():  # the consumer stopped early: the run still ends cleanly
            await asyncio.shield(drive)


def checkpoints_path(store: Path) -> Path:
    """Where LangGraph's checkpoints of the SQLite store at ``store`` live: a file of their
    own beside it (``runs.db`` → ``runs.checkpoints.db``), so the checkpointer's commits
    do not invalidate the store connection's page cache; or the store's own file, for a
    store made when they lived there (its paused runs resume from where they are)."""
    if _holds_checkpoints(store):
        return store
    return store.with_name(f"{store.stem}.checkpoints{store.suffix}")


def _holds_checkpoints(path: Path) -> bool:
    if not path.is_file():
        return False
    with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True, timeout=10.0)) as conn:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'checkpoints'").fetchone() is None:
            return False
        return conn.execute("SELECT 1 FROM checkpoints LIMIT 1").fetchone() is not None


def _checkpointer_for(store: Store) -> tuple[Any, BaseCheckpointSaver[Any]]:
    """LangGraph's saver beside the store (see ``checkpoints_path``), and the connection
    (or pool) to close."""
    if isinstance(store, PostgresStore):
        return checkpointer_for_postgres(store)
    if not isinstance(store, SqliteStore):
        raise ConfigError(f"no checkpointer for store {store.url!r}")
    try:
        conn = sqlite3.connect(str(checkpoints_path(store.path)), check_same_thread=False, timeout=10.0)
        saver = SqliteSaver(conn)
        saver.setup()
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")  # as the store's own connection
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open checkpoints in {store.url!r}: {exc}") from exc
    return conn, saver
