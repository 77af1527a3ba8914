"""``scopegraph init``: a small project that runs and tests straight away.

It writes a workflow module with two tools and a plan, a ``policies/`` folder whose starter
policy adds to the shipped baseline, and a test. The files come from the templates in
``scopegraph/templates/init`` (package data). Nothing is ever overwritten.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import ConfigError

# (template, path written under the target directory)
FILES: tuple[tuple[str, str], ...] = (
    ("workflow.py.tmpl", "workflow.py"),
    ("starter.cedar.tmpl", "policies/starter.cedar"),
    ("test_workflow.py.tmpl", "test_workflow.py"),
)
TARGET = "workflow:workflow"
EXAMPLE_TASK = "Pay invoice INV-7"


def scaffold(directory: str | Path) -> list[Path]:
    """Write the project's files under ``directory`` (made if missing); return their paths.

    Raises:
        ConfigError: one of the files already exists (nothing is written then), or
            ``directory`` is not a directory.
    """
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{str(root)!r} is not a directory")
    targets = [root / name for _, name in FILES]
    for path in targets:
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{str(path)!r} already exists; init never overwrites a file")
    templates = resources.files(__package__).joinpath("templates", "init")
    for (template, _), path in zip(FILES, targets, strict=True):
        text = templates.joinpath(template).read_text(encoding="utf-8")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as out:  # "x": never overwrite, even in a race
            out.write(text)
    return targets
