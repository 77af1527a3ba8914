"""One import namespace: a built wheel and ``pip install .`` install ``scopegraph`` and nothing else.

The repository's folders ``orchestrator/``, ``agents/`` and ``policies/`` become ``scopegraph``,
``scopegraph.agents`` and ``scopegraph.policies``. Installed into a fresh virtual environment,
the command works from a directory holding a user's own ``policies/``, ``agents/`` and
``orchestrator/`` folders, beside another distribution's ``agents`` package.

To stay fast and offline after the build, the project goes into the fresh environment with
``--no-deps`` and its dependencies are borrowed from this environment through a plain path
line in a ``.pth`` file: a path line does not run the ``.pth`` hooks of that directory, so
the editable install's import finder stays inactive, as each test checks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"orchestrator": "scopegraph", "agents": "scopegraph/agents", "policies": "scopegraph/policies"}

# Builds use this environment's setuptools (the dev extra pins it): nothing is downloaded.
NO_DOWNLOAD = ("--no-build-isolation", "--no-index")


def source_copy(into: Path) -> Path:
    """What a clean clone holds for a build, copied so builds leave nothing in the work tree."""
    into.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, into / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, into / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return into


def shipped_files() -> set[str]:
    """Every file of the three folders, at the path the namespace gives it."""
    names = set()
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                names.add(f"{package}/{path.relative_to(ROOT / folder).as_posix()}")
    return names


def build_tools(into: Path) -> Path:
    """This environment's setuptools and wheel, alone on a path: what a build without isolation
    needs inside a fresh venv (pip builds there), and nothing else from this environment."""
    into.mkdir(parents=True, exist_ok=True)
    purelib = Path(sysconfig.get_paths()["purelib"])
    for entry in purelib.iterdir():
        name = entry.name.lower()
        if name.split("-")[0] in ("setuptools", "pkg_resources", "_distutils_hack", "wheel", "distutils") \
                and not (into / entry.name).exists():
            (into / entry.name).symlink_to(entry)
    return into


def pip(*args: str, cwd: Path | None = None, tools: Path | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": str(tools)} if tools is not None else None
    done = subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    pip("wheel", *NO_DOWNLOAD, "--no-deps", "-w", str(work / "dist"), str(source_copy(work / "src")))
    (built,) = (work / "dist").glob("scopegraph-*.whl")
    return built


def make_wheel(into: Path, name: str, version: str, files: Mapping[str, str]) -> Path:
    """A minimal pure-Python wheel, built by hand: another distribution for the environment."""
    dist_info = f"{name}-{version}.dist-info"
    contents = {**files,
                f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                f"{dist_info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                       "Tag: py3-none-any\n")}
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    out = into / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in contents.items():
            zf.writestr(path, text)
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return out


@dataclass(frozen=True, kw_only=True)
class Venv:
    root: Path
    site: Path
    installed: frozenset[str]  # site-packages entries right after installing scopegraph alone

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def scopegraph(self) -> Path:
        return self.root / "bin" / "scopegraph"


def fresh_venv(root: Path, *install: str) -> Venv:
    """A new virtual environment with scopegraph installed by ``pip install --no-deps *install``."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    pip("--python", str(python), "install", *NO_DOWNLOAD, "--no-deps", *install, tools=build_tools(root / "tools"))
    installed = frozenset(p.name for p in site.iterdir())
    # Another distribution's top-level `agents` (as the OpenAI Agents SDK has), installed after ours.
    other = make_wheel(root, "other_agents", "1.0",
                       {"agents/__init__.py": '"""Another library\'s agents package."""\nOWNER = "other"\n'})
    pip("--python", str(python), "install", *NO_DOWNLOAD, "--no-deps", str(other))
    # Our dependencies, borrowed from this environment by a plain path line (no import hooks run).
    borrowed = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in borrowed))
    return Venv(root=root, site=site, installed=installed)


@pytest.fixture(scope="module", params=["wheel", "pip install ."])
def venv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    work = tmp_path_factory.mktemp("venv")
    if request.param == "wheel":
        return fresh_venv(work / "venv", str(request.getfixturevalue("wheel")))
    return fresh_venv(work / "venv", str(source_copy(work / "src")))


