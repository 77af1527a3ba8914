"""Fixtures for the worker tests: the contract suite's schema-per-test PostgreSQL URL, and
helpers that run the ``scopegraph`` command in real processes against it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scopegraph.store import Store, open_store
from tests.contract.conftest import closed_port, postgres_schema, postgres_store_url, postgres_url  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    """One PostgreSQL schema shared by CLI processes (submitters, workers, approvers)."""

    url: str
    log: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "SCOPEGRAPH_TEST_LOG": str(self.log), "PYTHONWARNINGS": "error"}

    def argv(self, *args: str, store: str | None = None) -> list[str]:
        return [sys.executable, "-m", "scopegraph.cli", "--store", store or self.url, *args]

    def cli(self, *args: str, store: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args, store=store), cwd=ROOT, env=self.env(), capture_output=True,
                              text=True, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), cwd=ROOT, env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def submit(self, target: str, task: str = "do the thing") -> str:
        done = self.cli("submit", f"tests.workers.flows:{target}", "--task", task, "--as", "alice")
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def work(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self.cli("worker", "--once", "--traces", str(self.log.with_suffix(".jsonl")), *args)
        assert done.returncode == 0, done.stderr
        return done

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def store(self) -> Store:
        return open_store(self.url)

    def status(self, run_id: str) -> str | None:
        store = self.store()
        try:
            record = store.get_run(run_id)
        finally:
            store.close()
        return record.status if record else None


@pytest.fixture
def cluster(postgres_store_url: str, tmp_path: Path) -> Iterator[Cluster]:  # noqa: F811
    yield Cluster(url=postgres_store_url, log=tmp_path / "effects.log")
