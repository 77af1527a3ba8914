"""``scopegraph approvers`` and signed ``approve``/``deny`` (issue 12, point 2), and the demo's signed path.

``approvers add NAME --key PUBKEY`` (PEM or ``ssh-ed25519``, as text or a file), ``list``
and ``remove``; with approvers enrolled, ``approve``/``deny`` sign with ``--key PATH`` or
``$SCOPEGRAPH_APPROVER_KEY``; ``scopegraph demo`` enrols alice and bob with keys it makes
beside its store, so its answers are signed, at the terminal prompt too.
"""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scopegraph.approvals import ApprovalService
from scopegraph.cli import main
from scopegraph.clock import SystemClock
from scopegraph.prompt import prompt_for
from scopegraph.store import open_store

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.delenv("SCOPEGRAPH_APPROVER_KEY", raising=False)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli' / 'scopegraph.db'}"


@pytest.fixture
def cli(url: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--store", url, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def key_files(tmp_path: Path, name: str) -> tuple[Path, Path, Ed25519PrivateKey]:
    """A private key file (0600, OpenSSH form, as ssh-keygen writes it) and its public line."""
    key = Ed25519PrivateKey.generate()
    private = tmp_path / f"{name}_ed25519"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    pub = tmp_path / f"{name}_ed25519.pub"
    pub.write_text(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH).decode() + f" {name}\n")
    return private, pub, key


def paused_run(cli: Cli, tmp_path: Path, *, initiator: str = "dave") -> dict[str, Any]:
    """A run of a workflow (not the demo) that pauses for alice or bob."""
    (tmp_path / "wf.py").write_text(WORKFLOW)
    code, out, err = cli("run", f"{tmp_path / 'wf.py'}:workflow", "--task", "file it", "--json", "--as", initiator)
    assert code == 3, err
    return json.loads(out)


WORKFLOW = '''
from scopegraph import Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner

@tool(risk="write")
def file_expense(employee: str, amount: int) -> dict:
    """File an expense claim."""
    return {"filed": True}

workflow = Workflow(
    name="claims", tools=[file_expense],
    planner=ScriptedPlanner({"steps": [{"id": "file", "tool": "file_expense", "purpose": "file",
        "constraints": {"employee": {"kind": "exact", "value": "e-1"},
                        "amount": {"kind": "range", "min": 1, "max": 100}}}]}),
    executor=DirectExecutor(builders={"file_expense": lambda ctx: {"employee": "e-1", "amount": 42}}),
    approvers=["alice", "bob"],
)
'''


def test_approvers_add_list_and_remove(cli: Cli, tmp_path: Path) -> None:
    _, alice_pub, _ = key_files(tmp_path, "alice")
    bob_pem = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    code, out, err = cli("approvers", "add", "alice", "--key", str(alice_pub))  # a file
    assert code == 0 and out.startswith("enrolled alice (SHA256:"), err
    code, out, err = cli("approvers", "add", "Bob", "--key", bob_pem, "--json")  # the key itself
    assert code == 0 and json.loads(out)["name"] == "bob", err
    code, out, err = cli("approvers", "add", "ＢＯＢ", "--key", alice_pub.read_text())
    assert code == 2 and "enrolled already" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("approvers", "add", "carol", "--key", "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ carol")
    assert code == 2 and "neither" in err
    code, out, _ = cli("approvers", "list", "--json")
    assert [(a["name"], a["display"], a["vouched_for"]) for a in json.loads(out)] == [
        ("alice", "alice", True), ("bob", "Bob", True)]
    code, out, _ = cli("approvers", "remove", "BOB")
    assert code == 0 and "removed" in out
    code, out, _ = cli("approvers", "list")
    assert "alice" in out and "Bob" not in out
    code, out, _ = cli("approvers", "list", "--all", "--json")
    assert [a["removed_at"] is not None for a in json.loads(out)] == [False, True]
    code, _, err = cli("approvers", "remove", "bob")
    assert code == 2 and "no approver named" in err


