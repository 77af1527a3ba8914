"""The terminal approval prompt: shows one exact call and asks approve or deny.

It answers through ``ApprovalService`` like the CLI and the Python API do. Another
shell may answer the same request meanwhile: the prompt reads the request again before
each question and after each answer, and while it waits at a terminal it watches the
store, so it says what was answered elsewhere instead of failing to record a stale
answer. Also here: the texts that show a request's answers (``describe``, ``tally``).
"""

from __future__ import annotations

import json
import os
import select
import sys
from collections.abc import Callable
from typing import Any, Literal, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .approvals import ApprovalRequest, ApprovalService, answer_text, shown
from .approvers import Decision, load_private_key, sign_answer
from .display import printable_lines
from .errors import ApprovalError, ConfigError


def relative(seconds: float) -> str:
    """A duration from now, the way people say it: ``in 14m``, ``3h ago``."""
    span = abs(seconds)
    if span < 60:
        amount = f"{int(span)}s"
    elif span < 3600:
        amount = f"{int(span // 60)}m"
    elif span < 86400:
        amount = f"{int(span // 3600)}h"
    else:
        amount = f"{int(span // 86400)}d"
    return f"in {amount}" if seconds >= 0 else f"{amount} ago"


def tally(a: ApprovalRequest, now: float) -> str:
    """The answers so far in a few words: ``1/2 approved``, ``denied by bob``, ``expired``."""
    state = a.effective_status(now)
    approved = f"{len(set(a.approvers))}/{a.required_approvals} approved"
    if a.denial is not None:
        return f"denied by {shown(a.denial.approver)}" + (f" ({approved})" if a.approvals else "")
    if state == "expired":
        return f"expired ({approved})"
    return approved


def still_needed_text(a: ApprovalRequest) -> str:
    """``1 more approval needed`` while a request waits for more approvers, else ``""``."""
    left = a.still_needed
    if left <= 0:
        return ""
    return f"{left} more approval{'s' if left > 1 else ''} needed"


def answer_lines(a: ApprovalRequest) -> list[str]:
    """One line per answer: who approved or denied, why, and what a denial proposed."""
    return [answer_text(given) for given in a.answers()]


def describe(a: ApprovalRequest, now: float | None = None) -> str:
    """A human-readable view of one request: what, why, what the run has touched, and
    every answer so far (with ``now``, also when it expires)."""
    lines = [
        f"approval {a.id}  ({a.status})",
        f"  run        {a.run_id}  step {a.step_id}  workflow {a.workflow}",
        f"  requested  by {a.requester}",
        f"  started by {shown(a.initiator)}",
        f"  call       {a.tool}({shown(json.dumps(a.shown_arguments(), sort_keys=True))})",
        f"  risk       {a.risk}",
        f"  purpose    {shown(a.purpose) or '-'}",
        f"  why        {shown('; '.join(a.reasons))}  [{', '.join(a.policy_ids)}]",
        f"  run has touched: {', '.join(a.data_labels) or 'no labelled data'}",
        f"  digest     {a.digest}",
        f"  needs      {a.required_approvals} approver(s) from {', '.join(a.allowed_approvers) or 'nobody'}",
    ]
    answers = answer_lines(a)
    for i, line in enumerate(answers):
        lines.append(f"  {'answers' if i == 0 else '':<10} {line}")
    if a.required_approvals > 1 or a.approvals:
        lines.append(f"  so far     {'; '.join(filter(None, [tally(a, now or 0.0), still_needed_text(a)]))}")
    if now is not None and a.effective_status(now) in ("pending", "approved"):
        lines.append(f"  expires    {relative(a.expires_at - now)}")
    return printable_lines(lines)  # the purpose and reasons are others' words: no control characters


