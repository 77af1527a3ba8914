"""The README runs as written: its Python blocks, in order, make one program that prints what it says.

Every ```python block runs unless the line before it is ``<!-- not run: REASON -->``. A ```text
block introduced by a line ending in "prints:" states output: its lines must appear, together
and in order, in what the program printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")
HEADING = re.compile(r"^#{1,6} .*$", re.M)


@dataclass(frozen=True, kw_only=True)
class Block:
    lang: str
    body: str
    line: int  # of the opening fence, 1-based
    section: str  # the heading above it
    intro: str  # the last non-blank line before it


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for m in FENCE.finditer(text):
        before = text[:m.start()]
        headings = HEADING.findall(before)
        intro = next((ln.strip() for ln in reversed(before.splitlines()) if ln.strip()), "")
        blocks.append(Block(lang=m["lang"], body=m["body"], line=before.count("\n") + 1,
                            section=headings[-1] if headings else "", intro=intro))
    return blocks


def not_run_reason(block: Block) -> str | None:
    m = NOT_RUN.match(block.intro)
    return m["reason"] if m else None


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.lang == "python" and not_run_reason(b) is None]


def stated_outputs(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.lang == "text" and b.intro.endswith("prints:")]


@pytest.fixture(scope="module")
def blocks() -> list[Block]:
    return readme_blocks(README.read_text(encoding="utf-8"))


def run_program(blocks: list[Block], cwd: Path) -> subprocess.CompletedProcess[str]:
    program = "\n\n".join(f"# README.md line {b.line}\n{b.body}" for b in runnable(blocks))
    (cwd / "readme_program.py").write_text(program, encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in ("SCOPEGRAPH_STORE", "PYTHONPATH") and not k.startswith("OTEL_EXPORTER_")}
    return subprocess.run([sys.executable, "-W", "error", "readme_program.py"], cwd=cwd,
                          env={**env, "OTEL_SDK_DISABLED": "true"}, capture_output=True, text=True, timeout=300)


def contains_in_order(printed: list[str], expected: list[str]) -> bool:
    return any(printed[i:i + len(expected)] == expected for i in range(len(printed) - len(expected) + 1))


def test_the_readme_python_runs_to_the_outcome_it_states(blocks: list[Block], tmp_path: Path) -> None:
    done = run_program(blocks, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    printed = done.stdout.splitlines()
    outputs = stated_outputs(blocks)
    assert outputs, "the README states no output for its code"
    for out in outputs:
        expected = out.body.rstrip("\n").splitlines()
        assert contains_in_order(printed, expected), (
            f"README.md line {out.line} states output the program did not print:\n"
            + "\n".join(expected) + "\n--- printed ---\n" + done.stdout[-3000:]
        )
    # The tour's store is where it says, under the directory it runs in.
    assert (tmp_path / ".scopegraph" / "scopegraph.db").is_file()


def test_the_tour_sections_2_to_4_run_and_state_their_outcome(blocks: list[Block]) -> None:
    tour = [b for b in blocks if b.lang == "python" and re.match(r"### [234]\. ", b.section)]
    assert len(tour) >= 3, [b.section for b in tour]
    assert all(not_run_reason(b) is None for b in tour), "a block of the tour is marked not run"
    assert any(re.match(r"### 4\. ", o.section) for o in stated_outputs(blocks)), "section 4 states no outcome"
    section_4 = next(b for b in tour if b.section.startswith("### 4."))
    assert "builders=" in section_4.body  # what DirectExecutor needs is shown where it is introduced
    assert "examples/quickstart.py" in README.read_text(encoding="utf-8")


def test_blocks_left_out_say_why(blocks: list[Block]) -> None:
    text = README.read_text(encoding="utf-8")
    markers = [ln for ln in text.splitlines() if "not run" in ln and ln.lstrip().startswith("<!--")]
    skipped = [b for b in blocks if not_run_reason(b) is not None]
    assert len(markers) == len(skipped), "a 'not run' marker is not on the line right before a code block"
    for b in skipped:
        assert b.lang == "python" and not_run_reason(b), f"README.md line {b.line}: say why it is not run"


def test_a_block_with_the_marker_is_skipped_and_others_run() -> None:
    text = (
        "# t\n\n```python\nrun_me = 1\n```\n\n"
        "<!-- not run: needs a server -->\n```python\nskip_me = 1\n```\n\n"
        "<!-- a comment that is no marker -->\n```python\nrun_me_too = 1\n```\n\n"
        "It prints:\n\n```text\nhello\n```\n"
    )
    found = readme_blocks(text)
    assert [b.body.strip() for b in runnable(found)] == ["run_me = 1", "run_me_too = 1"]
    assert [not_run_reason(b) for b in found if b.lang == "python"] == [None, "needs a server", None]
    assert [b.body for b in stated_outputs(found)] == ["hello\n"]
