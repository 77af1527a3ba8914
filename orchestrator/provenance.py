"""Where each argument of a call came from, and what data it may carry.

An agent that reads content from outside (an email, a web page) can be steered by
instructions planted in it. The defence is to know, for every argument, whether the
planner fixed it before any tool ran or whether it was chosen after the executor had
seen tool output, and to let policy decide on that.

For one call:

- an argument the step's grant pins (``exact`` or ``one_of``) came from the **plan**:
  the planner fixed it from the trusted task, before any tool ran;
- an argument the executor did not pass takes the tool's **default**;
- any other argument was chosen by the executor. If its value appears in tool output
  the executor was shown (a dependency's result, or an earlier call of this step), it
  came from **tool_output**; otherwise from the **executor** itself.

Taint is deliberately coarse: an argument not fixed by the plan carries the labels of
*everything* the executor was shown, whether or not the value is found there. A model
that read an untrusted page can paraphrase an address out of it; matching values would
miss that, so matching only names the source, and never clears a label.

What matching does say: whether the value occurs in output *not* labelled ``untrusted``
(``user_data``): the user's own records, contacts, history. A destination found there
is one the user already deals with, so policy may ask a person rather than refuse. An
argument a ``from_step`` constraint binds came from that step's output by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .constraints import Constraint, Exact, FromStep, OneOf

Source = Literal["plan", "default", "tool_output", "executor"]
FIXED_SOURCES = frozenset({"plan", "default"})  # chosen before any tool ran, by the plan or the tool's author
UNTRUSTED = "untrusted"
_MIN_MATCH = 4  # shorter strings ("a", "yes", "10") are found everywhere and prove nothing


@dataclass(frozen=True, kw_only=True)
class Observation:
    """Tool output an executor was shown: which step and tool produced it, its labels."""

    step_id: str
    tool: str
    labels: frozenset[str]
    value: Any


@dataclass(frozen=True, kw_only=True)
class Origin:
    """One argument's provenance: where it came from, the labels it may carry, and from which steps."""

    source: Source
    labels: frozenset[str] = frozenset()
    steps: tuple[str, ...] = ()  # the steps whose output holds the value (for ``tool_output``)
    user_data: bool = False  # the value occurs in output not labelled ``untrusted``

    def as_context(self) -> dict[str, Any]:
        return {"source": self.source, "labels": sorted(self.labels), "steps": list(self.steps),
                "user_data": self.user_data}


def fixed_by_plan(constraint: Constraint | None) -> bool:
    """Whether the planner chose the value itself, leaving the executor no choice but which pin."""
    return isinstance(constraint, (Exact, OneOf))


def trace_arguments(
    arguments: Mapping[str, Any],
    constraints: Mapping[str, Constraint],
    observations: Iterable[Observation],
    passed: Iterable[str] | None = None,
) -> dict[str, Origin]:
    """The provenance of each argument of one call.

    ``arguments`` are the normalised arguments (defaults filled in); ``passed`` names
    those the executor actually gave (``None``: all of them).
    """
    seen = tuple(observations)
    shown = frozenset().union(*(o.labels for o in seen)) if seen else frozenset()
    given = set(arguments) if passed is None else set(passed)
    out: dict[str, Origin] = {}
    for name, value in arguments.items():
        if fixed_by_plan(constraints.get(name)):
            out[name] = Origin(source="plan")
            continue
        if name not in given:
            out[name] = Origin(source="default")
            continue
        holding = [o for o in seen if _contains(o.value, value)]
        bound = constraints.get(name)
        if isinstance(bound, FromStep) and bound.allows(value):  # from that step's output, however short
            holding += [o for o in seen if o.step_id == bound.step]
        steps = tuple(sorted({o.step_id for o in holding}))
        out[name] = Origin(source="tool_output" if steps else "executor", labels=shown, steps=steps,
                           user_data=any(UNTRUSTED not in o.labels for o in holding))
    return out


def _contains(haystack: Any, needle: Any) -> bool:
    """Whether ``needle`` occurs in ``haystack``: as a leaf value, or inside a string leaf."""
    if needle is None or isinstance(needle, bool):
        return False
    if isinstance(needle, (list, tuple, set, frozenset)):
        return any(_contains(haystack, n) for n in needle)
    if isinstance(needle, Mapping):
        return any(_contains(haystack, n) for n in needle.values())
    for leaf in _leaves(haystack):
        if isinstance(needle, str):
            if len(needle) >= _MIN_MATCH and isinstance(leaf, str) and needle.casefold() in leaf.casefold():
                return True
        elif isinstance(needle, (int, float)) and not isinstance(leaf, bool):
            if isinstance(leaf, (int, float)) and leaf == needle and abs(needle) >= 10:
                return True
            if isinstance(leaf, str) and abs(needle) >= 1000 and _number_in_text(needle, leaf):
                return True
    return False


def _number_in_text(number: int | float, text: str) -> bool:
    as_text = str(int(number)) if float(number).is_integer() else str(number)
    return as_text in text


def _leaves(value: Any, depth: int = 0) -> Iterator[Any]:
    if depth > 32:  # pathological nesting: stop looking (matching only names the source)
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield k
            yield from _leaves(v, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _leaves(v, depth + 1)
    else:
        yield value
