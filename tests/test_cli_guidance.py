"""A command line that guides (issue 10, point 4): global options anywhere, what to do after
exit 3, JSON-only stdout on a terminal, ``--version``, unknown runs, ISO timestamps,
bad durations and counts refused."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from scopegraph.cli import main
from tests.contract.conftest import postgres_schema, postgres_store_url, postgres_url  # noqa: F401

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(autouse=True)
def _cli_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment names a store that no test here should touch unless it says so.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCOPEGRAPH_STORE", f"sqlite:///{tmp_path / 'env-store' / 'scopegraph.db'}")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def paused_demo(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict[str, Any], str]:
    code, out, err = run_cli(capsys, "demo", "--json", "--as", "carol", *argv)
    assert code == 3, err
    return json.loads(out), err


# global options before or after the subcommand ----------------------------------------------
def test_store_is_accepted_after_the_subcommand(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'mine' / 'scopegraph.db'}"
    record, _ = paused_demo(capsys, "--store", url)
    assert (tmp_path / "mine" / "scopegraph.db").exists()
    assert not (tmp_path / "env-store").exists(), "the default store was used, not --store"
    (approval,) = record["approvals"]

    code, out, err = run_cli(capsys, "approvals", "list", "--store", url, "--json")
    assert code == 0, err
    assert [a["id"] for a in json.loads(out)] == [approval["id"]]
    code, out, err = run_cli(capsys, "audit", "verify", "--run", record["run_id"], "--store", url)
    assert code == 0 and out.startswith("ok:"), out + err
    code, out, err = run_cli(capsys, "approvals", "show", approval["id"], "--store", url)
    assert code == 0 and approval["id"] in out, err
    code, out, err = run_cli(capsys, "trace", record["run_id"], "--store", url, "--json")
    assert code == 0 and json.loads(out)["run"]["run_id"] == record["run_id"], err


def test_a_store_given_after_the_subcommand_wins_over_one_before(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    before = f"sqlite:///{tmp_path / 'before' / 'scopegraph.db'}"
    after = f"sqlite:///{tmp_path / 'after' / 'scopegraph.db'}"
    paused_demo(capsys, "--store", after)
    code, out, err = run_cli(capsys, "--store", before, "approvals", "list", "--store", after, "--json")
    assert code == 0, err
    assert len(json.loads(out)) == 1
    # and before the subcommand alone still works
    code, out, err = run_cli(capsys, "--store", after, "approvals", "list", "--json")
    assert code == 0 and len(json.loads(out)) == 1, err


# exit 3 says what to do next ----------------------------------------------------------------
def hinted_commands(err: str) -> list[list[str]]:
    """The ``scopegraph …`` commands the exit-3 hint printed, as argv lists (without the program)."""
    found = []
    for line in err.splitlines():
        _, sep, command = line.partition("scopegraph ")
        if sep and ":" in line.split("scopegraph ")[0]:  # "  approve it:    scopegraph …"
            found.append(shlex.split(command))
    return found


def test_exit_3_prints_the_commands_that_answer_and_resume(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'mine' / 'scopegraph.db'}"
    record, err = paused_demo(capsys, "--store", url)
    (approval,) = record["approvals"]
    commands = hinted_commands(err)
    aid, run_id = approval["id"], record["run_id"]
    assert [c[2:] for c in commands] == [
        ["approvals", "show", aid],
        ["approve", aid, "--as", "NAME", "[--reason", "TEXT]"],
        ["deny", aid, "--as", "NAME", "--reason", "TEXT"],
        ["resume", run_id],
    ]
    assert all(c[:2] == ["--store", url] for c in commands), "the store chosen on the command line is repeated"

    # The hint is right: the commands, with a name filled in, answer and resume the run.
    show, approve, _, resume = commands
    code, out, _ = run_cli(capsys, *show)
    assert code == 0 and aid in out
    code, _, err = run_cli(capsys, *approve[:5], "bob")
    assert code == 0, err
    code, out, err = run_cli(capsys, *resume, "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "completed"
    assert "paused" not in err


def test_exit_3_from_resume_prints_the_hint_and_no_store_option_for_the_default(
        capsys: pytest.CaptureFixture[str]) -> None:
    record, err = paused_demo(capsys)
    assert [c[0] for c in hinted_commands(err)] == ["approvals", "approve", "deny", "resume"]
    code, _, err = run_cli(capsys, "resume", record["run_id"])
    assert code == 3
    assert [c[0] for c in hinted_commands(err)] == ["approvals", "approve", "deny", "resume"]


def test_exit_3_hint_never_shows_a_store_password(capsys: pytest.CaptureFixture[str],
                                                  postgres_store_url: str) -> None:  # noqa: F811
    # The test server trusts local connections, so the password is ignored, not refused.
    url = postgres_store_url.replace("postgresql://postgres@", "postgresql://postgres:pw-s3cret@")
    assert "pw-s3cret" in url
    _, err = paused_demo(capsys, "--store", url)
    assert "pw-s3cret" not in err
    commands = hinted_commands(err)
    assert commands and all(c[1].startswith("postgresql://postgres:***@") for c in commands)


# --json on a terminal ------------------------------------------------------------------------
def _read_until(fd: int, wanted: bytes, proc: subprocess.Popen[bytes], timeout: float = 60) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        assert time.monotonic() < deadline, f"never saw {wanted!r}; got {seen[-400:]!r}"
        assert proc.poll() is None, f"exited {proc.returncode} before {wanted!r}; got {seen[-400:]!r}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            seen += os.read(fd, 4096)
    return seen


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            return data
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the other side closed
            return data
        if not chunk:
            return data
        data += chunk


@pytest.fixture
def terminals() -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    """Two pseudo-terminals: one for stdin and stderr (the person), one for stdout."""
    person, out = pty.openpty(), pty.openpty()
    try:
        yield person, out
    finally:
        for fd in (*person, *out):
            try:
                os.close(fd)
            except OSError:
                pass


def test_json_on_a_terminal_keeps_stdout_to_json_and_prompts_on_stderr(
        tmp_path: Path, terminals: tuple[tuple[int, int], tuple[int, int]]) -> None:
    (person_main, person_tty), (out_main, out_tty) = terminals
    url = f"sqlite:///{tmp_path / 'tty' / 'scopegraph.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_SDK_DISABLED="true", SCOPEGRAPH_STORE=url)
    proc = subprocess.Popen([sys.executable, "-m", "scopegraph.cli", "demo", "--json", "--as", "carol"],
                            stdin=person_tty, stdout=out_tty, stderr=person_tty, cwd=tmp_path, env=env)
    try:
        shown = _read_until(person_main, b"skip", proc)  # the prompt reached the person's terminal
        os.write(person_main, b"s\n")
        assert proc.wait(timeout=60) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shown += _drain(person_main)
    printed = _drain(out_main).decode().replace("\r\n", "\n")
    record = json.loads(printed)  # nothing but JSON on stdout, although it is a terminal
    assert record["status"] == "paused" and record["workflow"] == "expenses"
    text = shown.decode(errors="replace")
    assert "status=paused" in text, "the summary before the prompt goes to the person, on stderr"
    assert f"resume {record['run_id']}" in text


# --version -------------------------------------------------------------------------------------
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--version")
    assert code == 0, err
    assert out.strip() == f"scopegraph {version('scopegraph')}"


# audit verify --run of a run that does not exist ----------------------------------------------
def test_audit_verify_an_unknown_run_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    record, _ = paused_demo(capsys)
    code, out, err = run_cli(capsys, "audit", "verify", "--run", record["run_id"][:-1] + "x")
    assert code == 2 and out == ""
    line = one_line(err)
    assert "no such run" in line and "TAMPERED" not in line
    code, out, _ = run_cli(capsys, "audit", "verify", "--run", record["run_id"], "--json")
    assert code == 0 and json.loads(out)["ok"] is True


# timestamps in JSON --------------------------------------------------------------------------
def epoch_fields(value: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any], str]]:
    if isinstance(value, list):
        for i, v in enumerate(value):
            yield from epoch_fields(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, v in value.items():
            if (key == "at" or key.endswith("_at")) and (v is None or isinstance(v, (int, float))):
                yield f"{path}.{key}", value, key
            yield from epoch_fields(v, f"{path}.{key}")


def assert_iso_twins(document: Any) -> int:
    count = 0
    for where, holder, key in epoch_fields(document):
        twin = holder.get(f"{key}_iso", "missing")
        if holder[key] is None:
            assert twin is None, where
            continue
        assert isinstance(twin, str) and ISO.fullmatch(twin), f"{where}: {twin!r}"
        assert abs(datetime.fromisoformat(twin.replace("Z", "+00:00")).timestamp() - holder[key]) < 0.001
        count += 1
    return count


def test_every_json_timestamp_has_an_iso_8601_twin(capsys: pytest.CaptureFixture[str]) -> None:
    record, _ = paused_demo(capsys)
    (approval,) = record["approvals"]
    assert run_cli(capsys, "approve", approval["id"], "--as", "bob")[0] == 0
    code, out, _ = run_cli(capsys, "resume", record["run_id"], "--json")
    assert code == 0
    resumed = json.loads(out)
    assert resumed["approvals"][0]["decided_at_iso"] is not None
    documents = {"run": resumed}
    for name, argv in {"list": ["approvals", "list", "--all"], "show": ["approvals", "show", approval["id"]],
                       "trace": ["trace", record["run_id"]], "report": ["report"]}.items():
        code, out, err = run_cli(capsys, *argv, "--json")
        assert code == 0, err
        documents[name] = json.loads(out)
    counts = {name: assert_iso_twins(doc) for name, doc in documents.items()}
    assert all(counts.values()), counts  # each document has timestamps, and all have twins
    show = documents["show"]
    assert {"created_at_iso", "expires_at_iso", "decided_at_iso", "consumed_at_iso"} <= set(show)
    assert show["approvals"][0]["at_iso"]


# durations and counts on the command line ---------------------------------------------------
@pytest.mark.parametrize(("option", "value"), [
    ("--stalled-after", "nan"), ("--stalled-after", "inf"), ("--stalled-after", "-1"), ("--stalled-after", "0"),
    ("--stalled-after", "soon"), ("--concurrency", "0"), ("--concurrency", "-3"), ("--concurrency", "two"),
])
def test_worker_refuses_bad_durations_and_counts(capsys: pytest.CaptureFixture[str], option: str,
                                                 value: str) -> None:
    code, out, err = run_cli(capsys, "--store", "postgresql://127.0.0.1:1/none", "worker", option, value)
    assert code == 2 and out == ""
    line = one_line(err)
    assert option in line and repr(value) in line


# policy validate follows Workflow(policies=...) ---------------------------------------------
POLICY_WORKFLOW = '''
from scopegraph import Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner

@tool
def lookup(key: str) -> dict:
    """Look a key up."""
    return {{"key": key}}

def make(**policies):
    return Workflow(name="validated", tools=[lookup], planner=ScriptedPlanner({{"steps": []}}),
                    executor=DirectExecutor(), **policies)

adds = make(policies=[{extra!r}])
replaces = make(policies=[{extra!r}], baseline=False)
'''


@pytest.fixture
def extra_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    extra = tmp_path / "extra.cedar"
    extra.write_text('@id("no-long-keys")\nforbid (principal, action, resource)\n'
                     'when { context.arguments has key && context.arguments.key like "*****" };\n')
    (tmp_path / "wf_validated.py").write_text(POLICY_WORKFLOW.format(extra=str(extra)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield extra
    sys.modules.pop("wf_validated", None)


@pytest.mark.parametrize(("argv", "files"), [
    (["{extra}", "--workflow", "wf_validated:adds"], ["baseline.cedar", "{extra}"]),
    (["{extra}", "--no-baseline", "--workflow", "wf_validated:adds"], ["{extra}"]),
    (["--workflow", "wf_validated:adds"], ["baseline.cedar", "{extra}"]),
    (["--workflow", "wf_validated:replaces"], ["{extra}"]),
    ([], ["baseline.cedar"]),
])
def test_policy_validate_checks_what_a_workflow_would_load(capsys: pytest.CaptureFixture[str], extra_policy: Path,
                                                           argv: list[str], files: list[str]) -> None:
    code, out, err = run_cli(capsys, "policy", "validate", "--json", *(a.format(extra=extra_policy) for a in argv))
    assert code == 0, err
    assert json.loads(out)["files"] == [f.format(extra=extra_policy) for f in files]


def test_policy_validate_names_file_line_and_column(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.cedar"
    bad.write_text('@id("ok")\nforbid (principal, action, resource) when { false };\n\n'
                   '@id("typo")\npermit (principal, action, resource)\nwhen { context.in_plam };\n')
    code, out, err = run_cli(capsys, "policy", "validate", str(bad))
    assert code == 2 and out == ""
    line = one_line(err)
    assert f"{bad}:6:16: policy 'typo'" in line and "in_plam" in line
