"""Argument constraints (invariant 4: an executor can narrow its scope, never widen it)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from scopegraph.constraints import (
    AnyValue,
    Constraint,
    Exact,
    OneOf,
    Pattern,
    Prefix,
    Range,
    narrows,
)
from scopegraph.errors import PlanError
from scopegraph.plan import parse_plan

NAN = float("nan")
INF = float("inf")
CONSTRAINT = TypeAdapter(Constraint)

# strategies ------------------------------------------------------------------------------
segments = st.sampled_from(["docs", "a", "b.txt", "..", ".", "", "...", "..x", "2026"])
paths = st.builds(
    lambda parts, sep, lead: (lead + sep.join(parts)),
    st.lists(segments, max_size=5),
    st.sampled_from(["/", "\\"]),
    st.sampled_from(["/", "", "\\"]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-1000, max_value=1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 0.0, 1.0, -1, 100, 100.0]),
    st.text(max_size=6),
    paths,
)
bounds = st.one_of(st.none(), st.integers(-200, 200), st.floats(-200, 200))


@st.composite
def ranges(draw: st.DrawFn) -> Range:
    low, high = draw(bounds), draw(bounds)
    assume(low is not None or high is not None)
    if low is not None and high is not None and low > high:
        low, high = high, low
    return Range(min=low, max=high)


prefixes = st.one_of(paths, st.sampled_from(["/docs/", "/docs", "/docs/a/", "docs", "", "/"]))
regexes = st.sampled_from([r"[a-z]+", r"/docs/[a-z./]*", r"\d{1,3}", r".*", r"alpha|beta"])
constraints = st.one_of(
    st.builds(Exact, value=scalars),
    st.builds(OneOf, values=st.lists(scalars, min_size=1, max_size=4).map(tuple)),
    st.builds(Prefix, prefix=prefixes),
    st.builds(Pattern, regex=regexes),
    ranges(),
    st.just(AnyValue()),
)
values = st.one_of(scalars, paths, st.integers(-300, 300), st.floats(-300, 300))


def _has_dotdot(path: str) -> bool:
    return ".." in path.replace("\\", "/").split("/")


# exact / one_of --------------------------------------------------------------------------
@pytest.mark.parametrize(("pinned", "value", "allowed"), [
    ("e-17", "e-17", True),
    ("e-17", "e-18", False),
    ("e-17", "E-17", False),
    (1, 1, True),
    (1, 1.0, True),      # the same number
    (1, True, False),    # 1 == True in Python; a pinned 1 must not accept True
    (True, 1, False),
    (0, False, False),
    (1, "1", False),
    (None, None, True),
    (None, 0, False),
    ([1, 2], [1, 2], True),
    ([1, 2], [2, 1], False),
])
def test_exact_allows_only_the_pinned_value(pinned: Any, value: Any, allowed: bool) -> None:
    assert Exact(value=pinned).allows(value) is allowed


def test_one_of_allows_only_listed_values_and_needs_at_least_one() -> None:
    c = OneOf(values=("travel", "meals", 3))
    assert c.allows("travel") and c.allows("meals") and c.allows(3) and c.allows(3.0)
    assert not c.allows("hotel")
    assert not c.allows(True)
    assert not c.allows(None)
    with pytest.raises(ValidationError):
        OneOf(values=())


# pattern ---------------------------------------------------------------------------------
def test_pattern_must_match_the_whole_string() -> None:
    c = Pattern(regex=r"[a-z]+-\d+")
    assert c.allows("abc-12")
    assert not c.allows("abc-12; rm -rf /")
    assert not c.allows("xx abc-12")
    assert not c.allows("abc-12\n")
    assert not c.allows(12)
    assert not c.allows(None)


def test_pattern_that_does_not_compile_is_refused() -> None:
    with pytest.raises(ValidationError, match="invalid regular expression"):
        Pattern(regex="(unclosed")


# prefix ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    "/receipts/2026/../../hr/salaries.csv",
    "/receipts/2026/..",
    "/receipts/2026/a/../../../etc/passwd",
    "/receipts/2026\\..\\..\\hr",
    "/receipts/2026/..\\secret",
    "/receipts/2026/%2e%2e/hr/salaries.csv",        # a URL a server would normalise to '..'
    "/receipts/2026/%2E%2e%2Fhr",
    "/receipts/2026/%252e%252e/hr",                 # encoded twice
    "/receipts/2026/%25252525252e%25252525252e/hr",  # encoded past any sane depth: refused, not guessed
])
def test_prefix_refuses_path_traversal(value: str) -> None:
    assert value.startswith("/receipts/2026")
    assert not Prefix(prefix="/receipts/2026/").allows(value)


@pytest.mark.parametrize(("value", "allowed"), [
    ("/receipts/2026/r-1042.json", True),
    ("/receipts/2026/sub/dir/r.json", True),
    ("/receipts/2026/..r.json", True),      # '..r.json' is a name, not a parent reference
    ("/receipts/2026/./r.json", True),
    ("/receipts/2025/r.json", False),
    ("receipts/2026/r.json", False),
    ("", False),
    (None, False),
    (2026, False),
    (["/receipts/2026/r.json"], False),
])
def test_prefix_allows_values_under_it(value: Any, allowed: bool) -> None:
    assert Prefix(prefix="/receipts/2026/").allows(value) is allowed


@given(prefix=st.sampled_from(["/docs/", "/docs", "/", "a/b"]), value=paths)
def test_a_path_prefix_never_allows_a_parent_reference(prefix: str, value: str) -> None:
    if _has_dotdot(value):
        assert not Prefix(prefix=prefix).allows(value)
    else:
        rest = value[len(prefix):]
        at_boundary = prefix.endswith("/") or rest == "" or rest.startswith("/")
        assert Prefix(prefix=prefix).allows(value) is (value.startswith(prefix) and at_boundary)


@pytest.mark.parametrize(("prefix", "value", "allowed"), [
    ("/docs", "/docs", True), ("/docs", "/docs/a.txt", True),
    ("/docs", "/docs-secret/a.txt", False), ("/docs", "/docsX", False),
    ("INV-", "INV-2026", True),  # not a path: a plain string prefix
])
def test_a_path_prefix_without_a_trailing_slash_stops_at_a_path_boundary(
        prefix: str, value: str, allowed: bool) -> None:
    assert Prefix(prefix=prefix).allows(value) is allowed


# range -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "allowed"), [
    (1, True), (10_000, True), (5000.5, True), (0, False), (10_001, False), (-1, False),
    (True, False), (False, False),                    # bools are not numbers here
    (NAN, False), (INF, False), (-INF, False),
    ("5000", False), (None, False), ([5000], False),
])
def test_range_allows_finite_numbers_inside_it(value: Any, allowed: bool) -> None:
    assert Range(min=1, max=10_000).allows(value) is allowed


def test_range_with_one_bound() -> None:
    assert Range(min=0).allows(10**12) and not Range(min=0).allows(-1)
    assert Range(max=0).allows(-(10**12)) and not Range(max=0).allows(1)
    assert not Range(min=0).allows(INF)


@pytest.mark.parametrize("bounds", [{}, {"min": 5, "max": 1}, {"min": None, "max": None}])
def test_range_without_a_bound_or_inverted_is_refused(bounds: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Range(**bounds)


@given(c=ranges(), value=st.one_of(st.integers(-500, 500), st.floats(allow_nan=True), st.booleans()))
def test_range_property(c: Range, value: Any) -> None:
    expected = (
        not isinstance(value, bool)
        and math.isfinite(value)
        and (c.min is None or value >= c.min)
        and (c.max is None or value <= c.max)
    )
    assert c.allows(value) is expected


@pytest.mark.parametrize("bounds", [
    {"min": NAN, "max": 10}, {"min": 0, "max": NAN}, {"min": NAN}, {"max": NAN},
])
def test_range_with_a_nan_bound_never_widens(bounds: dict[str, Any]) -> None:
    """A NaN bound compares false with everything: it must not turn into 'no bound'."""
    try:
        c = Range(**bounds)
    except ValidationError:
        return  # refused up front: fine
    assert not any(c.allows(v) for v in (-1e18, -1, 0, 5, 11, 1e18))


def test_a_plan_with_a_nan_range_bound_is_refused_or_allows_nothing() -> None:
    """Plans are untrusted (LLM output); JSON ``NaN`` must not open a range."""
    text = ('{"steps": [{"id": "s", "tool": "t", "constraints": '
            '{"amount": {"kind": "range", "min": NaN, "max": 100}}}]}')
    try:
        plan = parse_plan(text)
    except PlanError:
        return
    c = plan.steps[0].constraints["amount"]
    assert not c.allows(-1_000_000)


# any ---------------------------------------------------------------------------------------
@given(value=values)
def test_any_allows_everything(value: Any) -> None:
    assert AnyValue().allows(value)


# narrows -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("child", "parent", "expected"), [
    (Exact(value="/docs/a.txt"), Prefix(prefix="/docs/"), True),
    (Exact(value="/docs/../etc"), Prefix(prefix="/docs/"), False),
    (Exact(value=5), Range(min=1, max=10), True),
    (Exact(value=True), Range(min=0, max=10), False),
    (Exact(value=11), Range(min=1, max=10), False),
    (OneOf(values=("a", "b")), OneOf(values=("a", "b", "c")), True),
    (OneOf(values=("a", "z")), OneOf(values=("a", "b", "c")), False),
    (Prefix(prefix="/docs/2026/"), Prefix(prefix="/docs/"), True),
    (Prefix(prefix="/docs/../etc/"), Prefix(prefix="/docs/"), False),
    (Prefix(prefix="/doc"), Prefix(prefix="/docs/"), False),
    (Range(min=2, max=5), Range(min=1, max=10), True),
    (Range(min=0, max=5), Range(min=1, max=10), False),
    (Range(min=2), Range(min=1, max=10), False),
    (Range(min=2, max=5), Range(min=1), True),
    (Pattern(regex="[a-z]+"), Pattern(regex="[a-z]+"), True),
    (Pattern(regex="[a-c]+"), Pattern(regex="[a-z]+"), False),   # not provable: refused
    (AnyValue(), Exact(value=1), False),
    (AnyValue(), Prefix(prefix="/"), False),
    (AnyValue(), AnyValue(), True),
    (Exact(value="anything"), AnyValue(), True),
    (Prefix(prefix="/docs/"), Pattern(regex=".*"), False),
])
def test_narrows_table(child: Any, parent: Any, expected: bool) -> None:
    assert narrows(child, parent) is expected


@given(child=constraints, parent=constraints, value=values)
def test_narrows_never_widens(child: Any, parent: Any, value: Any) -> None:
    """If ``child`` narrows ``parent``, nothing the child allows is refused by the parent."""
    if narrows(child, parent) and child.allows(value):
        assert parent.allows(value)


@given(c=constraints)
def test_every_constraint_narrows_itself_or_is_refused_conservatively(c: Any) -> None:
    # Reflexivity holds for every kind except where a value is not equal to itself (NaN).
    if isinstance(c, Exact) and c.value != c.value:
        return
    if isinstance(c, OneOf) and any(v != v for v in c.values):
        return
    if isinstance(c, Prefix) and _has_dotdot(c.prefix):
        assert not narrows(c, c)  # a prefix that escapes is never trusted as a sub-scope
        return
    assert narrows(c, c)


@given(c=constraints, value=values)
def test_constraints_survive_a_json_round_trip(c: Any, value: Any) -> None:
    """Grants carry constraints as JSON: the decoded constraint allows exactly the same."""
    # NaN and infinities have no JSON form (pydantic writes null); plans refuse them.
    assume(not (isinstance(c, (Exact, OneOf)) and any(w in repr(c).lower() for w in ("nan", "inf"))))
    decoded = CONSTRAINT.validate_json(CONSTRAINT.dump_json(c))
    assert decoded.allows(value) is c.allows(value)


@pytest.mark.parametrize("constraint", [
    {"kind": "exact", "value": INF}, {"kind": "exact", "value": -INF}, {"kind": "exact", "value": NAN},
    {"kind": "one_of", "values": [1, INF]}, {"kind": "exact", "value": {"limit": [1.5, INF]}},
])
def test_a_plan_pinning_a_number_json_cannot_hold_is_refused(constraint: dict[str, Any]) -> None:
    """A plan is kept as JSON, where NaN and infinities have no form: pydantic writes them as
    null, and the plan read back would pin ``None`` (allowing a call the plan never named)."""
    from scopegraph import tool
    from scopegraph.plan import validate_plan
    from scopegraph.tools import ToolRegistry

    @tool(risk="read")
    def read(limit: Any) -> dict[str, Any]:
        """Read up to a limit."""
        return {}

    plan = parse_plan({"steps": [{"id": "s", "tool": "read", "purpose": "read",
                                  "constraints": {"limit": constraint}}]})
    with pytest.raises(PlanError, match=r"step 's' constrains 'limit' with NaN or an infinite number"):
        validate_plan(plan, ToolRegistry([read]))


@pytest.mark.parametrize("value", [INF, -INF, [0.5, INF]])
def test_a_constraint_keeps_an_infinite_value_through_its_json(value: Any) -> None:
    original = Exact(value=value)
    decoded = Exact.model_validate_json(original.model_dump_json())
    assert not decoded.allows(None)  # what null would have pinned
    assert decoded.allows(value) is original.allows(value)
