"""Constraints a plan step puts on one tool argument.

A constraint is what the planner fixed about an argument before any tool ran. The
executor may only choose values inside it; the gateway checks every call against the
constraints carried in the step's grant. A constraint can be narrowed (``narrows``),
which is how sub-scopes are checked rather than assumed.

Strings are checked as given and again after Unicode NFKC normalisation: a value whose
normalised form would be refused (full-width ``．．`` that a server reads as ``..``) is
refused. Equality (``exact``, ``one_of``, ``from_step``) compares the value as given, which
already refuses every other form. Booleans are never numbers: ``True`` is not ``1``.
``pattern`` runs in RE2, which matches in linear time, on values of at most
``MAX_PATTERN_VALUE`` characters.

Two kinds are bound by the runtime, not the planner: ``from_step`` (a value an earlier
step returned, at a path into its output: the step's grant carries digests of those
values, taken from the recorded output when the grant is minted) and ``item`` (in a
repeated step, this iteration's item: each iteration's grant pins it).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
import re
import unicodedata
from abc import ABC, abstractmethod
from typing import Annotated, Any, Literal, Union
from urllib.parse import unquote

import re2
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from .valuepath import PathError, parse_path, select

MAX_PATTERN_VALUE = 4096  # characters: a longer value never matches a pattern
MAX_REGEX_LENGTH = 1000  # characters of a plan's regular expression
MAX_BOUND_VALUES = 1000  # values a ``from_step`` constraint may name; more allow none
_STEP_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


class _Constraint(BaseModel, ABC):
    # A non-finite number keeps its value through JSON (pydantic would write it as null, and
    # a decoded ``Exact(inf)`` would then allow None instead): grants and plans are JSON.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

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
    """The argument must be a string that fully matches ``regex`` (RE2 syntax).

    RE2 matches in time linear in the value, so no crafted value can stall the check;
    a value longer than ``MAX_PATTERN_VALUE`` characters never matches. A regex RE2
    cannot compile (backreferences, lookaround) is refused when the plan is read.
    """

    kind: Literal["pattern"] = "pattern"
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, regex: str) -> str:
        if len(regex) > MAX_REGEX_LENGTH:
            raise ValueError(f"regular expression of {len(regex)} characters is longer than {MAX_REGEX_LENGTH}")
        _compiled(regex)
        return regex

    def allows(self, value: Any) -> bool:
        if not isinstance(value, str):
            return False
        compiled = _compiled(self.regex)
        return all(len(form) <= MAX_PATTERN_VALUE and compiled.fullmatch(form) is not None
                   for form in _forms(value))

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
        if not isinstance(value, str):
            return False
        forms = _forms(value)
        return _under(value, self.prefix) and (len(forms) == 1 or _under(forms[1], _nfkc(self.prefix)))

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


class FromStep(_Constraint):
    """The argument must be a value that step ``step`` returned, at ``path`` in its output.

    The plan names the step (one it depends on) and the path (see ``valuepath``); the
    runtime binds the constraint to that step's recorded output when it mints the grant
    (``bind``), keeping digests of the values, not the values. Unbound, it allows nothing.
    """

    kind: Literal["from_step"] = "from_step"
    step: str
    path: str = ""
    bound: SkipJsonSchema[tuple[str, ...] | None] = None  # sorted digests, set by ``bind``
    overflow: SkipJsonSchema[bool] = False  # the output held more than MAX_BOUND_VALUES values

    @field_validator("step")
    @classmethod
    def _step_id(cls, step: str) -> str:
        if not _STEP_ID.match(step):
            raise ValueError(f"step id {step!r} must be 1-64 letters, digits, '_' or '-'")
        return step

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        return _checked_path(path)

    def allows(self, value: Any) -> bool:
        if self.bound is None or self.overflow:
            return False
        digest = value_digest(value)
        at = bisect.bisect_left(self.bound, digest) if digest is not None else len(self.bound)
        return at < len(self.bound) and self.bound[at] == digest

    def bind(self, output: Any) -> FromStep:
        """This constraint bound to ``output``, the recorded result of step ``step``."""
        values = [v for _, v in select(output, self.path)]
        if len(values) > MAX_BOUND_VALUES:
            return self.model_copy(update={"bound": (), "overflow": True})
        digests = {value_digest(v) for v in values}
        return self.model_copy(update={"bound": tuple(sorted(d for d in digests if d is not None))})

    def describe(self) -> str:
        where = f"a value step {self.step!r} returned" + (f" at {self.path!r}" if self.path else "")
        if self.overflow:
            where += f" (it returned more than {MAX_BOUND_VALUES} there, so none is allowed)"
        return where


def _checked_path(path: str) -> str:
    """A value path as written, or a validation error naming what is wrong with it."""
    try:
        parse_path(path)
    except PathError as exc:
        raise ValueError(str(exc)) from None
    return path


class Item(_Constraint):
    """In a repeated step (``for_each``): the argument is this iteration's item, or the
    value at ``path`` inside it. Each iteration's grant pins it; unbound, it allows nothing."""

    kind: Literal["item"] = "item"
    path: str = ""

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        return _checked_path(path)

    def allows(self, value: Any) -> bool:
        return False

    def describe(self) -> str:
        return "this iteration's item" + (f" at {self.path!r}" if self.path else "")


