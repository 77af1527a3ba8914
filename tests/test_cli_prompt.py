"""The approval prompt at a real terminal: ``scopegraph`` in a child process on a pseudo-terminal.

The child's stdin and stdout are the terminal (so the CLI prompts), its stderr a pipe
(so the one-line messages can be told apart). The terminal is the child's controlling
terminal, so Ctrl-C typed into it reaches the child as SIGINT, as at a keyboard.
Another "shell" answers through its own connection to the same SQLite store.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scopegraph.approvals import ApprovalService
from scopegraph.cli import main
from scopegraph.clock import SystemClock
from scopegraph.store import open_store

from .helpers import demo_signature
from .orchestrator.test_approvals import two_person_policy
from .test_cli_approvals import WORKFLOW_FILE

# Make the terminal the controlling one (the child leads a new session), then run the CLI.
LAUNCH = ("import fcntl, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
          "from scopegraph.cli import main; sys.exit(main(sys.argv[1:]))")
WAIT = 120.0  # seconds to wait for expected output before failing (a loaded machine is slow)


class Terminal:
    """``scopegraph ARGS`` on a pseudo-terminal; read what it shows, type into it."""

    def __init__(self, *args: str) -> None:
        master, slave = os.openpty()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEGRAPH_")}
        env["OTEL_SDK_DISABLED"] = "true"
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-W", "error", "-c", LAUNCH, *args],
            stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env, start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.seen = ""

    def expect(self, text: str) -> str:
        """Read until ``text`` has been shown; return everything shown so far."""
        while text not in self.seen:
            ready, _, _ = select.select([self.master], [], [], WAIT)
            assert ready, f"the terminal never showed {text!r}; it showed:\n{self.seen}"
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            assert chunk, f"the program ended before showing {text!r}; it showed:\n{self.seen}"
            self.seen += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")
        return self.seen

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self) -> tuple[int, str]:
        """Wait for the program to end; return its exit code and stderr (the rest of the screen
        is drained into ``seen``)."""
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode()
        code = self.proc.wait(timeout=WAIT)
        while True:
            try:
                chunk = os.read(self.master, 4096) if select.select([self.master], [], [], 0)[0] else b""
            except OSError:
                chunk = b""
            if not chunk:
                break
            self.seen += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")
        return code, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[Any]:
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        t = Terminal(*args)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tty' / 'scopegraph.db'}"


@pytest.fixture
def other_shell(store_url: str) -> Iterator[ApprovalService]:
    store = open_store(store_url)
    yield ApprovalService(store, clock=SystemClock())
    store.close()


def _only_pending(service: ApprovalService) -> Any:
    [pending] = service.list(status="pending")
    return pending


def test_the_prompt_at_a_terminal_sees_an_approval_given_in_another_shell(
        terminal: Any, store_url: str, other_shell: ApprovalService,
        capsys: pytest.CaptureFixture[str]) -> None:
    t = terminal("--store", store_url, "demo", "--as", "alice")
    t.expect("approve, deny or skip? [a/d/s] ")
    aid = _only_pending(other_shell).id

    # Another shell approves while the prompt waits; nobody types anything here.
    assert main(["--store", store_url, "approve", aid, "--as", "bob", "--reason", "checked elsewhere"]) == 0
    capsys.readouterr()
    t.expect("status=completed")
    code, err = t.finish()  # drains the rest of the screen into ``seen``
    shown = t.seen
    assert code == 0, err
    assert 'meanwhile, elsewhere: approved by bob: "checked elsewhere"' in shown
    assert f"approval {aid} is approved (1/1 approved); nothing to record here" in shown
    assert "not recorded" not in t.seen


def test_two_approvers_answer_in_turn_at_the_terminal(terminal: Any, store_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "payments"
    folder.mkdir()
    two_person_policy(folder)
    (folder / "payments_wf.py").write_text(WORKFLOW_FILE)
    t = terminal("--store", store_url, "run", f"{folder / 'payments_wf.py'}:workflow", "--task", "pay", "--as", "dave")
    t.expect("[a/d/s] ")
    t.type("a\n")
    t.expect("your name: ")
    t.type("alice\n")
    t.expect("reason: ")
    t.type("fine\n")
    t.expect("1/2 approved, 1 more approval needed from someone else")
    t.expect("[a/d/s] ")
    t.type("a\nbob\nok\n")
    t.expect("status=completed")
    code, err = t.finish()  # drains the rest of the summary into ``seen``
    assert code == 0, err
    assert 'approved by alice: "fine"' in t.seen and 'approved by bob: "ok"' in t.seen


def test_ctrl_c_at_the_prompt_leaves_the_run_paused_says_so_and_exits_130(
        terminal: Any, store_url: str, other_shell: ApprovalService,
        capsys: pytest.CaptureFixture[str]) -> None:
    t = terminal("--store", store_url, "demo", "--as", "alice")
    t.expect("[a/d/s] ")
    pending = _only_pending(other_shell)
    t.type("\x03")  # Ctrl-C
    code, err = t.finish()
    assert code == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Traceback" not in t.seen
    assert f"run {pending.run_id} is still paused" in lines[0]
    assert re.search(rf"`scopegraph --store \S+ resume {pending.run_id}`", lines[0]), lines[0]

    # Paused indeed: the request still waits, and the resume command named finishes the run.
    assert other_shell.get(pending.id).status == "pending"
    other_shell.approve(pending.id, approver="bob", signature=demo_signature(other_shell, pending.id, "bob", "approve"))
    assert main(["--store", store_url, "resume", pending.run_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"


def test_the_demo_at_a_terminal_signs_the_answer_with_the_approvers_demo_key(
        terminal: Any, store_url: str, other_shell: ApprovalService) -> None:
    """Issue 12: the demo enrols alice and bob; whoever answers at the prompt signs with their key."""
    t = terminal("--store", store_url, "demo", "--as", "carol")
    t.expect("[a/d/s] ")
    t.type("a\n")
    t.expect("your name: ")
    t.type("bob\n")
    t.expect("reason: ")
    t.type("receipt checked\n")
    t.expect("signing as bob")
    t.expect("status=completed")
    code, err = t.finish()
    assert code == 0, err
    assert 'approved by bob: "receipt checked"  [signed, key' in t.seen
    [answered] = other_shell.list(status="consumed")
    assert answered.approvals[0].signature and answered.approvals[0].kid
