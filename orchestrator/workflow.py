"""A workflow: what a developer defines. Tools, a planner, an executor, policies, settings."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .approvals import DEFAULT_APPROVAL_TTL_SECONDS, ApproverRule
from .brokers.base import SecretBroker
from .credentials import DEFAULT_MAX_USES, DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS
from .errors import ConfigError
from .gateway import RetrySettings
from .roles import Executor, Planner, StepContext
from .tools import Tool, ToolRegistry

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")


class NoExecutor:
    """The executor of a workflow whose host brings its own agent (through a ``Guard``):
    none. A ``Runtime`` refuses such a workflow (``Workflow.require_executor``)."""

    def execute(self, ctx: StepContext) -> Any:
        raise ConfigError(f"the workflow has no executor to run step {ctx.step.id!r}")


@dataclass(kw_only=True)
class Workflow:
    """A multi-agent workflow with request-time scoping.

    ``policies`` lists Cedar files or directories that ADD to the shipped baseline
    (``policies=["policies/"]``); ``baseline=False`` leaves the baseline out, so the
    given files replace it. ``None`` (the default) is the baseline alone.
    ``grant_ttl`` (seconds, at most 900) and ``grant_max_uses`` bound every step grant.
    ``approvers`` may answer approval requests (the run's initiator never may);
    ``approval_ttl`` is how long a request stays answerable (default 15 minutes).
    ``on_denial``: when a human denies a call, ``fail`` ends the run as denied after the
    steps in flight; ``continue`` lets steps that do not depend on it run, and the run
    then ends ``denied`` as well, but having done everything else.
    ``max_replans`` bounds how often an executor may send the run back to the planner.
    ``executor`` carries out each step of a ``Runtime`` run; a host that brings its own
    agent and drives a ``Guard`` needs none.
    ``brokers`` names the brokers and secret sources that issue the downstream credentials
    tools declare (``{"postgres": PostgresRoleBroker(url)}``); ``env`` (static secrets from
    ``SCOPEGRAPH_SECRET_*`` variables) is always there.
    ``require_signed_answers``: every answer to an approval request must be signed by the
    approver's enrolled key (``scopegraph approvers add``), even before anyone is enrolled
    (then nobody can answer). Once approvers are enrolled in a store, answers there must be
    signed whatever this says.
    """

    name: str
    tools: Sequence[Tool] | ToolRegistry
    planner: Planner
    executor: Executor = field(default_factory=NoExecutor)
    policies: Sequence[str | Path] | None = None
    baseline: bool = True
    schema: str | Path | None = None
    trust_domain: str = "scopegraph.local"
    grant_ttl: float = DEFAULT_TTL_SECONDS
    grant_max_uses: int = DEFAULT_MAX_USES
    retry: RetrySettings = field(default_factory=RetrySettings)
    approvers: Iterable[str] | ApproverRule = ()
    approval_ttl: float = DEFAULT_APPROVAL_TTL_SECONDS
    on_denial: Literal["fail", "continue"] = "fail"
    max_replans: int = 2
    brokers: Mapping[str, SecretBroker] = field(default_factory=dict)
    require_signed_answers: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"invalid workflow name {self.name!r}: use 1-64 letters, digits, '.', '-', '_'")
        if not isinstance(self.tools, ToolRegistry):
            self.tools = ToolRegistry(self.tools)
        if not isinstance(self.planner, Planner):
            raise ConfigError(f"planner {self.planner!r} has no plan(ctx) method")
        if not isinstance(self.executor, Executor):
            raise ConfigError(f"executor {self.executor!r} has no execute(ctx) method")
        if isinstance(self.policies, (str, Path)):
            raise ConfigError(f"policies {str(self.policies)!r} must be a list of files or directories")
        if not self.baseline and not self.policies:
            raise ConfigError("baseline=False needs policies=[...]: without them no policy would permit a call")
        if not _seconds(self.grant_ttl) or not 0 < self.grant_ttl <= MAX_TTL_SECONDS:
            raise ConfigError(f"grant_ttl {self.grant_ttl!r} must be above 0 and at most {MAX_TTL_SECONDS:g} s")
        self.approvers = ApproverRule.of(self.approvers)
        if not _seconds(self.approval_ttl) or self.approval_ttl <= 0:
            raise ConfigError(f"approval_ttl {self.approval_ttl!r} must be a finite number of seconds above 0")
        _check_retry(self.retry)
        if self.on_denial not in ("fail", "continue"):
            raise ConfigError(f"on_denial {self.on_denial!r} must be 'fail' or 'continue'")
        if not _whole(self.max_replans) or self.max_replans < 0:
            raise ConfigError(f"max_replans {self.max_replans!r} must be 0 or more")
        if not isinstance(self.require_signed_answers, bool):
            raise ConfigError(f"require_signed_answers {self.require_signed_answers!r} must be True or False")
        if not _whole(self.grant_max_uses) or self.grant_max_uses < 1:
            raise ConfigError(f"grant_max_uses {self.grant_max_uses!r} must be at least 1")
        _check_brokers(self.brokers)

    def require_executor(self) -> None:
        """Raises:
        ConfigError: the workflow has no executor (a ``Runtime`` needs one to run steps).
        """
        if isinstance(self.executor, NoExecutor):
            raise ConfigError(f"workflow {self.name!r} has no executor: give Workflow(executor=...) to run it "
                              "with a Runtime (a Guard, for a host with its own agent, needs none)")

    @property
    def approver_rule(self) -> ApproverRule:
        assert isinstance(self.approvers, ApproverRule)
        return self.approvers

    @property
    def registry(self) -> ToolRegistry:
        assert isinstance(self.tools, ToolRegistry)
        return self.tools


def _seconds(value: object) -> bool:
    """A finite number of seconds (not a bool): NaN and infinity would never expire or compare."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_brokers(brokers: Mapping[str, SecretBroker]) -> None:
    if not isinstance(brokers, Mapping):
        raise ConfigError("brokers maps names to brokers, e.g. {'postgres': PostgresRoleBroker(url)}")
    for name, broker in brokers.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"invalid broker name {name!r}: use 1-64 letters, digits, '.', '-', '_'")
        if not isinstance(broker, SecretBroker):
            raise ConfigError(f"broker {name!r} ({type(broker).__name__}) has no accepts/issue/revoke/leftovers")


def _check_retry(retry: RetrySettings) -> None:
    if not isinstance(retry, RetrySettings):
        raise ConfigError(f"retry {retry!r} must be a RetrySettings")
    if not _whole(retry.attempts) or retry.attempts < 1:
        raise ConfigError(f"retry attempts {retry.attempts!r} must be a whole number of at least 1")
    for name in ("wait_initial", "wait_max"):
        value = getattr(retry, name)
        if not _seconds(value) or value < 0:
            raise ConfigError(f"retry {name} {value!r} must be a finite number of seconds, 0 or more")
