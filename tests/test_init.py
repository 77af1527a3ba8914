"""``scopegraph init``: the scaffold runs with ``scopegraph run`` and its own tests pass, straight away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scopegraph.cli import main

SCAFFOLD_FILES = ["workflow.py", "policies/starter.cedar", "test_workflow.py"]


@pytest.fixture(autouse=True)
def _cli_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCOPEGRAPH_STORE", raising=False)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    for name in list(os.environ):
        if name.startswith("OTEL_EXPORTER_"):
            monkeypatch.delenv(name)
    modules = set(sys.modules)
    yield
    for name in set(sys.modules) - modules:  # the scaffold's module, imported by `run`
        if name == "workflow":
            del sys.modules[name]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_writes_a_workflow_a_starter_policy_and_a_test(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "init", "project")
    assert (code, err) == (0, "")
    project = tmp_path / "project"
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()) == sorted(SCAFFOLD_FILES)
    for name in SCAFFOLD_FILES:
        assert f"created {Path('project') / name}" in out
    assert "scopegraph run workflow:workflow --task 'Pay invoice INV-7'" in out
    assert "$" not in (project / "workflow.py").read_text()  # every template value was filled in
    starter = (project / "policies" / "starter.cedar").read_text()
    assert '@id("no-large-payments")' in starter
    assert "baseline.cedar" not in {p.name for p in (project / "policies").iterdir()}  # extends, never copies


def test_init_defaults_to_the_current_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "init")
    assert code == 0
    assert all((tmp_path / name).is_file() for name in SCAFFOLD_FILES)
    assert "next:" in out and "(in " not in out


def test_the_scaffold_runs_pauses_for_approval_and_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "init", "project")[0] == 0
    monkeypatch.chdir(tmp_path / "project")
    store = f"sqlite:///{tmp_path / 'store' / 'scopegraph.db'}"

    # As the module's docstring and `init` say: the run pauses for bob's approval (exit 3).
    code, out, _ = cli(capsys, "--store", store, "run", "workflow:workflow", "--task", "Pay invoice INV-7",
                       "--as", "alice", "--json")
    assert code == 3
    report = json.loads(out)
    assert report["status"] == "paused"
    steps = {s["step_id"]: s for s in report["steps"]}
    assert steps["read"]["status"] == "completed"
    assert steps["pay"]["status"] == "awaiting_approval"
    assert steps["pay"]["policy_ids"] == ["writes-need-approval"]  # the baseline is in force
    (approval,) = report["approvals"]

    code, out, _ = cli(capsys, "--store", store, "approvals", "show", approval["id"], "--json")
    assert code == 0
    assert json.loads(out)["arguments"] == {"vendor": "acme", "amount": 1200}
    assert cli(capsys, "--store", store, "approve", approval["id"], "--as", "bob", "--reason", "ok")[0] == 0
    code, out, _ = cli(capsys, "--store", store, "resume", report["run_id"], "--json")
    assert code == 0
    resumed = json.loads(out)
    assert resumed["status"] == "completed"
    assert resumed["grants_minted"] == resumed["grants_revoked"]


def test_the_starter_policy_is_in_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "init", "project")[0] == 0
    monkeypatch.chdir(tmp_path / "project")
    store = f"sqlite:///{tmp_path / 'store' / 'scopegraph.db'}"

    code, out, _ = cli(capsys, "--store", store, "run", "workflow:workflow", "--task", "Pay invoice INV-9",
                       "--as", "alice", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["status"] == "denied"
    pay = next(s for s in report["steps"] if s["step_id"] == "pay")
    assert "no-large-payments" in pay["policy_ids"]

    # The check the starter policy's header suggests.
    code, out, err = cli(capsys, "policy", "validate", "policies", "--workflow", "workflow:workflow", "--json")
    assert (code, err) == (0, "")
    # Checked together with the shipped baseline it adds to.
    assert json.loads(out)["files"] == ["baseline.cedar", str(Path("policies") / "starter.cedar")]


def test_the_scaffold_tests_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "init", "project")[0] == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_EXPORTER_", "PYTEST_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-W", "error", "-p", "no:cacheprovider"],
        cwd=tmp_path / "project", env={**env, "OTEL_SDK_DISABLED": "true"},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout


@pytest.mark.parametrize("existing", SCAFFOLD_FILES)
def test_init_never_overwrites_a_file(existing: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "project"
    (project / existing).parent.mkdir(parents=True)
    (project / existing).write_text("mine\n")

    code, out, err = cli(capsys, "init", "project")
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert str(project.relative_to(tmp_path) / existing) in lines[0] and "already exists" in lines[0]
    assert (project / existing).read_text() == "mine\n"
    assert [p for p in project.rglob("*") if p.is_file()] == [project / existing]  # nothing else written


def test_init_refuses_a_file_as_its_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    code, _, err = cli(capsys, "init", "notes.txt")
    assert code == 2
    assert "'notes.txt' is not a directory" in err and len(err.strip().splitlines()) == 1
