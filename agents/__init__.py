"""Planner and executor implementations for scopegraph workflows.

The protocols they satisfy (``Planner``, ``Executor``) live in ``scopegraph.roles``
and are re-exported here.
"""

from scopegraph.roles import Executor, Planner, PlanningContext, StepContext

from .direct import DirectExecutor
from .llm_executor import LLMExecutor
from .llm_planner import LLMPlanner
from .scripted import ScriptedPlanner

__all__ = ["DirectExecutor", "Executor", "LLMExecutor", "LLMPlanner", "Planner", "PlanningContext",
           "ScriptedPlanner", "StepContext"]
