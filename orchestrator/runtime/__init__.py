"""The runtime: composes identity, grants, policy and the gateway into a LangGraph graph."""

from .report import RunReport, StepReport
from .runner import Runtime

__all__ = ["RunReport", "Runtime", "StepReport"]
