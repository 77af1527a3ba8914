"""Checks that hold (issue 13): every constraint kind, property-tested, including after
Unicode normalisation; linear-time patterns; booleans that are not numbers; ``narrows``
never letting a child allow what its parent refuses.

Each property says: no value outside the constraint is allowed. "Outside" is judged the
way a server would read the value: NFKC-normalised, percent-decoded.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from scopegraph import Runtime, tool
from scopegraph.constraints import (
    MAX_BOUND_VALUES,
    MAX_PATTERN_VALUE,
    AnyValue,
    Constraint,
    Exact,
    FromStep,
    Item,
    OneOf,
    Pattern,
    Prefix,
    Range,
    admits,
    narrows,
)
from scopegraph.errors import PlanError
from scopegraph.gateway import SCOPE_POLICY_ID
from scopegraph.plan import parse_plan
from scopegraph.valuepath import PathError, parse_path, select

CONSTRAINT = TypeAdapter(Constraint)


def nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


# strategies ------------------------------------------------------------------------------------
# Characters that NFKC turns into path syntax, and percent-escapes of them.
TRICKY = ["．", "‥", "․", "／", "＼", "﹒", "%2e", "%2E", "%2f", "%EF%BC%8E", "%25%32%65", "ｄ", "ﬁ", "ℌ"]
pieces = st.sampled_from(["docs", "a", ".", "..", "", "x.txt", "d", "fi", *TRICKY])
tricky_paths = st.builds(lambda parts, lead: lead + "/".join(parts), st.lists(pieces, max_size=5),
                         st.sampled_from(["/", "", "/docs/"]))
texts = st.one_of(st.text(max_size=8), st.text(alphabet="aéｅ１1ﬁfi．.@＠-_", max_size=8), tricky_paths)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, width=32), texts)
values = st.one_of(scalars, st.lists(scalars, max_size=3))

prefixes = st.sampled_from(["/docs/", "/docs", "/", "INV-", "a/b", "/ｄocs/", "/docs/ﬁ"])
regexes = st.sampled_from([r"[a-z]+", r"[^/]+", r"/docs/[a-z./]*", r"\d{1,3}", r".*", r"[a-z0-9.]+@x\.example",
                           r"(a|b)*c"])


def _escapes_after_normalising(value: str) -> bool:
    """What a server might read: percent-decoded (up to three times) and NFKC-normalised."""
    for _ in range(4):
        for form in (value, nfkc(value)):
            if ".." in form.replace("\\", "/").split("/"):
                return True
        decoded = unquote(value)
        if decoded == value:
            return False
        value = decoded
    return True


@st.composite
def outputs(draw: st.DrawFn) -> dict[str, Any]:
    ids = draw(st.lists(scalars, max_size=5))
    return {"files": [{"id": i} for i in ids], "largest": {"id": ids[0] if ids else None}}


@st.composite
def from_steps(draw: st.DrawFn) -> FromStep:
    path = draw(st.sampled_from(["files[*].id", "largest.id", "files[0].id", "files", ""]))
    c = FromStep(step="find", path=path)
    return c if draw(st.booleans()) else c.bind(draw(outputs()))


constraints = st.one_of(
    st.builds(Exact, value=scalars),
    st.builds(OneOf, values=st.lists(scalars, min_size=1, max_size=4).map(tuple)),
    st.builds(Prefix, prefix=prefixes),
    st.builds(Pattern, regex=regexes),
    st.builds(Range, min=st.integers(-3, 0), max=st.one_of(st.none(), st.integers(0, 3))),
    st.just(AnyValue()),
    from_steps(),
    st.builds(Item, path=st.sampled_from(["", "email"])),
)


def same(a: Any, b: Any) -> bool:
    """What ``exact`` means by equal: numbers by value, never a bool for a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return bool(a == b)
    return type(a) is type(b) and bool(a == b)


# exact, one_of ---------------------------------------------------------------------------------
@given(pinned=scalars, value=values)
def test_exact_allows_the_pinned_value_only(pinned: Any, value: Any) -> None:
    if Exact(value=pinned).allows(value):
        assert same(value, pinned)
        if isinstance(value, str):  # the very string: no other form of it
            assert value == pinned


@given(pinned=texts)
def test_exact_refuses_every_other_unicode_form_of_a_pinned_string(pinned: str) -> None:
    for form in ("NFKC", "NFKD", "NFC", "NFD"):
        other = unicodedata.normalize(form, pinned)
        assert Exact(value=pinned).allows(other) is (other == pinned)


@given(listed=st.lists(scalars, min_size=1, max_size=4), value=values)
def test_one_of_allows_listed_values_only(listed: list[Any], value: Any) -> None:
    if OneOf(values=tuple(listed)).allows(value):
        assert any(same(value, v) for v in listed)


