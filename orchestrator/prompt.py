"""The terminal approval prompt: shows one exact call and asks approve or deny.

It answers through ``ApprovalService`` like the CLI and the Python API do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TextIO

from .approvals import ApprovalRequest, ApprovalService
from .display import printable_lines
from .errors import ApprovalError


def describe(a: ApprovalRequest) -> str:
    """A human-readable view of one request: what, why, and what the run has touched."""
    lines = [
        f"approval {a.id}  ({a.status})",
        f"  run        {a.run_id}  step {a.step_id}  workflow {a.workflow}",
        f"  requested  by {a.requester}",
        f"  started by {a.initiator}",
        f"  call       {a.tool}({json.dumps(a.arguments, sort_keys=True)})",
        f"  risk       {a.risk}",
        f"  purpose    {a.purpose or '-'}",
        f"  why        {'; '.join(a.reasons)}  [{', '.join(a.policy_ids)}]",
        f"  run has touched: {', '.join(a.data_labels) or 'no labelled data'}",
        f"  digest     {a.digest}",
        f"  needs      {a.required_approvals} approver(s) from {', '.join(a.allowed_approvers) or 'nobody'}"
        + (f"; so far: {', '.join(a.approvers)}" if a.approvals else ""),
    ]
    return printable_lines(lines)  # the purpose and reasons are others' words: no control characters


def prompt_for(
    service: ApprovalService,
    a: ApprovalRequest,
    *,
    ask: Callable[[str], str] = input,
    out: TextIO,
) -> bool:
    """Ask about one request; return ``True`` if it was answered, ``False`` if skipped."""
    print(describe(a), file=out)
    while True:
        choice = ask("approve, deny or skip? [a/d/s] ").strip().lower()
        if choice in ("s", "skip", ""):
            return False
        if choice not in ("a", "approve", "d", "deny"):
            print("please answer a, d or s", file=out)
            continue
        name = ask("your name: ").strip()
        reason = ask("reason: ").strip()
        try:
            if choice.startswith("a"):
                service.approve(a.id, approver=name, reason=reason)
            else:
                service.deny(a.id, approver=name, reason=reason)
        except ApprovalError as exc:
            print(f"not recorded: {exc}", file=out)
            continue
        return True
