"""Constraints a plan step puts on one tool argument.

A constraint is what the planner fixed about an argument before any tool ran. The
executor may only choose values inside it; the gateway checks every call against the
constraints carried in the step's grant. A constraint can be narrowed (``narrows``),
which is how sub-scopes are checked rather than assumed.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from typing import Annotated, Any, Literal, Union
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Constraint(BaseModel, ABC):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @abstractmethod
    def allows(self, value: Any) -> bool:
        """Whether ``value`` lies inside the constraint."""

    @abstractmethod
    def describe(self) -> str:
        """The constraint in words, for denial reasons (never the offending value)."""


class Exact(_Constraint):
    """The argument must equal ``value``."""

    kind: Literal["exact"] = "exact"
    value: Any

    def allows(self, value: Any) -> bool:
        return _same(value, self.value)

    def describe(self) -> str:
        return f"equal to {self.value!r}"


class OneOf(_Constraint):
    """The argument must be one of ``values``."""

    kind: Literal["one_of"] = "one_of"
    values: tuple[Any, ...] = Field(min_length=1)

    def allows(self, value: Any) -> bool:
        return any(_same(value, v) for v in self.values)

    def describe(self) -> str:
        return f"one of {list(self.values)!r}"


class Pattern(_Constraint):
    """The argument must be a string that fully matches ``regex``."""

    kind: Literal["pattern"] = "pattern"
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, regex: str) -> str:
        try:
            re.compile(regex)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {regex!r}: {exc}") from exc
        return regex

    def allows(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.regex, value) is not None

    def describe(self) -> str:
        return f"a string matching {self.regex!r}"


class Prefix(_Constraint):
    """The argument must be a string starting with ``prefix``.

    For a path-like prefix (one containing ``/``), a value with a ``..`` segment is
    refused so ``/data/../etc`` cannot pass for ``/data/``, and a prefix without a
    trailing slash ends at a path boundary: ``/docs`` allows ``/docs`` and ``/docs/a``,
    not ``/docs-secret``.
    """

    kind: Literal["prefix"] = "prefix"
    prefix: str

    def allows(self, value: Any) -> bool:
        if not isinstance(value, str) or not value.startswith(self.prefix):
            return False
        if "/" not in self.prefix:
            return True
        if _escapes(value):
            return False
        rest = value[len(self.prefix):]
        return self.prefix.endswith("/") or rest == "" or rest.startswith("/")

    def describe(self) -> str:
        return f"a string starting with {self.prefix!r}"


class Range(_Constraint):
    """The argument must be a number with ``min <= value <= max`` (either bound optional)."""

    kind: Literal["range"] = "range"
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        for bound in (self.min, self.max):
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"range bound {bound!r} must be a finite number")
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {self.min} is above max {self.max}")
        return self

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.min is not None and value < self.min:
            return False
        return self.max is None or value <= self.max

    def describe(self) -> str:
        return f"between {self.min} and {self.max}"


class AnyValue(_Constraint):
    """Any value the tool's schema accepts: the executor chooses."""

    kind: Literal["any"] = "any"

    def allows(self, value: Any) -> bool:
        return True

    def describe(self) -> str:
        return "any value"


Constraint = Annotated[
    Union[Exact, OneOf, Pattern, Prefix, Range, AnyValue], Field(discriminator="kind")
]


def _same(a: Any, b: Any) -> bool:
    # 1 == True in Python; an argument constrained to 1 must not accept True.
    return type(a) is type(b) and a == b or (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )


def _escapes(path: str) -> bool:
    """Whether ``path`` has a ``..`` segment, also once percent-decoded (``%2e%2e``, even
    twice encoded): a URL a server normalises must not climb out of its prefix either."""
    for _ in range(3):
        if any(part == ".." for part in path.replace("\\", "/").split("/")):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True  # still encoded after three rounds: refuse rather than guess


def narrows(child: _Constraint, parent: _Constraint) -> bool:
    """Whether every value ``child`` allows is also allowed by ``parent``.

    Conservative: answers ``False`` when it cannot prove the inclusion.
    """
    if isinstance(parent, AnyValue):
        return True
    if isinstance(child, Exact):
        return parent.allows(child.value)
    if isinstance(child, OneOf):
        return all(parent.allows(v) for v in child.values)
    if isinstance(child, Prefix) and isinstance(parent, Prefix):
        return parent.allows(child.prefix) and not _escapes(child.prefix)
    if isinstance(child, Pattern) and isinstance(parent, Pattern):
        return child.regex == parent.regex
    if isinstance(child, Range) and isinstance(parent, Range):
        low_ok = parent.min is None or (child.min is not None and child.min >= parent.min)
        high_ok = parent.max is None or (child.max is not None and child.max <= parent.max)
        return low_ok and high_ok
    return False
