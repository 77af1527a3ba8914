"""The approval commands of the ``scopegraph`` CLI, and the terminal prompt.

Driven through ``scopegraph.cli.main`` on a SQLite store in ``tmp_path``: the demo pauses
(exit 3), an approver answers from "another process" (another ``main`` call with its own
store connection), and ``resume`` finishes the run. Refusals exit 2 with one line on stderr.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scopegraph.approvals import ApprovalService
from scopegraph.cli import main
from scopegraph.cli_trust import prompt_key_finder
from scopegraph.clock import SystemClock
from scopegraph.ledger import Ledger
from scopegraph.prompt import prompt_for
from scopegraph.store import open_store

from .helpers import demo_signature
from .orchestrator.test_approvals import two_person_policy

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


def prompt(service: ApprovalService, a: Any, **kwargs: Any) -> bool:
    """The terminal prompt as the CLI runs it: the demo's approvers sign with the keys it made."""
    return prompt_for(service, a, key_for=prompt_key_finder(service.store), **kwargs)


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
    answered = prompt(service, request, ask=_scripted("a", INITIATOR, "mine", "a", "bob", "checked"), out=out)
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
    assert prompt(service, service.get(aid), ask=_scripted("s"), out=out) is False
    assert service.get(aid).status == "pending"

    out = io.StringIO()
    answered = prompt(service, service.get(aid),
                          ask=_scripted("x", "d", "bob", "", "d", "bob", "wrong vendor"), out=out)
    assert answered is True
    assert "please answer a, d or s" in out.getvalue()
    assert "not recorded:" in out.getvalue()
    denied = service.get(aid)
    assert denied.status == "denied"
    assert denied.denial is not None and (denied.denial.approver, denied.denial.reason) == ("bob", "wrong vendor")


# approvals list ----------------------------------------------------------------------------
def test_approvals_list_has_a_header_the_expiry_and_the_answers_so_far(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any]) -> None:
    aid = _pending_id(paused_demo)
    code, out, _ = cli("approvals", "list")
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split() == ["ID", "STATUS", "EXPIRES", "ANSWERS", "RUN", "STEP", "CALL"]
    assert row.startswith(aid)
    # The demo's requests live 15 minutes; the run paused moments ago.
    assert re.search(r"  in 1[0-4]m  ", row), row
    assert "0/1 approved; 1 more approval needed" in row
    assert paused_demo["run_id"] in row and "file_expense(" in row

    code, out, _ = cli("approvals", "list", "--json")
    [listed] = json.loads(out)
    assert (listed["still_needed"], listed["answers"]) == (1, [])


# two approvers ------------------------------------------------------------------------------
WORKFLOW_FILE = '''
from pathlib import Path
from typing import Any

from scopegraph import Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner


@tool(risk="write")
def pay(vendor: str, amount: int) -> dict[str, Any]:
    """Pay a vendor's invoice."""
    return {"paid": amount, "vendor": vendor}


PLAN = {"steps": [{"id": "pay", "tool": "pay", "purpose": "pay the invoice",
                   "constraints": {"vendor": {"kind": "one_of", "values": ["Acme", "Bolt"]},
                                   "amount": {"kind": "range", "min": 1, "max": 500}}}]}

workflow = Workflow(name="payments", tools=[pay], planner=ScriptedPlanner(PLAN),
                    executor=DirectExecutor(builders={"pay": lambda ctx: {"amount": 120}}),
                    approvers=["alice", "bob", "carol"],
                    policies=[str(Path(__file__).with_name("two-person.cedar"))], baseline=False)
'''


@pytest.fixture
def two_person_target(tmp_path: Path) -> str:
    """A workflow file whose write needs two distinct approvers (of alice, bob, carol)."""
    folder = tmp_path / "payments"
    folder.mkdir()
    two_person_policy(folder)
    path = folder / "payments_wf.py"
    path.write_text(WORKFLOW_FILE)
    return f"{path}:workflow"


@pytest.fixture
def paused_payment(cli: Callable[..., tuple[int, str, str]], two_person_target: str) -> dict[str, Any]:
    code, out, err = cli("run", two_person_target, "--task", "pay invoice 7", "--as", "dave", "--json")
    assert code == 3, err
    return json.loads(out)


