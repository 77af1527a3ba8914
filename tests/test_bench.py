"""The benchmarks' arms still run: each is driven once, outside any timing or counting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

INSTRUCTIONS = Path(__file__).resolve().parents[1] / "bench" / "instructions.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(INSTRUCTIONS), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("bench", ["step", "approval"])
@pytest.mark.parametrize("arm", ["plain", "scopegraph"])
def test_each_arm_the_instruction_count_runs_completes(bench: str, arm: str) -> None:
    # What callgrind runs, without callgrind: the arm raises SystemExit if a run does not
    # end as it must (every step completed and revoked, the approval answered and resumed).
    done = _run(bench, "--arm", arm, "--runs", "0,1", "--steps", "3")
    assert done.returncode == 0, done.stderr


def test_bad_run_counts_are_refused_in_one_line() -> None:
    for runs in ("5", "7,2", "a,b"):
        done = _run("step", "--runs", runs)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines()[-1].endswith(f"--runs takes two numbers A,B with 0 <= A < B, "
                                                            f"not {runs!r}")


def test_with_tracing_the_counted_process_exports_the_secured_arms_spans() -> None:
    def spans(arm: str, steps: int) -> int:
        done = _run("step", "--arm", arm, "--runs", "0,1", "--steps", str(steps), "--tracing")
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().splitlines()[-1].removeprefix("spans="))

    assert spans("plain", 3) == 0  # the SDK is installed, but a plain graph makes no span
    # Every step of every run (the warm-up's included) is exported before the process ends.
    assert 0 < spans("scopegraph", 1) < spans("scopegraph", 3)
