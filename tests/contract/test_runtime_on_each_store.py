"""A whole run, paused for approval and resumed by another runtime, on every store."""

from __future__ import annotations

from scopegraph import Runtime
from scopegraph.agents.demo import TASK, build_workflow
from scopegraph.ledger import Ledger

from .conftest import Backend


def test_a_run_pauses_is_approved_elsewhere_and_completes(backend: Backend) -> None:
    first = Runtime(build_workflow(), store=backend.url)
    try:
        report = first.run(TASK, initiator="carol")
        assert report.status == "paused"
        assert report.grants_minted == report.grants_revoked == 3  # no standing access while waiting
        (pending,) = report.approvals
        first.approvals.approve(pending["id"], approver="bob")
    finally:
        first.close()

    second = Runtime(build_workflow(), store=backend.url)  # another process would do the same
    try:
        done = second.resume(report.run_id)
        assert done.status == "completed", done.summary()
        assert {s.step_id: s.status for s in done.steps} == {
            "receipt": "completed", "limit": "completed", "file": "completed"}
        assert done.grants_minted == done.grants_revoked == 4
        assert done.approvals[0]["consumed"] is True
        # The approval cannot be used a second time, from any runtime.
        assert second.resume(report.run_id).status == "completed"
        verdict = Ledger(second.store, clock=second.clock).verify(run_id=report.run_id)
        assert verdict.ok, verdict.problem
        kinds = [r["kind"] for r in second.ledger.records(report.run_id)]
        assert kinds[0] == "run_started" and kinds[-1] == "run_ended"
        assert kinds.count("approval_consumed") == 1
    finally:
        second.close()