@pytest.mark.parametrize("c", [Exact(value=1), OneOf(values=(1, 2)), Range(min=0, max=1), Exact(value=1.0)])
def test_a_boolean_coerced_to_a_number_is_not_that_number(c: Any) -> None:
    # pydantic's lax validation makes True into 1 for an int argument: the value as given decides too.
    assert admits(c, 1, 1)
    assert not admits(c, True, 1)
    assert not admits(c, True, 1.0)
    assert admits(AnyValue(), True, 1)


@given(c=constraints, given_value=st.booleans())
def test_no_constraint_but_any_admits_a_boolean_for_a_number(c: Any, given_value: bool) -> None:
    if admits(c, given_value, int(given_value)):
        assert isinstance(c, AnyValue) or c.allows(given_value)


# prefix --------------------------------------------------------------------------------------
@given(prefix=prefixes, value=tricky_paths)
def test_a_prefix_allows_nothing_that_climbs_out_once_normalised(prefix: str, value: str) -> None:
    if Prefix(prefix=prefix).allows(value):
        assert value.startswith(prefix) and nfkc(value).startswith(nfkc(prefix))
        if "/" in prefix:
            assert not _escapes_after_normalising(value)


@pytest.mark.parametrize("value", [
    "/docs/．．/etc/passwd",          # full-width full stops
    "/docs/‥/etc/passwd",             # TWO DOT LEADER: NFKC '..'
    "/docs/﹒﹒/etc/passwd",            # small full stops
    "/docs/..／etc",                  # full-width solidus after '..'
    "/docs/．．＼etc",                  # full-width reverse solidus
    "/docs/%EF%BC%8E%EF%BC%8E/etc",   # full-width full stops, percent-encoded
])
def test_compatibility_forms_of_dot_dot_do_not_pass_a_prefix(value: str) -> None:
    assert value.startswith("/docs/")
    assert not Prefix(prefix="/docs/").allows(value)


@given(prefix=st.sampled_from(["/docs/", "/docs", "INV-", "/"]), value=tricky_paths)
def test_a_prefix_decides_a_value_as_it_decides_its_normal_form(prefix: str, value: str) -> None:
    if Prefix(prefix=prefix).allows(value):
        assert Prefix(prefix=prefix).allows(nfkc(value))


# pattern -------------------------------------------------------------------------------------
@given(regex=regexes, value=texts)
def test_a_pattern_allows_only_full_matches_as_given_and_normalised(regex: str, value: str) -> None:
    if Pattern(regex=regex).allows(value):
        assert re.fullmatch(regex, value) and re.fullmatch(regex, nfkc(value))


def test_a_full_width_solidus_does_not_pass_a_pattern_that_excludes_slashes() -> None:
    assert Pattern(regex=r"[^/]+").allows("reports")
    assert not Pattern(regex=r"[^/]+").allows("..／etc")  # '../etc' once normalised
    assert not Pattern(regex=r"[a-z]+@x\.example").allows("a@x．example")


@pytest.mark.parametrize("regex", [r"(a)\1", r"(?=a)a", r"(?<!b)a", r"a++"])
def test_a_pattern_re2_cannot_compile_is_refused_when_the_plan_is_read(regex: str) -> None:
    with pytest.raises(ValidationError, match="invalid regular expression"):
        Pattern(regex=regex)
    plan = {"steps": [{"id": "s", "tool": "t", "constraints": {"x": {"kind": "pattern", "regex": regex}}}]}
    with pytest.raises(PlanError, match="invalid regular expression"):
        parse_plan(plan)


def test_a_pattern_runs_in_linear_time_and_caps_the_value_length() -> None:
    # Catastrophic for a backtracking engine ((a+)+$ on a...b); RE2 answers at once.
    # Nothing here measures time: with Python's re this call would not return in a test run.
    evil = Pattern(regex=r"(a+)+")
    assert not evil.allows("a" * 4000 + "b")
    assert evil.allows("a" * MAX_PATTERN_VALUE)
    assert not evil.allows("a" * (MAX_PATTERN_VALUE + 1))  # longer than the cap: never matches
    with pytest.raises(ValidationError, match="longer than"):
        Pattern(regex="a" * 1001)


# range, any, item --------------------------------------------------------------------------------
@given(c=st.builds(Range, min=st.integers(-3, 0), max=st.integers(0, 3)), value=values)
def test_a_range_allows_finite_non_boolean_numbers_inside_it_only(c: Range, value: Any) -> None:
    if c.allows(value):
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
        assert c.min is not None and c.max is not None and c.min <= value <= c.max


@given(path=st.sampled_from(["", "email", "a.b[0]"]), value=values)
def test_an_unbound_item_allows_nothing(path: str, value: Any) -> None:
    assert not Item(path=path).allows(value)


# from_step -----------------------------------------------------------------------------------
@given(output=outputs(), path=st.sampled_from(["files[*].id", "largest.id", "files[1].id", "nothing", ""]),
       value=values)