Constraint = Annotated[
    Union[Exact, OneOf, Pattern, Prefix, Range, AnyValue, FromStep, Item], Field(discriminator="kind")
]


def admits(constraint: _Constraint, given: Any, normalized: Any) -> bool:
    """Whether one argument of a call lies inside ``constraint``.

    ``normalized`` is the value as the tool will get it; ``given`` as the executor passed
    it. Schema validation turns ``True`` into ``1`` for a number argument: a boolean
    must then also pass as given, so ``True`` never passes for a pinned ``1``.
    """
    if isinstance(given, bool) and not isinstance(normalized, bool) and not constraint.allows(given):
        return False
    return constraint.allows(normalized)


def value_digest(value: Any) -> str | None:
    """A digest that two values share exactly when ``exact`` would call them equal
    (``1`` and ``1.0`` do, ``1`` and ``True`` do not); ``None`` for a value that equals
    nothing (NaN) or cannot be written down."""
    if isinstance(value, bool):
        key = f"b:{value}"
    elif isinstance(value, int):
        key = f"n:{value}"
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        key = f"n:{int(value)}" if value.is_integer() else f"n:{value!r}"
    elif isinstance(value, str):
        key = f"s:{value}"
    elif value is None:
        key = "z:"
    else:
        try:
            key = "j:" + json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                    allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return None
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _same(a: Any, b: Any) -> bool:
    # 1 == True in Python; an argument constrained to 1 must not accept True.
    return type(a) is type(b) and a == b or (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _forms(text: str) -> tuple[str, ...]:
    """``text`` as given and, if it differs, NFKC-normalised: both must pass a check."""
    if unicodedata.is_normalized("NFKC", text):
        return (text,)
    return (text, _nfkc(text))


@functools.lru_cache(maxsize=512)
def _compiled(regex: str) -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would write its own copy of the error to stderr
    try:
        return re2.compile(regex, options)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise ValueError(f"invalid regular expression {regex!r}: {detail}") from None


def _under(value: str, prefix: str) -> bool:
    if not value.startswith(prefix):
        return False
    if "/" not in prefix:
        return True
    if _escapes(value):
        return False
    rest = value[len(prefix):]
    return prefix.endswith("/") or rest == "" or rest.startswith("/")


def _escapes(path: str) -> bool:
    """Whether ``path`` has a ``..`` segment, also once percent-decoded (``%2e%2e``, even
    twice encoded) or NFKC-normalised (``．．``, ``‥``): a URL or path a server normalises
    must not climb out of its prefix either."""
    for _ in range(3):
        for form in _forms(path):
            if any(part == ".." for part in form.replace("\\", "/").split("/")):
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
    if isinstance(child, FromStep):
        return _from_step_narrows(child, parent)
    if isinstance(child, Item) and isinstance(parent, Item):
        return child.path == parent.path
    return False


def _from_step_narrows(child: FromStep, parent: _Constraint) -> bool:
    if child.bound is not None and (child.overflow or not child.bound):
        return True  # allows nothing
    if not isinstance(parent, FromStep):
        return False  # digests cannot be compared with listed values: not provable
    if child.bound is None or parent.bound is None:
        # Two plans' unbound constraints: the same step and path bind to the same values.
        return child.bound is None and parent.bound is None and (child.step, child.path) == (parent.step, parent.path)
    return not parent.overflow and set(child.bound) <= set(parent.bound)