class TerminalReader:
    """Reads answers line by line from a file descriptor (a terminal), and while it waits
    asks ``changed`` every ``poll`` seconds whether the question is still worth asking."""

    def __init__(self, stream: TextIO | int, out: TextIO, *, poll: float = 1.0) -> None:
        self.fd = stream if isinstance(stream, int) else stream.fileno()
        self.out = out
        self.poll = poll
        self._rest = b""  # what was read past the end of the last line

    def read(self, question: str, changed: Callable[[], bool]) -> str | None:
        """The next line typed, or ``None`` if ``changed`` said so first.

        Raises:
            EOFError: the input ended.
        """
        self.out.write(question)
        self.out.flush()
        while b"\n" not in self._rest:
            ready, _, _ = select.select([self.fd], [], [], self.poll)
            if not ready:
                if changed():
                    self._drop_typed_ahead()
                    self.out.write("\n")
                    self.out.flush()
                    return None
                continue
            chunk = os.read(self.fd, 4096)
            if not chunk:
                if not self._rest:
                    raise EOFError
                self._rest += b"\n"
                break
            self._rest += chunk
        line, _, self._rest = self._rest.partition(b"\n")
        return line.decode("utf-8", errors="replace").rstrip("\r")

    def _drop_typed_ahead(self) -> None:
        # Half an answer typed to the old question must not become the start of the next one.
        self._rest = b""
        if os.isatty(self.fd):
            import termios  # POSIX only, like the terminal it flushes

            termios.tcflush(self.fd, termios.TCIFLUSH)


class _Prompt:
    """One request at the terminal, kept in step with the store."""

    def __init__(self, service: ApprovalService, a: ApprovalRequest, ask: Callable[[str], str] | None,
                 out: TextIO, reader: TerminalReader | None,
                 key_for: Callable[[str], Ed25519PrivateKey | None] | None = None) -> None:
        self.service = service
        self.id = a.id
        self.ask = ask
        self.out = out
        self.reader = reader
        self.key_for = key_for
        self.current = service.get(a.id)  # read again: it may have been answered since it was listed

    def _now(self) -> float:
        return self.service.clock.now()

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _pending(self) -> bool:
        return self.current.effective_status(self._now()) == "pending"

    def _changed(self) -> bool:
        return _signature(self.service.get(self.id), self._now()) != _signature(self.current, self._now())

    def _refresh(self) -> bool:
        """Read the request again and say what changed; return whether it is still pending."""
        fresh = self.service.get(self.id)
        now = self._now()
        if _signature(fresh, now) != _signature(self.current, now):
            seen = {(g["approver"], g["answer"], g["at"]) for g in self.current.answers()}
            news = [line for g, line in zip(fresh.answers(), answer_lines(fresh), strict=True)
                    if (g["approver"], g["answer"], g["at"]) not in seen]
            for line in news:
                self._say(f"meanwhile, elsewhere: {line}")
            self.current = fresh
            self._say(self._status_line())
        self.current = fresh
        return self._pending()

    def _status_line(self) -> str:
        state = self.current.effective_status(self._now())
        if state == "pending":
            return f"approval {self.id} is still pending: " + "; ".join(
                filter(None, [tally(self.current, self._now()), still_needed_text(self.current)]))
        if state == "expired":
            return f"approval {self.id} expired before it was answered; nothing to record here"
        return f"approval {self.id} is {state} ({tally(self.current, self._now())}); nothing to record here"

    def _ask(self, question: str) -> str | None:
        """The answer to ``question``, or ``None`` once the request is no longer pending."""
        while True:
            if self.reader is not None:
                answer = self.reader.read(question, self._changed)
            else:
                assert self.ask is not None
                answer = self.ask(question)
            if not self._refresh():
                return None
            if answer is not None:
                return answer.strip()

    def run(self) -> bool:
        self._say(describe(self.current, self._now()))
        if not self._pending():
            self._say(self._status_line())
            return True
        try:
            return self._loop()
        except EOFError:  # no more input: the request stays pending
            self._say("")
            return not self._refresh()

    def _loop(self) -> bool:
        while True:
            choice = self._ask("approve, deny or skip? [a/d/s] ")
            if choice is None:
                return True
            choice = choice.lower()
            if choice in ("s", "skip", ""):
                self._say(f"skipped: {self._status_line()}")
                return False
            if choice not in ("a", "approve", "d", "deny"):
                self._say("please answer a, d or s")
                continue
            name = self._ask("your name: ")
            reason = self._ask("reason: ") if name is not None else None
            if name is None or reason is None:
                return True
            try:
                signature = self._signature(name, "approve" if choice.startswith("a") else "deny", reason)
                if signature is False:
                    return True  # answered elsewhere while the key was asked for
                if choice.startswith("a"):
                    updated = self.service.approve(self.id, approver=name, reason=reason, signature=signature)
                else:
                    updated = self.service.deny(self.id, approver=name, reason=reason, signature=signature)
            except ConfigError as exc:  # no key, or one that cannot be read
                self._say(f"not recorded: {exc}")
                continue
            except ApprovalError as exc:
                if not self._refresh():  # answered elsewhere meanwhile: said above, by whom
                    return True
                self._say(f"not recorded: {exc}")
                continue
            self.current = updated
            if updated.status == "pending":
                self._say(f"recorded: approved by {shown(name)}; {tally(updated, self._now())}, "
                          f"{still_needed_text(updated)} from someone else")
                continue
            self._say(f"recorded: approval {self.id} {updated.status}")
            return True


    def _signature(self, name: str, decision: Decision, reason: str) -> str | None | Literal[False]:
        """The signature of ``name``'s answer when answers must be signed (``None`` when not;
        ``False`` when the request was answered elsewhere meanwhile). The key is the one
        ``key_for`` finds for ``name``, else the file the person names.

        Raises:
            ConfigError: the key file cannot be read or is not an Ed25519 key.
        """
        if not self.service.signatures_required(self.current):
            return None
        key = self.key_for(name) if self.key_for is not None else None
        if key is None:
            path = self._ask(f"answers are signed: {shown(name)}'s private key file: ")
            if path is None:
                return False
            key = load_private_key(os.path.expanduser(path))
        self._say(f"signing as {shown(name)}")
        return sign_answer(key, approval_id=self.id, digest=self.current.digest, decision=decision,
                           approver=name, reason=reason)


