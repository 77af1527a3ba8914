"""A workflow: what a developer defines. Tools, a planner, an executor, policies, settings."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .approvals import DEFAULT_APPROVAL_TTL_SECONDS, ApproverRule
from .credentials import DEFAULT_MAX_USES, DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS
from .errors import ConfigError
from .gateway import RetrySettings
from .roles import Executor, Planner
from .tools import Tool, ToolRegistry

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")


@dataclass(kw_only=True)
class Workflow:
    """A multi-agent workflow with request-time scoping.

    ``policies`` lists Cedar files or directories; ``None`` uses the shipped baseline.
    ``grant_ttl`` (seconds, at most 900) and ``grant_max_uses`` bound every step grant.
    ``approvers`` may answer approval requests (the run's initiator never may);
    ``approval_ttl`` is how long a request stays answerable (default 15 minutes).
    ``on_denial``: when a human denies a call, ``fail`` ends the run as denied after the
    steps in flight; ``continue`` lets steps that do not depend on it run, and the run
    then ends ``denied`` as well, but having done everything else.
    ``max_replans`` bounds how often an executor may send the run back to the planner.
    """

    name: str
    tools: Sequence[Tool] | ToolRegistry
    planner: Planner
    executor: Executor
    policies: Sequence[str | Path] | None = None
    schema: str | Path | None = None
    trust_domain: str = "scopegraph.local"
    grant_ttl: float = DEFAULT_TTL_SECONDS
    grant_max_uses: int = DEFAULT_MAX_USES
    retry: RetrySettings = field(default_factory=RetrySettings)
    approvers: Iterable[str] | ApproverRule = ()
    approval_ttl: float = DEFAULT_APPROVAL_TTL_SECONDS
    on_denial: Literal["fail", "continue"] = "fail"
    max_replans: int = 2

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"invalid workflow name {self.name!r}: use 1-64 letters, digits, '.', '-', '_'")
        if not isinstance(self.tools, ToolRegistry):
            self.tools = ToolRegistry(self.tools)
        if not isinstance(self.planner, Planner):
            raise ConfigError(f"planner {self.planner!r} has no plan(ctx) method")
        if not isinstance(self.executor, Executor):
            raise ConfigError(f"executor {self.executor!r} has no execute(ctx) method")
        if not 0 < self.grant_ttl <= MAX_TTL_SECONDS:
            raise ConfigError(f"grant_ttl {self.grant_ttl!r} must be above 0 and at most {MAX_TTL_SECONDS:g} s")
        self.approvers = ApproverRule.of(self.approvers)
        if self.approval_ttl <= 0:
            raise ConfigError(f"approval_ttl {self.approval_ttl!r} must be above 0")
        if self.on_denial not in ("fail", "continue"):
            raise ConfigError(f"on_denial {self.on_denial!r} must be 'fail' or 'continue'")
        if self.max_replans < 0:
            raise ConfigError(f"max_replans {self.max_replans!r} must be 0 or more")
        if self.grant_max_uses < 1:
            raise ConfigError(f"grant_max_uses {self.grant_max_uses!r} must be at least 1")

    @property
    def approver_rule(self) -> ApproverRule:
        assert isinstance(self.approvers, ApproverRule)
        return self.approvers

    @property
    def registry(self) -> ToolRegistry:
        assert isinstance(self.tools, ToolRegistry)
        return self.tools
