"""scopegraph's runtime: request-time scoping for multi-agent workflows.

Public API::

    from scopegraph import Workflow, Runtime, tool, Risk, Plan, Step

The decision API, for hosts that run their own agents::

    from scopegraph import Guard, Session, Outcome, CallDecision, StepEnd
"""

from .decisions import CallDecision, Outcome, StepEnd, StepScope
from .errors import ScopegraphError, SessionError
from .gateway import CallResult
from .guard import Guard
from .plan import Plan, Step, parse_plan, validate_plan
from .runtime import RunReport, Runtime
from .session import Session
from .tools import Risk, Tool, ToolRegistry, tool
from .workflow import Workflow

__all__ = [
    "CallDecision", "CallResult", "Guard", "Outcome", "Plan", "Risk", "RunReport", "Runtime", "ScopegraphError",
    "Session", "SessionError", "Step", "StepEnd", "StepScope", "Tool", "ToolRegistry", "Workflow", "parse_plan",
    "tool", "validate_plan",
]
