"""The approval commands of the ``scopegraph`` CLI, and the terminal prompt.

Driven through ``scopegraph.cli.main`` on a SQLite store in ``tmp_path``: the demo pauses
(exit 3), an approver answers from "another process" (another ``main`` call with its own
store connection), and ``resume`` finishes the run. Refusals exit 2 with one line on stderr.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scopegraph.approvals import ApprovalService
from scopegraph.cli import main
from scopegraph.clock import SystemClock
from scopegraph.prompt import prompt_for
from scopegraph.store import open_store

INITIATOR = "alice"  # the demo allows alice and bob to approve


@pytest.fixture
def cli_store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli' / 'scopegraph.db'}"


@pytest.fixture(autouse=True)
def _no_global_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    # ``run``/``resume`` install global OpenTelemetry providers unless told not to.
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")


@pytest.fixture
def cli(cli_store: str, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``scopegraph --store <tmp> ARGS...``; return exit code, stdout and stderr."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--store", cli_store, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def paused_demo(cli: Callable[..., tuple[int, str, str]]) -> dict[str, Any]:
    code, out, err = cli("demo", "--json", "--as", INITIATOR)
    assert code == 3, err
    return json.loads(out)


@pytest.fixture
def service(cli_store: str) -> Iterator[ApprovalService]:
    store = open_store(cli_store)
    yield ApprovalService(store, clock=SystemClock())
    store.close()


def _pending_id(record: dict[str, Any]) -> str:
    [pending] = [a for a in record["approvals"] if a["status"] == "pending"]
    return str(pending["id"])


def _assert_one_line_error(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err


def test_demo_without_a_terminal_pauses_with_exit_3_and_lists_the_pending_approval(
        paused_demo: dict[str, Any]) -> None:
    assert paused_demo["status"] == "paused"
    [pending] = paused_demo["approvals"]
    assert pending["status"] == "pending"
    assert pending["tool"] == "file_expense"
    assert pending["id"].startswith("apr_") and len(pending["digest"]) == 64
    file_step = next(s for s in paused_demo["steps"] if s["step_id"] == "file")
    assert file_step["status"] == "awaiting_approval"
    assert file_step["approval_id"] == pending["id"]
    assert paused_demo["grants_minted"] == paused_demo["grants_revoked"] > 0


def test_approvals_list_and_show_describe_the_exact_pending_call(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any]) -> None:
    aid = _pending_id(paused_demo)
    code, out, _ = cli("approvals", "list", "--json")
    assert code == 0
    [listed] = json.loads(out)
    assert listed["id"] == aid and listed["status"] == "pending"
    assert listed["run_id"] == paused_demo["run_id"]

    code, out, _ = cli("approvals", "show", aid, "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["id"] == aid
    assert shown["digest"] == paused_demo["approvals"][0]["digest"]
    assert shown["tool"] == "file_expense"
    assert shown["arguments"] == {"employee": "e-17", "amount": 4250, "vendor": "Rail Europe"}
    assert shown["initiator"] == INITIATOR
    assert "confidential" in shown["data_labels"]
    assert shown["status"] == "pending"
    assert "writes-need-approval" in shown["policy_ids"]

    code, out, _ = cli("approvals", "show", aid)
    assert code == 0
    assert shown["digest"] in out and "file_expense" in out


def test_approve_then_resume_completes_the_step(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any]) -> None:
    aid, run_id = _pending_id(paused_demo), paused_demo["run_id"]
    code, out, err = cli("approve", aid, "--as", "bob", "--reason", "receipt matches")
    assert code == 0, err
    assert "approved" in out and run_id in out

    code, out, _ = cli("approvals", "list", "--json")
    assert code == 0 and json.loads(out) == []

    code, out, err = cli("resume", run_id, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["status"] == "completed"
    file_step = next(s for s in record["steps"] if s["step_id"] == "file")
    assert file_step["status"] == "completed"
    [used] = record["approvals"]
    assert (used["id"], used["status"], used["approver"], used["consumed"]) == (aid, "consumed", "bob", True)
    assert record["grants_minted"] == record["grants_revoked"]

    # A second resume runs nothing again and a second approval is refused.
    code, out, _ = cli("resume", run_id, "--json")
    assert code == 0 and json.loads(out)["approvals"][0]["status"] == "consumed"
    code, _, err = cli("approve", aid, "--as", "bob")
    assert code == 2
    _assert_one_line_error(err)


def test_approve_by_the_runs_initiator_exits_2_with_one_line(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any]) -> None:
    aid = _pending_id(paused_demo)
    code, out, err = cli("approve", aid, "--as", INITIATOR)
    assert code == 2
    assert out == ""
    _assert_one_line_error(err)
    assert INITIATOR in err
    code, out, _ = cli("approvals", "show", aid, "--json")
    assert json.loads(out)["status"] == "pending" and json.loads(out)["approvals"] == []


def test_approve_by_an_unlisted_approver_exits_2(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any]) -> None:
    code, _, err = cli("approve", _pending_id(paused_demo), "--as", "mallory")
    assert code == 2
    _assert_one_line_error(err)


def test_deny_without_a_reason_exits_2(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any]) -> None:
    aid = _pending_id(paused_demo)
    code, _, err = cli("deny", aid, "--as", "bob")
    assert code == 2
    _assert_one_line_error(err)
    code, _, err = cli("deny", aid, "--as", "bob", "--reason", "  ")
    assert code == 2
    _assert_one_line_error(err)
    code, out, _ = cli("approvals", "show", aid, "--json")
    assert json.loads(out)["status"] == "pending"


def test_deny_then_resume_ends_the_run_denied_with_the_reason(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any]) -> None:
    aid, run_id = _pending_id(paused_demo), paused_demo["run_id"]
    code, out, err = cli("deny", aid, "--as", "bob", "--reason", "amount exceeds the receipt", "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "denied"

    code, out, _ = cli("resume", run_id, "--json")
    assert code == 1
    record = json.loads(out)
    assert record["status"] == "denied"
    file_step = next(s for s in record["steps"] if s["step_id"] == "file")
    assert file_step["status"] == "denied"
    assert "amount exceeds the receipt" in file_step["reason"]
    assert record["approvals"][0]["denied_by"] == "bob"


def test_deny_with_a_proposal_pauses_again_on_a_new_approval(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any]) -> None:
    aid, run_id = _pending_id(paused_demo), paused_demo["run_id"]
    proposal = {"employee": "e-17", "amount": 4000, "vendor": "Rail Europe"}
    code, _, err = cli("deny", aid, "--as", "bob", "--reason", "seat upgrade not covered",
                       "--propose", json.dumps(proposal))
    assert code == 0, err

    code, out, _ = cli("resume", run_id, "--json")
    assert code == 3
    record = json.loads(out)
    new_id = _pending_id(record)
    assert new_id != aid
    code, out, _ = cli("approvals", "show", new_id, "--json")
    shown = json.loads(out)
    assert shown["arguments"] == proposal
    assert shown["digest"] != paused_demo["approvals"][0]["digest"]

    code, _, err = cli("approve", new_id, "--as", "bob")
    assert code == 0, err
    code, out, _ = cli("resume", run_id, "--json")
    assert code == 0
    assert {a["id"]: a["status"] for a in json.loads(out)["approvals"]} == {aid: "denied", new_id: "consumed"}


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]"])
def test_deny_with_a_malformed_proposal_exits_2(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any], bad: str) -> None:
    aid = _pending_id(paused_demo)
    code, _, err = cli("deny", aid, "--as", "bob", "--reason", "no", "--propose", bad)
    assert code == 2
    _assert_one_line_error(err)
    code, out, _ = cli("approvals", "show", aid, "--json")
    assert json.loads(out)["status"] == "pending"


def test_unknown_approval_and_unknown_run_exit_2(cli: Callable[..., tuple[int, str, str]]) -> None:
    for args in (("approvals", "show", "apr_nope"), ("approve", "apr_nope", "--as", "bob"),
                 ("deny", "apr_nope", "--as", "bob", "--reason", "x"), ("resume", "no-such-run")):
        code, _, err = cli(*args)
        assert code == 2, args
        _assert_one_line_error(err)


# the terminal prompt ---------------------------------------------------------------------
def _scripted(*answers: str) -> Callable[[str], str]:
    queue = list(answers)

    def ask(question: str) -> str:
        assert queue, f"the prompt asked {question!r} after the script ran out"
        return queue.pop(0)

    return ask


def test_the_prompt_shows_the_exact_call_and_approves_through_the_service(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any],
        service: ApprovalService) -> None:
    aid = _pending_id(paused_demo)
    request = service.get(aid)
    out = io.StringIO()
    # The initiator tries first and is refused; then bob approves.
    answered = prompt_for(service, request, ask=_scripted("a", INITIATOR, "mine", "a", "bob", "checked"), out=out)
    assert answered is True
    shown = out.getvalue()
    assert request.digest in shown
    assert '"amount": 4250' in shown and "file_expense" in shown
    assert "write calls need a human approval" in shown
    assert "confidential" in shown
    assert "not recorded:" in shown

    code, text, _ = cli("approvals", "show", aid, "--json")
    after = json.loads(text)
    assert after["status"] == "approved"
    assert [v["approver"] for v in after["approvals"]] == ["bob"]
    assert after["approvals"][0]["reason"] == "checked"

    code, text, _ = cli("resume", paused_demo["run_id"], "--json")
    assert code == 0 and json.loads(text)["status"] == "completed"


def test_the_prompt_can_skip_and_insists_on_a_reason_to_deny(
        paused_demo: dict[str, Any], service: ApprovalService) -> None:
    aid = _pending_id(paused_demo)
    out = io.StringIO()
    assert prompt_for(service, service.get(aid), ask=_scripted("s"), out=out) is False
    assert service.get(aid).status == "pending"

    out = io.StringIO()
    answered = prompt_for(service, service.get(aid),
                          ask=_scripted("x", "d", "bob", "", "d", "bob", "wrong vendor"), out=out)
    assert answered is True
    assert "please answer a, d or s" in out.getvalue()
    assert "not recorded:" in out.getvalue()
    denied = service.get(aid)
    assert denied.status == "denied"
    assert denied.denial is not None and (denied.denial.approver, denied.denial.reason) == ("bob", "wrong vendor")
