"""An executor that builds the call straight from the step and its dependencies' results."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from scopegraph.constraints import Exact, FromStep, OneOf
from scopegraph.errors import ToolArgumentsError
from scopegraph.roles import StepContext
from scopegraph.valuepath import select

ArgumentBuilder = Callable[[StepContext], Mapping[str, Any]]


class DirectExecutor:
    """Calls the step's tool once, with arguments taken from the plan and the dependencies.

    For each constrained argument: an ``exact`` value is used as is, ``one_of`` takes its
    first value, ``from_step`` the first value at its path in the named step's result that
    the (bound) constraint allows (in a repeated step, that is this iteration's item), and
    any other constraint (``prefix``, ``pattern``, ``range``, ``any``) takes the value of the
    same name from the dependencies' results (a mapping result exposes its keys). An
    argument neither source has needs a builder: ``builders`` maps a tool name to a
    function of the ``StepContext`` returning some of that tool's arguments, e.g.
    ``DirectExecutor(builders={"read_receipt": lambda ctx: {"path": "/receipts/2026/r-1.json"}})``.
    What a builder returns is checked by the gateway like any other call.

    Raises:
        ToolArgumentsError: from ``execute``, when an argument has no value from any source;
            the step then fails with that message.
    """

    def __init__(self, builders: Mapping[str, ArgumentBuilder] | None = None) -> None:
        self._builders = dict(builders or {})

    def arguments_for(self, ctx: StepContext) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if ctx.step.tool in self._builders:
            args.update(self._builders[ctx.step.tool](ctx))
        for name, constraint in ctx.step.constraints.items():
            if name in args:
                continue
            if isinstance(constraint, Exact):
                args[name] = constraint.value
            elif isinstance(constraint, OneOf):
                args[name] = constraint.values[0]
            else:
                found = _bound_value(constraint, ctx.dependencies) if isinstance(constraint, FromStep) \
                    else _from_dependencies(name, ctx.dependencies)
                if found is _MISSING:
                    raise ToolArgumentsError(
                        f"step {ctx.step.id!r}: no value for argument {name!r} in the plan or its dependencies;"
                        f" give DirectExecutor(builders={{{ctx.step.tool!r}: ...}}) a function that supplies it"
                    )
                args[name] = found
        return args

    def execute(self, ctx: StepContext) -> Any:
        # Its one call is its last: the step ends in the same write as the call's result.
        return ctx.tools.last_call(ctx.step.tool, **self.arguments_for(ctx))


_MISSING = object()


def _bound_value(constraint: FromStep, dependencies: Mapping[str, Any]) -> Any:
    if constraint.step not in dependencies:
        return _MISSING
    candidates = (v for _, v in select(dependencies[constraint.step], constraint.path))
    return next((v for v in candidates if constraint.allows(v)), _MISSING)


def _from_dependencies(name: str, dependencies: Mapping[str, Any]) -> Any:
    for step_id in reversed(list(dependencies)):
        result = dependencies[step_id]
        if isinstance(result, Mapping) and name in result:
            return result[name]
    return _MISSING