def crowded_directory(at: Path) -> Path:
    """A user's project with folders named like the repository's, each a trap if imported."""
    for name in ("policies", "agents", "orchestrator"):
        folder = at / name
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text(f'raise ImportError("the user\'s own {name!r} folder was imported")\n')
        (folder / "baseline.cedar").write_text("this is not Cedar\n")
        (folder / "schema.cedarschema").write_text("nor is this a schema\n")
    (at / "orchestrator" / "cli.py").write_text("raise SystemExit(99)\n")
    return at


def run(venv: Venv, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "SCOPEGRAPH_STORE") and not k.startswith("OTEL_EXPORTER_")}
    env["OTEL_SDK_DISABLED"] = "true"
    return subprocess.run([str(venv.scopegraph), *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


# the wheel's contents ----------------------------------------------------------------------------
def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert zf.read(top_level).decode().split() == ["scopegraph"]
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"scopegraph"}
    for shipped in ("scopegraph/policies/baseline.cedar", "scopegraph/policies/schema.cedarschema",
                    "scopegraph/py.typed", "scopegraph/agents/py.typed", "scopegraph/cli.py",
                    "scopegraph/templates/init/workflow.py.tmpl"):
        assert shipped in names


def test_the_wheel_holds_every_file_of_the_three_folders(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = {n for n in zf.namelist() if ".dist-info/" not in n}
    missing = sorted(shipped_files() - names)
    assert not missing, f"not in the wheel (list the package in pyproject.toml): {missing}"


# installed into a fresh environment ----------------------------------------------------------------
def test_only_scopegraph_is_installed(venv: Venv) -> None:
    assert {n for n in venv.installed if not n.endswith(".dist-info")} == {"scopegraph"}
    assert (venv.site / "scopegraph" / "policies" / "baseline.cedar").is_file()
    assert (venv.scopegraph).is_file()


def test_scopegraph_is_imported_from_the_fresh_environment(venv: Venv, tmp_path: Path) -> None:
    probe = (
        "import json, sys, agents, scopegraph, scopegraph.agents\n"
        "from importlib import resources\n"
        "print(json.dumps({'scopegraph': scopegraph.__file__, 'agents': scopegraph.agents.__file__,\n"
        "  'baseline': str(resources.files('scopegraph.policies') / 'baseline.cedar'),\n"
        "  'other': agents.OWNER,\n"
        "  'finder': [m for m in sys.modules if 'editable' in m]}))\n"
    )
    done = subprocess.run([str(venv.python), "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    for key in ("scopegraph", "agents", "baseline"):
        assert Path(seen[key]).is_relative_to(venv.site), seen
    assert seen["other"] == "other"  # the other distribution's `agents` is untouched and importable
    assert seen["finder"] == []  # this environment's editable install is not in play


def test_the_demo_runs_beside_folders_named_like_ours(venv: Venv, tmp_path: Path) -> None:
    here = crowded_directory(tmp_path / "project")
    done = run(venv, "--store", f"sqlite:///{tmp_path / 'store' / 'scopegraph.db'}", "demo", "--json", cwd=here)
    assert done.returncode == 3, done.stderr  # paused for approval: no terminal to ask on
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "paused"
    steps = {s["step_id"]: s for s in report["steps"]}
    assert steps["receipt"]["status"] == steps["limit"]["status"] == "completed"
    assert steps["file"]["status"] == "awaiting_approval"
    assert steps["file"]["policy_ids"] == ["writes-need-approval"]
    assert [a["status"] for a in report["approvals"]] == ["pending"]
    assert report["grants_minted"] == report["grants_revoked"] == 3


def test_policy_validate_reads_the_shipped_baseline(venv: Venv, tmp_path: Path) -> None:
    here = crowded_directory(tmp_path / "project")
    done = run(venv, "policy", "validate", "--json", cwd=here)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"] == ["baseline.cedar"]


def test_init_and_run_from_the_installed_package(venv: Venv, tmp_path: Path) -> None:
    here = crowded_directory(tmp_path / "project")
    shutil.rmtree(here / "policies")  # init writes its own policies/ folder
    done = run(venv, "init", cwd=here)
    assert done.returncode == 0, done.stderr
    done = run(venv, "--store", f"sqlite:///{tmp_path / 'store' / 'scopegraph.db'}", "run", "workflow:workflow",
               "--task", "Pay invoice INV-7", "--json", cwd=here)
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["status"] == "paused"