def test_with_enrolled_approvers_approve_signs_with_key_and_is_refused_without(
        cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alice_key, alice_pub, _ = key_files(tmp_path, "alice")
    bob_key, bob_pub, _ = key_files(tmp_path, "bob")
    assert cli("approvers", "add", "alice", "--key", str(alice_pub))[0] == 0
    assert cli("approvers", "add", "bob", "--key", str(bob_pub))[0] == 0
    record = paused_run(cli, tmp_path)
    [approval] = record["approvals"]
    aid = approval["id"]
    code, _, err = cli("approve", aid, "--as", "bob")
    assert code == 2 and "needs an answer signed by 'bob'" in err and "--key" in err
    code, _, err = cli("approve", aid, "--as", "bob", "--key", str(alice_key))
    assert code == 2 and "does not verify" in err
    code, _, err = cli("approve", aid, "--as", "alice", "--key", str(bob_key))  # bob's key, alice's name
    assert code == 2 and "does not verify" in err
    monkeypatch.setenv("SCOPEGRAPH_APPROVER_KEY", str(bob_key))
    code, out, err = cli("approve", aid, "--as", "bob", "--reason", "fine", "--json")
    assert code == 0, err
    [answer] = json.loads(out)["answers"]
    assert answer["signed"] is True and answer["approver"] == "bob"
    code, out, _ = cli("approvals", "show", aid)
    assert 'approved by bob: "fine"  [signed, key' in out
    code, out, err = cli("resume", record["run_id"], "--json")
    assert code == 0 and json.loads(out)["status"] == "completed", err
    code, out, _ = cli("audit", "verify", "--json")
    verdict = json.loads(out)
    assert code == 0 and verdict["signed_answers"] == 1, verdict


def test_deny_signs_too_and_a_key_others_can_read_is_refused(cli: Cli, tmp_path: Path) -> None:
    _, alice_pub, _ = key_files(tmp_path, "alice")
    bob_key, bob_pub, _ = key_files(tmp_path, "bob")
    cli("approvers", "add", "alice", "--key", str(alice_pub))
    cli("approvers", "add", "bob", "--key", str(bob_pub))
    [approval] = paused_run(cli, tmp_path)["approvals"]
    bob_key.chmod(0o644)
    code, _, err = cli("deny", approval["id"], "--as", "bob", "--reason", "no", "--key", str(bob_key))
    assert code == 2 and "mode 0644" in err
    bob_key.chmod(0o600)
    code, out, err = cli("deny", approval["id"], "--as", "bob", "--reason", "no", "--key", str(bob_key), "--json")
    assert code == 0 and json.loads(out)["answers"][0]["signed"] is True, err


def test_the_initiator_cannot_answer_from_the_command_line_under_any_spelling(cli: Cli, tmp_path: Path) -> None:
    alice_key, alice_pub, _ = key_files(tmp_path, "alice")
    cli("approvers", "add", "alice", "--key", str(alice_pub))
    [approval] = paused_run(cli, tmp_path, initiator="Alice")["approvals"]
    for spelling in ("alice", "ALICE", "ａｌｉｃｅ"):
        code, _, err = cli("approve", approval["id"], "--as", spelling, "--key", str(alice_key))
        assert code == 2 and "may not approve" in err, err


def test_key_is_refused_on_a_store_without_enrolled_approvers(cli: Cli, tmp_path: Path) -> None:
    key, _, _ = key_files(tmp_path, "bob")
    [approval] = paused_run(cli, tmp_path)["approvals"]
    code, _, err = cli("approve", approval["id"], "--as", "bob", "--key", str(key))
    assert code == 2 and "no approver is enrolled" in err
    assert cli("approve", approval["id"], "--as", "bob")[0] == 0  # unsigned, as before


# the demo ----------------------------------------------------------------------------------------
def test_the_demo_enrols_alice_and_bob_with_keys_beside_its_store_and_signs_answers(
        cli: Cli, url: str) -> None:
    code, out, err = cli("demo", "--json", "--as", "carol")
    assert code == 3, err  # not at a terminal: paused, as before
    keys = Path(url[len("sqlite:///"):]).parent / "demo-approvers"
    assert sorted(p.name for p in keys.iterdir()) == ["alice.key", "alice.pub", "bob.key", "bob.pub"]
    assert stat.S_IMODE(os.stat(keys / "bob.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    code, listed, _ = cli("approvers", "list", "--json")
    assert [a["name"] for a in json.loads(listed)] == ["alice", "bob"]
    [approval] = json.loads(out)["approvals"]
    code, answered, err = cli("approve", approval["id"], "--as", "bob", "--json")  # finds bob's demo key
    assert code == 0 and json.loads(answered)["answers"][0]["signed"] is True, err
    # a second demo on the same store enrols nobody again
    assert cli("demo", "--json", "--as", "carol")[0] == 3
    assert [a["name"] for a in json.loads(cli("approvers", "list", "--json")[1])] == ["alice", "bob"]


def test_the_prompt_signs_with_the_key_of_whoever_says_who_they_are(cli: Cli, url: str, tmp_path: Path) -> None:
    _, _, _ = cli("demo", "--json", "--as", "carol")
    store = open_store(url)
    try:
        service = ApprovalService(store, clock=SystemClock())
        [pending] = service.list(status="pending")
        out = io.StringIO()
        answers = iter(["a", "bob", "looks right"])
        from scopegraph.cli_trust import prompt_key_finder

        assert prompt_for(service, pending, ask=lambda q: next(answers), out=out,
                          key_for=prompt_key_finder(store)) is True
        assert "signing as bob" in out.getvalue()
        approved = service.get(pending.id)
        assert approved.status == "approved" and approved.approvals[0].signature
        # someone with no key the prompt knows is asked for a key file
        other = tmp_path / "x"
        other.mkdir()
        _, _, _ = cli("demo", "--json", "--as", "carol")
        [second] = service.list(status="pending")
        key, _, _ = key_files(other, "alice")
        answers = iter(["a", "alice", "ok", str(key), "s"])
        asked: list[str] = []
        out = io.StringIO()
        assert prompt_for(service, second, ask=lambda q: asked.append(q) or next(answers), out=out) is False
        assert "answers are signed: alice's private key file: " in asked
        assert "not recorded:" in out.getvalue() and "does not verify" in out.getvalue()  # not alice's key
        assert service.get(second.id).status == "pending"
    finally:
        store.close()
