"""A long run killed midway resumes with every step's record (issue 11).

The steps' records and the plan live in delta channels: a checkpoint holds only what its
superstep wrote, and reading the run back replays the writes of every checkpoint before
it. A worker process (``chain_worker.py``) runs a chain of steps and dies by SIGKILL
inside one; a fresh runtime resumes it. Every step ran exactly once (the killed one
once, after the resume), and every record, from before the crash and after it, is in
the run's report.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from scopegraph import Runtime

from .chain_worker import build_workflow

WORKER = Path(__file__).with_name("chain_worker.py")
STEPS, KILL_AT = 40, 27


def test_a_long_run_killed_in_a_step_resumes_with_every_record_and_repeats_nothing(tmp_path: Path) -> None:
    url, log = f"sqlite:///{tmp_path / 'runs.db'}", tmp_path / "effects.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEGRAPH_")}
    env["OTEL_SDK_DISABLED"] = "true"
    proc = subprocess.run([sys.executable, "-P", "-W", "error", str(WORKER), url, "long-run", str(log), str(STEPS),
                           str(KILL_AT)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, f"the worker was not killed (exit {proc.returncode}): {proc.stderr}"
    assert log.read_text().splitlines() == [f"part {i}" for i in range(KILL_AT)]

    with Runtime(build_workflow(str(log), STEPS), store=url) as rt:
        report = rt.resume("long-run")
        again = rt.report("long-run")  # read back from the checkpoints alone
    assert report.status == "completed", report.summary()
    assert log.read_text().splitlines() == [f"part {i}" for i in range(STEPS)]  # none twice, none lost
    for r in (report, again):
        assert [s.step_id for s in r.steps] == [f"s{i}" for i in range(STEPS)]
        assert {s.status for s in r.steps} == {"completed"}
        assert all(s.revoked and [c.tool for c in s.calls] == ["note"] for s in r.steps)
    assert again.grants_revoked == again.grants_minted == STEPS + 1  # the killed step's grant, and its re-run's
