"""``scopegraph init``: a small project that runs and tests straight away.

It writes a workflow module with two tools and a plan, a ``policies/`` folder whose starter
policy adds to the shipped baseline, and a test. The files come from the templates in
``scopegraph/templates/init`` (package data). Nothing is ever overwritten.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from string import Template

from .errors import ConfigError
from .workflow import Workflow

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
    values = _template_values()
    templates = resources.files(__package__).joinpath("templates", "init")
    for (template, _), path in zip(FILES, targets, strict=True):
        text = Template(templates.joinpath(template).read_text(encoding="utf-8")).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as out:  # "x": never overwrite, even in a race
            out.write(text)
    return targets


def _template_values() -> dict[str, str]:
    """How the scaffold's workflow names its policies: the starter folder on top of the baseline.

    Where ``Workflow`` has a ``baseline`` switch, ``policies=`` adds to the shipped baseline
    and the starter folder is all it needs. Where it has none, ``policies=`` replaces the
    baseline, so the scaffold names the baseline file as well.
    """
    if "baseline" in {f.name for f in dataclasses.fields(Workflow)}:
        return {"baseline_import": "", "policies": '[HERE / "policies"]  # added to the shipped baseline'}
    return {
        "baseline_import": "import scopegraph.policies\n",
        "policies": '[Path(scopegraph.policies.__file__).with_name("baseline.cedar"), HERE / "policies"]',
    }
