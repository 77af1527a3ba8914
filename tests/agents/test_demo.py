"""The bundled demo, run on a store in ``tmp_path``: the curious executor is contained."""

from __future__ import annotations

from collections.abc import Callable

from scopegraph import Runtime
from scopegraph.agents import demo

from ..helpers import assert_all_revoked


def test_demo_denies_the_probes_and_pauses_the_write(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(demo.build_workflow())
    report = rt.run(demo.TASK, initiator="carol", run_id="demo1")
    assert report.status == "paused" and report.exit_code == 3
    steps = {s.step_id: s for s in report.steps}
    assert [s.step_id for s in report.steps] == ["receipt", "limit", "file"]

    receipt = steps["receipt"]
    assert receipt.status == "completed"
    assert [(c.tool, c.decision) for c in receipt.calls] == [
        ("send_email", "deny"), ("read_receipt", "deny"), ("read_receipt", "allow")]
    assert receipt.calls[0].policy_ids == ["scopegraph:grant"]
    assert "not for tool 'send_email'" in receipt.calls[0].reason
    assert receipt.calls[1].policy_ids == ["scopegraph:scope"]
    assert "'path' is outside the grant's scope" in receipt.calls[1].reason
    # The offending value stays out of the reason (reasons reach spans and the ledger).
    assert "salaries" not in receipt.calls[1].reason

    assert steps["limit"].status == "completed"
    assert steps["file"].status == "awaiting_approval"
    assert steps["file"].policy_ids == ["writes-need-approval"]

    ids = [report.planner_spiffe_id] + [s.spiffe_id for s in report.steps]
    assert len(set(ids)) == 4
    assert all(i.startswith("spiffe://demo.scopegraph.local/wf/expenses/run/demo1/") for i in ids)
    assert report.grants_minted == report.grants_revoked == 3
    assert_all_revoked(rt, "demo1", at_least=3)
