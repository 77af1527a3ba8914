"""Commands that only read never create a store: a mistyped ``--store`` is an error, not a new store."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from scopegraph.cli import main

READ_ONLY = [
    ["approvals", "list"],
    ["approvals", "show", "apr_0123456789abcdef01234567"],
    ["trace", "0123456789abcdef0123456789abcdef"],
    ["report"],
    ["audit", "verify"],
    ["bundle", "--jwks"],
]


@pytest.fixture(autouse=True)
def _environment(tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCOPEGRAPH_STORE", store_url)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", READ_ONLY, ids=lambda a: " ".join(a[:2]))
def test_a_read_only_command_on_a_mistyped_store_creates_nothing(
        argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--store", "sqlite:///typo/x.db", *argv)
    assert (code, out) == (2, "")
    assert err == "scopegraph: error: no store at 'typo/x.db'\n"
    assert not (tmp_path / "typo").exists()


def test_an_absolute_mistyped_store_is_named_as_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "deeper" / "x.db"
    code, _, err = run_cli(capsys, "--store", f"sqlite:///{missing}", "approvals", "list")
    assert code == 2 and err == f"scopegraph: error: no store at {str(missing)!r}\n"
    assert not (tmp_path / "nowhere").exists()


def test_a_read_only_command_on_a_file_that_is_no_store_leaves_it_untouched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(str(other))) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
        conn.commit()
    before = other.read_bytes()
    code, _, err = run_cli(capsys, "--store", f"sqlite:///{other}", "report")
    assert code == 2
    assert err == f"scopegraph: error: no store at {str(other)!r}: the file holds no scopegraph tables\n"
    assert other.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]  # no -wal, no -shm


def test_read_only_commands_read_a_store_that_a_writing_command_made(
        store_url: str, store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert not store_path.exists()
    code, _, _ = run_cli(capsys, "--store", store_url, "demo", "--json")
    assert code == 3 and store_path.is_file()  # a run creates its store
    code, out, _ = run_cli(capsys, "--store", store_url, "approvals", "list", "--json")
    assert code == 0 and '"pending"' in out
    code, out, _ = run_cli(capsys, "--store", store_url, "audit", "verify")
    assert code == 0 and out.startswith("ok: ")