def test_from_step_allows_exactly_the_values_at_its_path(output: dict[str, Any], path: str, value: Any) -> None:
    c = FromStep(step="find", path=path)
    assert not c.allows(value)  # unbound: nothing
    bound = c.bind(output)
    selected = [v for _, v in select(output, path)]
    expected = any(same(value, v) for v in selected if not (isinstance(v, float) and v != v))
    assert bound.allows(value) is expected


@given(output=outputs(), value=texts)
def test_from_step_compares_strings_exactly(output: dict[str, Any], value: str) -> None:
    bound = FromStep(step="find", path="files[*].id").bind(output)
    if bound.allows(value):
        assert any(isinstance(f["id"], str) and f["id"] == value for f in output["files"])


def test_from_step_with_more_values_than_the_bound_allows_none() -> None:
    many = {"files": [{"id": f"f{i}"} for i in range(MAX_BOUND_VALUES + 1)]}
    c = FromStep(step="find", path="files[*].id").bind(many)
    assert not c.allows("f1")
    assert "none is allowed" in c.describe()


@given(output=outputs(), value=values)
def test_from_step_survives_the_grant_s_json_round_trip(output: dict[str, Any], value: Any) -> None:
    c = FromStep(step="find", path="files[*].id").bind(output)
    decoded = CONSTRAINT.validate_json(CONSTRAINT.dump_json(c))
    assert decoded == c and decoded.allows(value) is c.allows(value)


@pytest.mark.parametrize(("path", "problem"), [
    ("files[*", "not a path"), ("files..id", "not a path"), ("files.[0]", "use '.' between keys"),
    (".id", "not a path"), ("files[-1]", "not a path"), ("a" * 300, "longer than"),
])
def test_a_bad_path_is_refused(path: str, problem: str) -> None:
    with pytest.raises(PathError, match=re.escape(problem)):
        parse_path(path)
    with pytest.raises(ValidationError):
        FromStep(step="find", path=path)


def test_paths_select_with_concrete_indexes() -> None:
    data = {"people": [{"email": "a@x"}, {"name": "no mail"}, {"email": "c@x"}]}
    assert select(data, "people[*].email") == [("people[0].email", "a@x"), ("people[2].email", "c@x")]
    assert select(data, "people[1].name") == [("people[1].name", "no mail")]
    assert select(data, "people[9].email") == [] and select(data, "nobody") == []
    assert select([1, 2], "[*]") == [("[0]", 1), ("[1]", 2)] and select(7, "") == [("", 7)]


# narrows --------------------------------------------------------------------------------------
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(child=constraints, parent=constraints, value=values)
def test_a_child_never_allows_what_its_parent_refuses(child: Any, parent: Any, value: Any) -> None:
    if narrows(child, parent) and child.allows(value):
        assert parent.allows(value)


@given(child_prefix=prefixes, parent_prefix=prefixes, value=tricky_paths)
def test_a_narrower_prefix_stays_narrower_after_normalisation(child_prefix: str, parent_prefix: str,
                                                              value: str) -> None:
    child, parent = Prefix(prefix=child_prefix), Prefix(prefix=parent_prefix)
    if narrows(child, parent) and child.allows(value):
        assert parent.allows(value) and parent.allows(nfkc(value)) or nfkc(child_prefix) != child_prefix


@given(output=outputs(), subset=st.integers(0, 4))
def test_from_step_narrows_a_parent_bound_to_a_superset_only(output: dict[str, Any], subset: int) -> None:
    parent = FromStep(step="find", path="files[*].id").bind(output)
    fewer = {"files": output["files"][:subset]}
    child = FromStep(step="find", path="files[*].id").bind(fewer)
    assert narrows(child, parent)
    extra = {"files": [*output["files"], {"id": "not-in-parent-zz"}]}
    assume(not parent.allows("not-in-parent-zz"))
    assert not narrows(FromStep(step="find", path="files[*].id").bind(extra), parent)
    assert not narrows(FromStep(step="find", path="files[*].id"), parent)  # unbound: not provable
    assert narrows(Exact(value="zz"), parent) is parent.allows("zz")


# through the gateway -------------------------------------------------------------------------
@tool(risk="read")
def count(n: int) -> int:
    """Count to n."""
    return n


def test_the_gateway_refuses_true_for_a_pinned_one(make_workflow: Any, make_runtime: Any) -> None:
    rt: Runtime = make_runtime(make_workflow(tools=[count]))
    from tests.helpers import mint_grant

    grant, ctx = mint_grant(rt, "count", constraints={"n": {"kind": "exact", "value": 1}})
    refused = rt.gateway.call(grant.danger_token(), "count", {"n": True}, ctx)
    assert refused.status == "denied" and refused.decision.policy_ids == (SCOPE_POLICY_ID,)
    assert rt.gateway.call(grant.danger_token(), "count", {"n": 1}, ctx).ok
