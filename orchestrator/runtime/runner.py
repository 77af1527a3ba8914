"""``Runtime``: one workflow bound to one store, ready to run tasks.

Building a runtime does the expensive work once: open the store, load or create the
trust domain key, parse and validate the policies, compile the graph. Each run then
only mints, verifies, decides and revokes. Every grant of a run is revoked when the
run ends, whether it completes, pauses, fails, raises or is cancelled.
"""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

from langgraph.checkpoint.sqlite import SqliteSaver

from ..clock import Clock, SystemClock
from ..credentials import GrantIssuer
from ..errors import ConfigError, StoreError
from ..gateway import Gateway
from ..identity import TrustDomain
from ..plan import Plan
from ..policy import CedarPolicyEngine, PolicyEngine
from ..store import RunRecord, SqliteStore, Store, open_store
from ..workflow import Workflow
from .graph import build_graph
from .report import CallReport, RunReport, StepReport


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
    ) -> None:
        self.workflow = workflow
        self.clock = clock or SystemClock()
        self.store = store if store is not None and not isinstance(store, str) else open_store(store)
        self.target = target or workflow.name
        # Policies are validated before anything else can happen: an invalid file stops here.
        self.policy = policy or CedarPolicyEngine.from_paths(
            workflow.policies, workflow.registry, schema=workflow.schema
        )
        self.domain = TrustDomain(workflow.trust_domain, self.store, clock=self.clock)
        self.issuer = GrantIssuer(self.domain, self.store, clock=self.clock,
                                  ttl=workflow.grant_ttl, max_uses=workflow.grant_max_uses)
        self.gateway = Gateway(tools=workflow.registry, issuer=self.issuer, policy=self.policy,
                               store=self.store, clock=self.clock, retry=workflow.retry)
        self._saver_conn, self.checkpointer = _checkpointer_for(self.store)
        self.graph = build_graph(self).compile(checkpointer=self.checkpointer)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._saver_conn.close()
        self.store.close()

    def run(self, task: str, *, initiator: str = "anonymous", run_id: str | None = None) -> RunReport:
        """Plan and execute ``task``; return the run record.

        Raises:
            ConfigError: empty task or bad run id.
        """
        if not task or not task.strip():
            raise ConfigError("the task is empty")
        run_id = run_id or uuid.uuid4().hex
        if not run_id.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"invalid run id {run_id!r}")
        now = self.clock.now()
        self.store.upsert_run(RunRecord(
            run_id=run_id, workflow=self.workflow.name, target=self.target, initiator=initiator,
            status="running", created_at=now, updated_at=now,
        ))
        planner_id = self.domain.id("wf", self.workflow.name, "run", run_id, "planner")
        initial = {
            "run_id": run_id, "workflow": self.workflow.name, "task": task, "initiator": initiator,
            "planner_id": str(planner_id), "steps": {}, "data_labels": [],
        }
        config = {"configurable": {"thread_id": run_id}, "recursion_limit": 10_000}
        status, error = "failed", None
        try:
            final = self.graph.invoke(initial, config, durability="sync")
            status = final.get("status", "failed")
            error = final.get("error")
        except BaseException as exc:
            status = "cancelled" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
            error = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, Exception):
                raise
        finally:
            # Whatever happened above, no grant of this run outlives it.
            self.issuer.revoke_run(run_id, reason=f"run {status}")
            self._set_status(run_id, status)
        return self.report(run_id, error=error)

    def report(self, run_id: str, *, error: str | None = None) -> RunReport:
        """Build the run record from the last checkpoint and the store."""
        snapshot = self.graph.get_state({"configurable": {"thread_id": run_id}})
        state: dict[str, Any] = dict(snapshot.values or {})
        record = self.store.get_run(run_id)
        if record is None and not state:
            raise ConfigError(f"unknown run {run_id!r}")
        grants = self.store.grants_for_run(run_id)
        steps_state = state.get("steps") or {}
        steps: list[StepReport] = []
        if state.get("plan"):
            for step in Plan.model_validate(state["plan"]).steps:
                s = steps_state.get(step.id)
                if s is None:
                    steps.append(StepReport(step_id=step.id, tool=step.tool, status="not_started"))
                    continue
                steps.append(StepReport(
                    step_id=step.id, tool=step.tool, status=s["status"], spiffe_id=s["spiffe_id"],
                    grant_id=s["grant_id"], decision=s.get("decision"),
                    policy_ids=s.get("policy_ids") or [], reason=s.get("reason") or "",
                    revoked=any(g.jti == s["grant_id"] and g.revoked_at is not None for g in grants),
                    calls=[CallReport(**c) for c in s.get("calls") or []],
                ))
        status = record.status if record else state.get("status", "failed")
        return RunReport(
            run_id=run_id, workflow=self.workflow.name, status=status,  # type: ignore[arg-type]
            error=error or state.get("error"), planner_spiffe_id=state.get("planner_id"),
            steps=steps, grants_minted=len(grants),
            grants_revoked=sum(1 for g in grants if g.revoked_at is not None),
        )

    def _set_status(self, run_id: str, status: str) -> None:
        record = self.store.get_run(run_id)
        if record is not None:
            self.store.upsert_run(RunRecord(
                run_id=run_id, workflow=record.workflow, target=record.target,
                initiator=record.initiator, status=status, created_at=record.created_at,
                updated_at=self.clock.now(),
            ))


def _checkpointer_for(store: Store) -> tuple[sqlite3.Connection, SqliteSaver]:
    if not isinstance(store, SqliteStore):
        raise ConfigError(f"no checkpointer for store {store.url!r}")
    try:
        conn = sqlite3.connect(str(store.path), check_same_thread=False, timeout=10.0)
        saver = SqliteSaver(conn)
        saver.setup()
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open checkpoints in {store.url!r}: {exc}") from exc
    return conn, saver