def test_the_first_of_two_approvals_says_one_more_is_needed_instead_of_resume(
        cli: Callable[..., tuple[int, str, str]], paused_payment: dict[str, Any]) -> None:
    aid = _pending_id(paused_payment)
    code, out, err = cli("approve", aid, "--as", "alice", "--reason", "fine")
    assert code == 0, err
    assert "1 of 2" in out and "1 more approval(s) needed" in out
    assert "resume" not in out, "resuming now would only pause again"

    code, out, _ = cli("approvals", "list")
    assert "1/2 approved; 1 more approval needed" in out
    code, out, _ = cli("approvals", "show", aid)
    assert 'approved by alice: "fine"' in out
    assert "1/2 approved; 1 more approval needed" in out
    code, out, _ = cli("approvals", "show", aid, "--json")
    shown = json.loads(out)
    assert shown["still_needed"] == 1
    assert [(g["approver"], g["answer"], g["reason"]) for g in shown["answers"]] == [("alice", "approve", "fine")]

    code, out, err = cli("approve", aid, "--as", "bob", "--json")
    assert code == 0, err
    answered = json.loads(out)
    assert (answered["status"], answered["still_needed"]) == ("approved", 0)
    code, out, _ = cli("approve", aid, "--as", "carol")
    assert code == 2


def test_one_approval_and_one_denial_are_both_shown_with_who_and_why(
        cli: Callable[..., tuple[int, str, str]], paused_payment: dict[str, Any]) -> None:
    aid, run_id = _pending_id(paused_payment), paused_payment["run_id"]
    assert cli("approve", aid, "--as", "alice", "--reason", "fine")[0] == 0
    code, _, err = cli("deny", aid, "--as", "bob", "--reason", "wrong vendor")
    assert code == 0, err

    code, out, _ = cli("approvals", "show", aid, "--json")
    shown = json.loads(out)
    assert shown["status"] == "denied"
    assert [(g["approver"], g["answer"], g["reason"]) for g in shown["answers"]] == [
        ("alice", "approve", "fine"), ("bob", "deny", "wrong vendor")]
    code, out, _ = cli("approvals", "show", aid)
    assert 'approved by alice: "fine"' in out and 'denied by bob: "wrong vendor"' in out

    code, out, _ = cli("resume", run_id)
    assert code == 1
    assert 'denied by bob: "wrong vendor"' in out
    assert 'approved by alice: "fine"' in out
    assert "denied by alice" not in out


def test_a_proposal_is_shown_by_approvals_show_and_in_the_summary(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any]) -> None:
    aid, run_id = _pending_id(paused_demo), paused_demo["run_id"]
    code, _, err = cli("deny", aid, "--as", "bob", "--reason", "seat upgrade", "--propose", '{"amount": 4000}')
    assert code == 0, err
    code, out, _ = cli("approvals", "show", aid)
    assert 'denied by bob: "seat upgrade"; proposed {"amount": 4000}' in out
    code, out, _ = cli("approvals", "show", aid, "--json")
    [denial] = json.loads(out)["answers"]
    assert denial["proposed_arguments"] == {"amount": 4000}

    code, out, _ = cli("resume", run_id)
    assert code == 3
    assert 'denied by bob: "seat upgrade"; proposed {"amount": 4000}' in out


@pytest.mark.parametrize(("proposal", "named"), [
    ('{"nope": 1}', "nope"),                       # an argument the tool does not take
    ('{"amount": "lots"}', "amount"),              # the wrong type
    ('{"amount": 99999}', "amount"),               # outside the step's range
    ('{"employee": "e-99"}', "employee"),          # another employee than the plan pinned
    ('{"amount": 4250}', "same call"),             # no change at all
], ids=["unknown-argument", "wrong-type", "out-of-range", "other-employee", "no-change"])
def test_deny_with_a_proposal_that_cannot_work_exits_2_and_records_nothing(
        cli: Callable[..., tuple[int, str, str]], paused_demo: dict[str, Any], cli_store: str,
        proposal: str, named: str) -> None:
    aid = _pending_id(paused_demo)
    code, out, err = cli("deny", aid, "--as", "bob", "--reason", "try this", "--propose", proposal)
    assert code == 2 and out == ""
    _assert_one_line_error(err)
    assert named in err and aid in err
    code, out, _ = cli("approvals", "show", aid, "--json")
    assert (json.loads(out)["status"], json.loads(out)["answers"]) == ("pending", [])
    store = open_store(cli_store)
    try:
        assert [r for r in Ledger(store, clock=SystemClock()).records() if r["kind"] == "approval_decided"] == []
    finally:
        store.close()


