"""The ``scopegraph`` command: exit codes, the JSON run record, one-line errors (invariant 6)."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from scopegraph import Runtime, policies
from scopegraph.agents import demo
from scopegraph.cli import main
from scopegraph.clock import SystemClock
from scopegraph.store import open_store

from .helpers import mint_grant

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{20,}")
BASELINE = Path(policies.__file__).parent / "baseline.cedar"


@pytest.fixture(autouse=True)
def _cli_environment(tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Never touch the working tree's default store; no telemetry exporters from the environment.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCOPEGRAPH_STORE", store_url)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    for name in list(__import__("os").environ):
        if name.startswith("OTEL_EXPORTER_"):
            monkeypatch.delenv(name)
    modules = set(sys.modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in set(sys.modules) - modules:  # workflows the CLI imported from tmp_path
        if name.startswith("wf_"):
            del sys.modules[name]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


WORKFLOW_FILE = '''
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph import Workflow, tool

@tool
def lookup(key: str) -> dict:
    """Look a key up."""
    return {{"key": key}}

workflow = Workflow(
    name="clitest",
    tools=[lookup],
    planner=ScriptedPlanner({plan!r}),
    executor=DirectExecutor(),
)

def build():
    return workflow

def broken():
    raise RuntimeError("cannot build")

not_a_workflow = 42
'''


def write_workflow(tmp_path: Path, stem: str, plan: dict[str, Any]) -> Path:
    path = tmp_path / f"{stem}.py"
    path.write_text(textwrap.dedent(WORKFLOW_FILE.format(plan=plan)))
    return path


GOOD_PLAN = {"steps": [{"id": "look", "tool": "lookup", "constraints": {"key": {"kind": "exact", "value": "k"}}}]}


# demo ------------------------------------------------------------------------------------------
def test_demo_pauses_for_approval_with_exit_code_3(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    code, out, err = run_cli(capsys, "--store", store_url, "demo", "--as", "carol")
    assert code == 3, err
    assert "Traceback" not in err
    assert "awaiting_approval" in out
    assert "[scopegraph:grant] grant is not for tool 'send_email'" in out
    assert "[scopegraph:scope]" in out
    assert "grants minted=3 revoked=3" in out
    assert not JWT.search(out + err)


def test_demo_json_prints_the_run_record(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    code, out, err = run_cli(capsys, "--store", store_url, "demo", "--json", "--as", "carol")
    assert code == 3, err
    record = json.loads(out)
    assert record["workflow"] == "expenses" and record["status"] == "paused"
    assert re.fullmatch(r"[0-9a-f]{32}", record["run_id"])
    assert record["grants_minted"] == record["grants_revoked"] == 3
    steps = {s["step_id"]: s for s in record["steps"]}
    assert list(steps) == ["receipt", "limit", "file"]
    for s in record["steps"]:
        assert {"step_id", "tool", "spiffe_id", "grant_id", "decision", "policy_ids", "revoked"} <= set(s)
        assert s["spiffe_id"] == (f"spiffe://demo.scopegraph.local/wf/expenses/run/{record['run_id']}"
                                  f"/step/{s['step_id']}/executor")
        assert s["revoked"] is True
    assert steps["receipt"]["decision"] == "allow" and steps["receipt"]["policy_ids"] == ["allow-planned-calls"]
    assert steps["file"]["decision"] == "needs_approval"
    assert steps["file"]["policy_ids"] == ["writes-need-approval"]
    assert len({s["grant_id"] for s in record["steps"]}) == 3
    assert not JWT.search(out)


def test_demo_uses_the_store_from_the_environment(capsys: pytest.CaptureFixture[str], store_path: Path) -> None:
    code, _, err = run_cli(capsys, "demo", "--json")
    assert code == 3, err
    assert store_path.exists()
    assert not (Path.cwd() / ".scopegraph").exists()


# run ---------------------------------------------------------------------------------------------
def test_run_a_workflow_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_workflow(tmp_path, "wf_good", GOOD_PLAN)
    code, out, err = run_cli(capsys, "run", f"{path}:workflow", "--task", "look k up", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["status"] == "completed" and record["workflow"] == "clitest"
    assert record["grants_minted"] == record["grants_revoked"] == 1


def test_run_a_workflow_module_and_factory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_workflow(tmp_path, "wf_module", GOOD_PLAN)
    code, out, err = run_cli(capsys, "run", "wf_module:build", "--task", "look k up")
    assert code == 0, err
    assert "status=completed" in out


def test_a_failed_run_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad_plan = {"steps": [{"id": "look", "tool": "nope", "constraints": {}}]}
    path = write_workflow(tmp_path, "wf_badplan", bad_plan)
    code, out, err = run_cli(capsys, "run", f"{path}:workflow", "--task", "go", "--json")
    assert code == 1
    record = json.loads(out)
    assert record["status"] == "failed" and "unknown tool 'nope'" in record["error"]
    assert record["grants_minted"] == 0


@pytest.mark.parametrize(("target", "fragment"), [
    ("no_colon_here", "MODULE:ATTR"),
    ("wf_does_not_exist_anywhere:workflow", "wf_does_not_exist_anywhere"),
    ("scopegraph.agents.demo:no_such_attr", "no_such_attr"),
    ("scopegraph.agents.demo:TASK", "not a Workflow"),
    ("missing_file.py:workflow", "missing_file.py"),
    ("{good}:not_a_workflow", "not a Workflow"),
    ("{good}:broken", "cannot build"),
    ("{syntax}:workflow", "wf_syntax"),
    ("{raises}:workflow", "wf_raises"),
])
def test_bad_target_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                          target: str, fragment: str) -> None:
    good = write_workflow(tmp_path, "wf_target", GOOD_PLAN)
    syntax = tmp_path / "wf_syntax.py"
    syntax.write_text("def broken(:\n")
    raises = tmp_path / "wf_raises.py"
    raises.write_text("raise ImportError('a dependency is missing')\n")
    target = target.format(good=good, syntax=syntax, raises=raises)
    code, out, err = run_cli(capsys, "run", target, "--task", "go")
    assert code == 2
    assert out == ""
    assert_one_line_error(err, fragment)


@pytest.mark.parametrize("argv", [
    ["run", "scopegraph.agents.demo:workflow"],          # --task is required
    [],
    ["fly"],
    ["demo", "--no-such-flag"],
    ["policy"],
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, "scopegraph")


def test_an_empty_task_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "run", "scopegraph.agents.demo:workflow", "--task", "  ")
    assert code == 2
    assert_one_line_error(err, "empty")


# the store ---------------------------------------------------------------------------------------
def test_unwritable_store_path_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a directory should be")
    url = f"sqlite:///{tmp_path / 'blocker' / 'scopegraph.db'}"
    code, out, err = run_cli(capsys, "--store", url, "demo")
    assert code == 2 and out == ""
    assert_one_line_error(err, url)


def test_a_store_file_that_is_not_a_database_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite database, just text " * 20)
    url = f"sqlite:///{garbage}"
    code, out, err = run_cli(capsys, "--store", url, "demo")
    assert code == 2 and out == ""
    assert_one_line_error(err, url, "not a database")


# port 1 on loopback: nothing listens, so a PostgreSQL URL fails at once and touches no shared database
@pytest.mark.parametrize("url", ["postgresql://127.0.0.1:1/test", "mysql://db/x", "sqlite:///"])
def test_unsupported_store_urls_exit_2(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, _, err = run_cli(capsys, "--store", url, "demo")
    assert code == 2
    assert_one_line_error(err, url)


# bundle ------------------------------------------------------------------------------------------
def test_bundle_jwks_verifies_grants_of_that_store(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    open_store(store_url).close()  # `bundle` creates no store (it may add the domain's key to one)
    code, out, err = run_cli(capsys, "--store", store_url, "bundle", "--jwks")
    assert code == 0, err
    jwks = json.loads(out)
    assert jwks["trust_domain"] == "demo.scopegraph.local"
    [key] = jwks["keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["alg"] == "EdDSA"
    assert "d" not in key and "PRIVATE" not in out
    # a tool server holding only the JWKS can verify a grant minted later on the same store
    with Runtime(demo.build_workflow(), store=store_url, clock=SystemClock()) as rt:
        grant, _ = mint_grant(rt, "lookup_limit", run_id="jwks1", step_id="limit")
        assert rt.domain.key.kid == key["kid"]
    claims = jwt.decode(grant.danger_token(), jwt.PyJWK.from_dict(key).key, algorithms=["EdDSA"],
                        audience="tool:lookup_limit", issuer="spiffe://demo.scopegraph.local")
    assert claims["jti"] == grant.jti
    # and the same command prints the same key again: the key is kept in the store
    assert run_cli(capsys, "--store", store_url, "bundle", "--jwks")[1] == out


def test_bundle_needs_jwks(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "bundle")
    assert code == 2
    assert_one_line_error(err, "--jwks")


# policy validate ---------------------------------------------------------------------------------
def test_policy_validate_the_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "policy", "validate")
    assert code == 0, err
    assert out.startswith("ok: 1 file(s) valid")
    code, out, _ = run_cli(capsys, "policy", "validate", "--json", str(BASELINE))
    assert code == 0
    result = json.loads(out)
    assert result["valid"] is True and result["files"] == [str(BASELINE)] and result["version"]


def test_policy_validate_with_workflow_argument_types(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    policy = tmp_path / "amounts.cedar"
    policy.write_text('@id("big")\nforbid (principal, action, resource)\n'
                      'when { context.arguments has amount && context.arguments.amount > 5000 };\n')
    code, _, err = run_cli(capsys, "policy", "validate", str(BASELINE), str(policy),
                           "--workflow", "scopegraph.agents.demo:workflow")
    assert code == 0, err
    # the demo's tools make 'amount' a Long: treating it as a string is caught
    typo = tmp_path / "typo.cedar"
    typo.write_text('@id("big")\nforbid (principal, action, resource)\n'
                    'when { context.arguments has amount && context.arguments.amount like "9*" };\n')
    code, _, err = run_cli(capsys, "policy", "validate", str(BASELINE), str(typo),
                           "--workflow", "scopegraph.agents.demo:workflow")
    assert code == 2
    assert_one_line_error(err, str(typo))


@pytest.mark.parametrize(("text", "problem"), [
    ("permit (principal, action, resource", "unexpected end of input"),
    ('permit (principal, action, resource);', "@id"),
    ('@id("x")\npermit (principal, action, resource) when { context.nope };', "nope"),
])
def test_policy_validate_a_bad_file_exits_2_naming_it(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     text: str, problem: str) -> None:
    bad = tmp_path / "bad policy.cedar"
    bad.write_text(text)
    code, out, err = run_cli(capsys, "policy", "validate", str(BASELINE), str(bad))
    assert code == 2 and out == ""
    assert_one_line_error(err, str(bad), problem)


def test_policy_validate_a_binary_file_exits_2_naming_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    binary = tmp_path / "binary.cedar"
    binary.write_bytes(b"\xff\xfe\x00\x80 not utf-8")
    code, out, err = run_cli(capsys, "policy", "validate", str(binary))
    assert code == 2 and out == ""
    assert_one_line_error(err, str(binary))


def test_policy_validate_a_missing_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "policy", "validate", str(tmp_path / "nowhere.cedar"))
    assert code == 2
    assert_one_line_error(err, "nowhere.cedar")