def _signature(a: ApprovalRequest, now: float) -> tuple[Any, ...]:
    return (a.effective_status(now), len(a.approvals), a.denial is not None)


def prompt_for(
    service: ApprovalService,
    a: ApprovalRequest,
    *,
    ask: Callable[[str], str] | None = None,
    out: TextIO,
    stdin: TextIO | int | None = None,
    poll: float = 1.0,
    key_for: Callable[[str], Ed25519PrivateKey | None] | None = None,
) -> bool:
    """Ask about one request until it is no longer pending or the person skips it.

    Without ``ask`` the answers are read from ``stdin`` (default ``sys.stdin``), with
    the questions written to ``out``, and the store is watched while the prompt waits.
    When answers must be signed (approvers are enrolled), the answer is signed with the
    key ``key_for`` finds for the name given, else with a key file the prompt asks for.
    Returns ``True`` once the request is answered (here or elsewhere) or has expired,
    ``False`` while it is still pending (skipped, or the input ended).
    """
    reader = None if ask is not None else TerminalReader(stdin if stdin is not None else sys.stdin, out, poll=poll)
    return _Prompt(service, a, ask, out, reader, key_for).run()


def approval_json(a: ApprovalRequest, now: float) -> dict[str, Any]:
    """A request as ``approvals show/list --json`` print it: its fields (secret arguments
    masked), its status now, every answer in order, and how many more approvals it needs."""
    proposed = None if a.proposed_arguments is None else a.shown_arguments(a.proposed_arguments)
    return {**a.model_dump(mode="json"), "arguments": a.shown_arguments(), "proposed_arguments": proposed,
            "status": a.effective_status(now), "answers": a.answers(),
            "still_needed": a.still_needed if a.effective_status(now) == "pending" else 0}


def render_list(items: list[ApprovalRequest], now: float) -> str:
    """``approvals list``: a header, then one row per request with its expiry and answers so far."""
    rows = [("ID", "STATUS", "EXPIRES", "ANSWERS", "RUN", "STEP", "CALL")]
    for a in items:
        state = a.effective_status(now)
        expires = relative(a.expires_at - now) if state in ("pending", "approved", "expired") else "-"
        answers = "; ".join(filter(None, [tally(a, now), still_needed_text(a) if state == "pending" else ""]))
        rows.append((a.id, state, expires, answers, a.run_id, a.step_id,
                     f"{a.tool}({shown(json.dumps(a.shown_arguments(), sort_keys=True))})"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
                     for r in rows)
