"""Tools, plans and assertions shared by the tests (fixtures live in ``conftest.py``)."""

from __future__ import annotations

from typing import Any

from scopegraph import Runtime, Tool, tool
from scopegraph.credentials import Grant
from scopegraph.gateway import CallContext
from scopegraph.identity import SpiffeId
from scopegraph.plan import Step


@tool(risk="read", labels=["confidential"])
def read_doc(path: str) -> dict[str, Any]:
    """Read a document (confidential)."""
    return {"path": path, "text": f"contents of {path}"}


@tool(risk="read")
def lookup(key: str, limit: int = 10) -> dict[str, Any]:
    """Look a key up."""
    return {"key": key, "value": len(key) * limit}


@tool(risk="write")
def write_note(title: str, amount: int) -> dict[str, Any]:
    """Write a note."""
    return {"title": title, "amount": amount, "written": True}


@tool(risk="egress")
def send_mail(to: str, body: str) -> str:
    """Send mail outside the organisation."""
    return "sent"


STANDARD_TOOLS: tuple[Tool, ...] = (read_doc, lookup, write_note, send_mail)

READ_PLAN: dict[str, Any] = {"steps": [
    {"id": "doc", "tool": "read_doc", "purpose": "read the document",
     "constraints": {"path": {"kind": "prefix", "prefix": "/docs/"}}},
    {"id": "look", "tool": "lookup", "purpose": "look the key up",
     "constraints": {"key": {"kind": "one_of", "values": ["alpha", "beta"]},
                     "limit": {"kind": "range", "min": 1, "max": 100}}},
]}


def assert_all_revoked(rt: Runtime, run_id: str, *, at_least: int = 0) -> None:
    """Every grant the store knows for ``run_id`` is revoked (invariant 1)."""
    grants = rt.store.grants_for_run(run_id)
    assert len(grants) >= at_least, f"expected at least {at_least} grants, store has {len(grants)}"
    live = [g.jti for g in grants if g.revoked_at is None]
    assert not live, f"grants of run {run_id!r} still live: {live}"


def mint_grant(rt: Runtime, tool_name: str, *, constraints: dict[str, Any] | None = None,
               run_id: str = "run1", step_id: str = "s1", workflow: str | None = None,
               subject: SpiffeId | None = None, role: str = "executor",
               labels: frozenset[str] = frozenset()) -> tuple[Grant, CallContext]:
    """Mint a real grant with ``rt.issuer`` and return it with the call context it belongs to.

    Constraints default to ``any`` for every argument of the tool.
    """
    wf = workflow or rt.workflow.name
    if constraints is None:
        constraints = {a: {"kind": "any"} for a in rt.workflow.registry[tool_name].argument_names()}
    step = Step(id=step_id, tool=tool_name, constraints=constraints)
    identity = subject or rt.domain.id("wf", wf, "run", run_id, "step", step_id, "executor")
    grant = rt.issuer.mint(
        subject=identity, tool=tool_name, run_id=run_id, step_id=step_id, workflow=wf,
        constraints=step.constraints,
        act={"sub": str(rt.domain.id("wf", wf, "run", run_id, "planner")), "act": {"sub": "user:tester"}},
    )
    ctx = CallContext(workflow=wf, run_id=run_id, step_id=step_id, principal=identity, role=role,
                      data_labels=labels)
    return grant, ctx


def demo_signature(service: Any, approval_id: str, approver: str, decision: str, reason: str = "") -> str:
    """``approver``'s signature over an answer, with the key ``scopegraph demo`` made for them
    (answers to the demo's requests must be signed: it enrols its approvers)."""
    from scopegraph.approvers import load_private_key, sign_answer
    from scopegraph.cli_trust import demo_key_path

    a = service.get(approval_id)
    key = load_private_key(demo_key_path(service.store, approver))
    return sign_answer(key, approval_id=a.id, digest=a.digest, decision=decision,  # type: ignore[arg-type]
                       approver=approver, reason=reason)
