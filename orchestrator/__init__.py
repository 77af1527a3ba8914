"""scopegraph's runtime: request-time scoping for multi-agent workflows.

Public API::

    from scopegraph import Workflow, Runtime, tool, Risk, Plan, Step
"""

from .errors import ScopegraphError
from .plan import Plan, Step, parse_plan, validate_plan
from .runtime import RunReport, Runtime
from .tools import Risk, Tool, ToolRegistry, tool
from .workflow import Workflow

__all__ = [
    "Plan", "Risk", "RunReport", "Runtime", "ScopegraphError", "Step", "Tool", "ToolRegistry",
    "Workflow", "parse_plan", "tool", "validate_plan",
]
