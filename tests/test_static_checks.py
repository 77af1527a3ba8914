"""The library type-checks and lints clean: the house style says so, and CI holds it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The folders installed as the one `scopegraph` namespace (pyproject's package-dir).
NAMESPACE = {"": "orchestrator", "agents": "agents", "policies": "policies"}


def namespace_tree(into: Path) -> Path:
    """Lays the repository's folders out as the installed ``scopegraph`` package, with symlinks.

    mypy cannot follow setuptools' editable-install import hook, nor a package-dir mapping,
    so it checks this tree; paths it reports are mapped back to the repository's own.
    """
    package = into / "scopegraph"
    package.mkdir(parents=True)
    for entry in (ROOT / NAMESPACE[""]).iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for sub, folder in NAMESPACE.items():
        if sub:
            (package / sub).symlink_to(ROOT / folder)
    return into


def test_mypy_finds_no_type_errors(tmp_path: Path) -> None:
    tree = namespace_tree(tmp_path)
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MYPYPATH": str(tree)})
    report = done.stdout.replace(str(tree / "scopegraph" / "agents"), "agents")
    report = report.replace(str(tree / "scopegraph"), "orchestrator")
    assert done.returncode == 0, report[-3000:]


def test_ruff_finds_no_lint_errors() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or "ruff"
    done = subprocess.run([ruff, "check", "orchestrator", "agents", "policies", "examples", "tests", "bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]