def test_deny_with_a_proposal_checks_names_and_constraints_without_the_workflows_code(
        cli: Callable[..., tuple[int, str, str]], paused_payment: dict[str, Any], two_person_target: str) -> None:
    aid = _pending_id(paused_payment)
    Path(two_person_target.rpartition(":")[0]).unlink()  # the approver's shell has no copy of the code

    code, _, err = cli("deny", aid, "--as", "bob", "--reason", "no", "--propose", '{"nope": 1}')
    assert code == 2
    assert "warning: the proposal's types were not checked" in err
    assert "'nope'" in err.splitlines()[-1]
    code, _, err = cli("deny", aid, "--as", "bob", "--reason", "no", "--propose", '{"amount": 900}')
    assert code == 2
    assert "'amount' is outside the scope of step 'pay'" in err.splitlines()[-1]

    code, _, err = cli("deny", aid, "--as", "bob", "--reason", "less", "--propose", '{"amount": 100}')
    assert code == 0, err
    code, out, _ = cli("approvals", "show", aid, "--json")
    assert json.loads(out)["proposed_arguments"] == {"amount": 100}


# the prompt and answers given elsewhere ----------------------------------------------------
@pytest.fixture
def other_shell(cli_store: str) -> Iterator[ApprovalService]:
    """An approver answering from another shell: its own connection to the store."""
    store = open_store(cli_store)
    yield ApprovalService(store, clock=SystemClock())
    store.close()


def test_the_prompt_reads_the_request_again_before_it_asks(
        paused_demo: dict[str, Any], service: ApprovalService, other_shell: ApprovalService) -> None:
    aid = _pending_id(paused_demo)
    listed = service.get(aid)  # what the terminal listed ...
    # ... before another shell answered
    other_shell.approve(aid, approver="bob", reason="done elsewhere",
                        signature=demo_signature(other_shell, aid, "bob", "approve", "done elsewhere"))
    out = io.StringIO()
    assert prompt(service, listed, ask=_scripted(), out=out) is True
    shown = out.getvalue()
    assert "(approved)" in shown and 'approved by bob: "done elsewhere"' in shown
    assert "nothing to record here" in shown


def test_skip_after_an_answer_elsewhere_shows_the_current_status(
        paused_demo: dict[str, Any], service: ApprovalService, other_shell: ApprovalService) -> None:
    aid = _pending_id(paused_demo)

    def ask(question: str) -> str:
        other_shell.approve(aid, approver="bob", reason="done elsewhere",  # while the question is open
                            signature=demo_signature(other_shell, aid, "bob", "approve", "done elsewhere"))
        return "s"

    out = io.StringIO()
    assert prompt(service, service.get(aid), ask=ask, out=out) is True
    shown = out.getvalue()
    assert 'meanwhile, elsewhere: approved by bob: "done elsewhere"' in shown
    assert f"approval {aid} is approved (1/1 approved)" in shown
    assert "still pending" not in shown and "not recorded" not in shown


def test_an_answer_typed_after_a_denial_elsewhere_is_not_attempted(
        paused_demo: dict[str, Any], service: ApprovalService, other_shell: ApprovalService) -> None:
    aid = _pending_id(paused_demo)
    script = iter(["a", "bob"])

    def ask(question: str) -> str:
        if question.startswith("your name"):
            other_shell.deny(aid, approver="bob", reason="not this vendor",
                             signature=demo_signature(other_shell, aid, "bob", "deny", "not this vendor"))
        return next(script)

    out = io.StringIO()
    assert prompt(service, service.get(aid), ask=ask, out=out) is True
    shown = out.getvalue()
    assert 'meanwhile, elsewhere: denied by bob: "not this vendor"' in shown
    assert "not recorded" not in shown and "reason:" not in shown
    assert [g["answer"] for g in service.get(aid).answers()] == ["deny"]


def test_the_prompt_asks_two_approvers_in_turn_under_a_two_person_rule(
        paused_payment: dict[str, Any], service: ApprovalService) -> None:
    aid = _pending_id(paused_payment)
    out = io.StringIO()
    answered = prompt(service, service.get(aid), ask=_scripted("a", "alice", "fine", "a", "bob", "ok"), out=out)
    assert answered is True
    shown = out.getvalue()
    assert "recorded: approved by alice; 1/2 approved, 1 more approval needed from someone else" in shown
    assert f"recorded: approval {aid} approved" in shown
    assert service.get(aid).approvers == ["alice", "bob"]
