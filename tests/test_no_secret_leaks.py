"""No secret leaks (issue 4, point 6; invariant 7).

Workflows run allowed, denied, approved, failed and cancelled-then-resumed, and the CLI
runs its commands in process. Every place an operator or a collector can read is then
searched for credential and key material: span names, attributes, events and status
descriptions; metric data point attributes; ledger records; the store's tables (except
the key table itself); log records; CLI stdout and stderr; error messages and call
results handed back to executors.

The material searched for: every grant token and JWT-SVID the steps were handed
(captured by the executor, the only party that legitimately holds them), any JWT-shaped
string at all, and each trust domain's private key (from the store's ``sg_keys``) and
each step's X.509-SVID key in PEM, DER-base64, raw hex, base64 and base64url forms.
A tool argument holding a secret must not reach spans, metrics or the ledger either.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opentelemetry.sdk.trace import ReadableSpan

from scopegraph import Runtime, Workflow, tool
from scopegraph import policies as shipped
from scopegraph.agents import DirectExecutor
from scopegraph.cli import main
from scopegraph.clock import FixedClock
from scopegraph.errors import ScopegraphError
from scopegraph.gateway import CallContext
from scopegraph.identity import SpiffeId
from scopegraph.ledger import Ledger
from scopegraph.roles import StepContext
from scopegraph.runtime.runner import checkpoints_path

from .helpers import READ_PLAN, STANDARD_TOOLS
from .otel_capture import Capture, otel

__all__ = ["otel"]  # the fixture, imported so pytest finds it here

JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.")

MAIL_AFTER_READ = {"steps": [
    {"id": "doc", "tool": "read_doc", "purpose": "read",
     "constraints": {"path": {"kind": "prefix", "prefix": "/docs/"}}},
    {"id": "mail", "tool": "send_mail", "purpose": "mail it", "depends_on": ["doc"],
     "constraints": {"to": {"kind": "exact", "value": "boss@example.org"},
                     "body": {"kind": "exact", "value": "summary"}}},
]}
NOTE_PLAN = {"steps": [
    {"id": "note", "tool": "write_note", "purpose": "write the note",
     "constraints": {"title": {"kind": "exact", "value": "quarterly"},
                     "amount": {"kind": "exact", "value": 42}}},
]}


# what must never show --------------------------------------------------------------------
def _key_forms(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> list[str]:
    raw = (key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption()) if isinstance(key, Ed25519PrivateKey)
           else key.private_numbers().private_value.to_bytes(32, "big"))
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    b64 = base64.b64encode(raw).decode()
    return [raw.hex(), raw.hex().upper(), b64, b64.rstrip("="),
            base64.urlsafe_b64encode(raw).decode().rstrip("="), base64.b64encode(der).decode()]


@dataclass
class Secrets:
    """Credentials handed out during the test, and the keys behind them."""

    tokens: list[str] = field(default_factory=list)
    keys: list[Ed25519PrivateKey] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    def load_store_keys(self, store_path: Path) -> list[str]:
        """Every private key of the store, in every form it might be printed in. Since issue 12
        they live in the keystore beside the store (``keys/``); the store must hold none."""
        forms: list[str] = []
        with closing(sqlite3.connect(str(store_path))) as conn:
            kept = [r for r in conn.execute("SELECT name, private_pem FROM sg_keys").fetchall() if r[1]]
        assert not kept, "the store holds a private key"
        pems = [p.read_bytes() for p in sorted((store_path.parent / "keys").glob("*.key"))]
        assert pems, "the keystore holds no keys: nothing to look for"
        for pem in pems:
            text = pem.decode()
            body = [ln for ln in text.splitlines() if ln and not ln.startswith("-----")]
            forms += [text.strip(), "".join(body), *body]
            key = serialization.load_pem_private_key(pem, password=None)
            assert isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
            forms += _key_forms(key)
        return forms

    def needles(self, store_path: Path) -> list[str]:
        out = list(self.extra) + self.load_store_keys(store_path)
        for token in self.tokens:
            header, payload, signature = token.split(".")
            out += [token, signature, f"{payload}.{signature}"]
        for key in self.keys:
            out += _key_forms(key)
        return [n for n in out if n]


class Haystack:
    """Everything readable, by where it came from."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, value: Any) -> None:
        self.texts.append((where, value if isinstance(value, str) else json.dumps(value, default=repr)))

    def add_spans(self, spans: Iterable[ReadableSpan]) -> None:
        for s in spans:
            self.add(f"span {s.name}", {
                "name": s.name, "attributes": dict(s.attributes or {}),
                "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in s.events],
                "links": [dict(link.attributes or {}) for link in s.links],
                "status": s.status.description, "resource": dict(s.resource.attributes),
            })

    def add_metrics(self, otel: Capture) -> None:
        for p in otel.points():
            self.add(f"metric {p.name}", {"name": p.name, "attributes": dict(p.attributes)})

    def add_store(self, store_path: Path) -> None:
        """Every table but the key table; the ledger head's signature is not a credential.
        The run checkpoints too, in the file of their own beside the store."""
        beside = checkpoints_path(store_path)
        if beside != store_path and beside.is_file():
            self._add_tables(beside)
        self._add_tables(store_path)
        with closing(sqlite3.connect(str(store_path))) as conn:
            ledger = [r for r in conn.execute("SELECT data FROM sg_ledger")]
        self.add("ledger", [r[0] for r in ledger])

    def _add_tables(self, path: Path) -> None:
        with closing(sqlite3.connect(str(path))) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                if table == "sg_keys":
                    continue
                cols = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
                keep = [c for c in cols if not (table == "sg_ledger_head" and c == "signature")]
                for row in conn.execute(f"SELECT {', '.join(keep)} FROM {table}"):
                    text = " ".join(v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in row)
                    self.add(f"store table {table}", text)

    def add_logs(self, caplog: pytest.LogCaptureFixture) -> None:
        for r in caplog.records:
            self.add(f"log {r.name}", f"{r.getMessage()} {r.exc_text or ''} {r.stack_info or ''}")

    def leaks(self, needles: list[str]) -> list[str]:
        found = []
        for where, text in self.texts:
            if JWT.search(text):
                found.append(f"{where}: JWT-shaped string {JWT.search(text).group(0)[:24]}…")  # type: ignore[union-attr]
            for n in needles:
                if n in text:
                    found.append(f"{where}: secret material {n[:12]}…")
        return found


class Keeper(DirectExecutor):
    """A direct executor that keeps what its step was handed, so the test knows what to look for."""

    def __init__(self, found: Secrets, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.found = found

    def execute(self, ctx: StepContext) -> Any:
        self.found.tokens.append(ctx.tools._ToolHandle__token)  # type: ignore[attr-defined]
        self.found.tokens.append(ctx.svid.danger_jwt())
        self.found.keys.append(ctx.svid.danger_x509_private_key())
        return self.before(ctx)

    def before(self, ctx: StepContext) -> Any:
        return super().execute(ctx)


class CuriousKeeper(Keeper):
    def before(self, ctx: StepContext) -> Any:
        if ctx.step.id == "doc":
            ctx.tools.call("send_mail", to="x@evil.example", body="hello")
            ctx.tools.call("read_doc", path="/etc/passwd")
        return super().before(ctx)


class CrashOnceKeeper(Keeper):
    crashed = False

    def before(self, ctx: StepContext) -> Any:
        result = super().before(ctx)
        if not CrashOnceKeeper.crashed:
            CrashOnceKeeper.crashed = True
            raise KeyboardInterrupt  # the process is told to stop mid-step, after the call
        return result


@tool
def explode(x: str) -> str:
    """Always fails."""
    raise RuntimeError("the tool broke")


BUILDERS = {"read_doc": lambda ctx: {"path": "/docs/readme.txt"}, "lookup": lambda ctx: {"limit": 5}}


@pytest.fixture
def found() -> Secrets:
    return Secrets()


@pytest.fixture
def hay(caplog: pytest.LogCaptureFixture) -> Haystack:
    caplog.set_level(logging.DEBUG)
    return Haystack()


def assert_no_leaks(hay: Haystack, found: Secrets, otel: Capture, caplog: pytest.LogCaptureFixture,
                    store_path: Path, *, min_tokens: int = 2) -> None:
    assert len(found.tokens) >= min_tokens, "the executor saw no credentials: the test checks nothing"
    hay.add_spans(otel.spans())
    hay.add_metrics(otel)
    hay.add_store(store_path)
    hay.add_logs(caplog)
    assert otel.spans(), "no spans were captured"
    leaks = hay.leaks(found.needles(store_path))
    assert not leaks, "\n".join(leaks)


def _attack_with_spent_tokens(rt: Runtime, found: Secrets, hay: Haystack, run_id: str) -> None:
    """Present each captured grant again (revoked by now), tampered and cut short: reasons stay clean."""
    grants = [claims | {"token": t} for t in found.tokens if "scope" in (claims := json.loads(_payload(t)))]
    assert grants, "no grant token was captured"
    for claims in grants:
        token, tool_name = claims["token"], claims["aud"].removeprefix("tool:")
        ctx = CallContext(workflow=rt.workflow.name, run_id=claims["run"], step_id=claims["step"],
                          principal=SpiffeId.parse(claims["sub"]))
        flipped = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        for presented in (token, flipped, token.rsplit(".", 1)[0], token[: len(token) // 2]):
            result = rt.gateway.call(presented, tool_name, {}, ctx)
            assert result.status == "denied"
            hay.add(f"reason for a replayed token ({run_id})", result.reason)
            hay.add(f"call result ({run_id})", repr(result))


def _payload(token: str) -> str:
    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()


# workflows -------------------------------------------------------------------------------
def test_allowed_run_leaks_nothing(otel: Capture, hay: Haystack, found: Secrets,
                                   caplog: pytest.LogCaptureFixture, store_path: Path,
                                   make_workflow: Callable[..., Workflow],
                                   make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(make_workflow(READ_PLAN, executor=Keeper(found, builders=BUILDERS)))
    report = rt.run("read", run_id="ok1")
    assert report.status == "completed"
    hay.add("run record", report.model_dump_json())
    hay.add("run summary", report.summary())
    _attack_with_spent_tokens(rt, found, hay, "ok1")
    assert_no_leaks(hay, found, otel, caplog, store_path, min_tokens=4)


def test_denied_run_leaks_nothing(otel: Capture, hay: Haystack, found: Secrets,
                                  caplog: pytest.LogCaptureFixture, store_path: Path,
                                  make_workflow: Callable[..., Workflow],
                                  make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(make_workflow(MAIL_AFTER_READ, executor=CuriousKeeper(found, builders=BUILDERS)))
    report = rt.run("read then mail", run_id="deny1")
    assert report.status == "denied"
    assert [c.decision for s in report.steps for c in s.calls].count("deny") == 3
    hay.add("run record", report.model_dump_json())
    hay.add("run summary", report.summary())
    _attack_with_spent_tokens(rt, found, hay, "deny1")
    assert_no_leaks(hay, found, otel, caplog, store_path, min_tokens=4)


def test_approved_run_resumed_elsewhere_leaks_nothing(
        otel: Capture, hay: Haystack, found: Secrets, caplog: pytest.LogCaptureFixture, store_path: Path,
        clock: FixedClock, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    workflow = make_workflow(NOTE_PLAN, approvers=["bob"], executor=Keeper(found))
    rt = make_runtime(workflow)
    paused = rt.run("note", initiator="alice", run_id="apr1")
    assert paused.status == "paused"
    approval = paused.approvals[0]["id"]
    for who in ("alice", "mallory"):
        with pytest.raises(ScopegraphError) as refused:
            rt.approvals.approve(approval, approver=who)
        hay.add(f"error approving as {who}", str(refused.value))
    clock.advance(10)
    rt.approvals.approve(approval, approver="bob")
    report = make_runtime(workflow).resume("apr1")
    assert report.status == "completed"
    with pytest.raises(ScopegraphError) as again:
        rt.approvals.approve(approval, approver="bob")
    hay.add("error approving twice", str(again.value))
    hay.add("run record", report.model_dump_json())
    assert_no_leaks(hay, found, otel, caplog, store_path)


def test_failed_run_leaks_nothing(otel: Capture, hay: Haystack, found: Secrets,
                                  caplog: pytest.LogCaptureFixture, store_path: Path,
                                  make_workflow: Callable[..., Workflow],
                                  make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [{"id": "boom", "tool": "explode", "constraints": {"x": {"kind": "exact", "value": "1"}}}]}
    rt = make_runtime(make_workflow(plan, tools=[*STANDARD_TOOLS, explode], executor=Keeper(found)))
    report = rt.run("explode", run_id="fail1")
    assert report.status == "failed"
    hay.add("run record", report.model_dump_json())
    assert_no_leaks(hay, found, otel, caplog, store_path)


def test_cancelled_and_resumed_run_leaks_nothing(otel: Capture, hay: Haystack, found: Secrets,
                                                 caplog: pytest.LogCaptureFixture, store_path: Path,
                                                 make_workflow: Callable[..., Workflow],
                                                 make_runtime: Callable[..., Runtime]) -> None:
    CrashOnceKeeper.crashed = False
    plan = {"steps": [READ_PLAN["steps"][0]]}
    workflow = make_workflow(plan, executor=CrashOnceKeeper(found, builders=BUILDERS))
    rt = make_runtime(workflow)
    with pytest.raises(KeyboardInterrupt):
        rt.run("read", run_id="crash1")
    report = make_runtime(workflow).resume("crash1")
    assert report.status == "completed", report.summary()
    hay.add("run record", report.model_dump_json())
    assert_no_leaks(hay, found, otel, caplog, store_path, min_tokens=4)


# the command line ------------------------------------------------------------------------
@pytest.fixture
def cli_env(tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI would install its own providers; with the SDK "disabled" for it, its spans go
    # to the providers this test session installed, where the scan can see them.
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.setenv("SCOPEGRAPH_STORE", store_url)


def test_cli_commands_leak_nothing(cli_env: None, otel: Capture, hay: Haystack,
                                   caplog: pytest.LogCaptureFixture, store_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    def cli(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        hay.add(f"stdout of {' '.join(argv)}", out)
        hay.add(f"stderr of {' '.join(argv)}", err)
        return code, out

    code, out = cli("demo", "--json", "--as", "carol")
    assert code == 3
    record = json.loads(out)
    run_id, approval = record["run_id"], record["approvals"][0]["id"]
    assert cli("approvals", "list", "--json")[0] == 0
    assert cli("approvals", "list")[0] == 0
    assert cli("approvals", "show", approval, "--json")[0] == 0
    assert cli("approvals", "show", approval)[0] == 0
    assert cli("approve", approval, "--as", "carol")[0] == 2  # the initiator may not approve
    assert cli("approve", approval, "--as", "mallory")[0] == 2
    assert cli("approve", approval, "--as", "bob", "--reason", "checked")[0] == 0
    assert cli("approve", approval, "--as", "alice")[0] == 2  # no longer pending
    assert cli("resume", run_id, "--json")[0] == 0
    assert cli("resume", "no-such-run")[0] == 2
    assert cli("trace", run_id, "--json")[0] == 0
    assert cli("trace", run_id)[0] == 0
    assert cli("trace", "no-such-run")[0] == 2
    assert cli("report", "--json")[0] == 0
    assert cli("report")[0] == 0
    assert cli("audit", "verify")[0] == 0
    assert cli("audit", "verify", "--json")[0] == 0
    code, jwks = cli("bundle", "--jwks")
    assert code == 0 and json.loads(jwks)["keys"], "the bundle printed no public key"
    assert cli("deny", approval, "--as", "bob", "--reason", "late")[0] == 2
    assert cli("approvals", "show", "apr_nope")[0] == 2

    # No executor of ours held the demo's grants: any JWT shape at all is a leak, and so
    # is any form of the trust domains' keys.
    hay.add_spans(otel.spans())
    hay.add_metrics(otel)
    hay.add_store(store_path)
    hay.add_logs(caplog)
    assert otel.spans(), "the in-process CLI emitted no spans"
    keys = Secrets().load_store_keys(store_path)
    assert len(keys) >= 9, "expected the demo's trust domain key in the store"
    leaks = hay.leaks(keys)
    assert not leaks, "\n".join(leaks)


# a secret argument -----------------------------------------------------------------------
SECRET_PASSWORD = "pw-" + secrets.token_urlsafe(24)
SECRET_PIN = 700_000_000 + secrets.randbelow(99_999_999)


@tool(risk="write")
def login(user: str, password: str) -> dict[str, Any]:
    """Log a user in."""
    return {"user": user, "ok": True}


@tool
def unlock(pin: int) -> str:
    """Unlock with a numeric PIN."""
    return "unlocked"


@tool(roles={"pin": "secret"})
def parse_pin(pin: str) -> int:
    """Parse a PIN given as text."""
    return int(pin)  # a non-numeric PIN fails with Python's own message


class PasswordCaller(DirectExecutor):
    """Tries the password outside the plan's pattern first, then inside it."""

    def execute(self, ctx: StepContext) -> Any:
        ctx.tools.call("login", user="ann", password=SECRET_PASSWORD + "!")  # outside the pattern
        ctx.tools.call("login", user="ann", password={"value": SECRET_PASSWORD})  # wrong type
        ctx.tools.call("login", user="ann", password=SECRET_PASSWORD, extra=SECRET_PASSWORD)  # unknown arg
        ctx.tools.call("send_mail", to="x@example.org", body=SECRET_PASSWORD)  # another tool
        return ctx.tools.call("login", user="ann", password=SECRET_PASSWORD)


def _secret_hay(otel: Capture, rt: Runtime, run_id: str) -> Haystack:
    hay = Haystack()
    hay.add_spans(otel.spans())
    hay.add_metrics(otel)
    hay.add("ledger", Ledger(rt.store, clock=rt.clock).records(run_id))
    return hay


def _where(hay: Haystack, needle: str) -> list[str]:
    return [where for where, text in hay.texts if needle in text]


def test_a_password_argument_never_reaches_spans_metrics_or_the_ledger(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [{"id": "in", "tool": "login", "purpose": "log in",
                       "constraints": {"user": {"kind": "exact", "value": "ann"},
                                       "password": {"kind": "pattern", "regex": "pw-[A-Za-z0-9_-]{32}"}}}]}
    workflow = make_workflow(plan, tools=[*STANDARD_TOOLS, login], executor=PasswordCaller(),
                             approvers=["bob"], grant_max_uses=10)
    rt = make_runtime(workflow)
    paused = rt.run("log in", initiator="alice", run_id="pw1")
    assert paused.status == "paused", paused.summary()  # a write: it waits for a human
    calls = paused.steps[0].calls
    assert [c.decision for c in calls] == ["deny", "deny", "deny", "deny", "needs_approval"]
    rt.approvals.approve(paused.approvals[0]["id"], approver="bob")
    assert make_runtime(workflow).resume("pw1").status == "completed"
    hay = _secret_hay(otel, rt, "pw1")
    assert not _where(hay, SECRET_PASSWORD), _where(hay, SECRET_PASSWORD)


PIN_POLICY = """
@id("pins-are-small")
@reason("a PIN must be small")
forbid (principal, action == Scopegraph::Action::"call", resource == Scopegraph::Tool::"unlock")
when { context.arguments has pin && context.arguments.pin * 100000000000 > 0 };
"""


def test_a_denied_numeric_secret_stays_out_of_denial_reasons(
        otel: Capture, tmp_path: Path, make_workflow: Callable[..., Workflow],
        make_runtime: Callable[..., Runtime]) -> None:
    # The policy overflows on large PINs: Cedar reports an evaluation error naming the
    # operands, and the call is denied (fail closed). The PIN must not ride along in the
    # reason into the decide span and the ledger.
    policy = tmp_path / "pins.cedar"
    policy.write_text(PIN_POLICY)
    plan = {"steps": [{"id": "u", "tool": "unlock", "constraints": {"pin": {"kind": "any"}}}]}
    rt = make_runtime(make_workflow(
        plan, tools=[*STANDARD_TOOLS, unlock],
        executor=DirectExecutor(builders={"unlock": lambda ctx: {"pin": SECRET_PIN}}),
        policies=[Path(shipped.__file__).parent / "baseline.cedar", policy]))
    report = rt.run("unlock", run_id="pin1")
    assert report.status == "denied", report.summary()
    hay = _secret_hay(otel, rt, "pin1")
    assert not _where(hay, str(SECRET_PIN)), _where(hay, str(SECRET_PIN))


def test_a_failing_tool_does_not_carry_its_secret_argument_into_the_ledger(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    # ``int(pin)`` fails with "invalid literal for int() with base 10: '<pin>'". The
    # message is kept (issue 10) with the secret argument's value scrubbed out of it.
    plan = {"steps": [{"id": "p", "tool": "parse_pin", "constraints": {"pin": {"kind": "any"}}}]}
    rt = make_runtime(make_workflow(
        plan, tools=[*STANDARD_TOOLS, parse_pin],
        executor=DirectExecutor(builders={"parse_pin": lambda ctx: {"pin": SECRET_PASSWORD}})))
    report = rt.run("parse", run_id="parse1")
    assert report.status == "failed", report.summary()
    (call,) = [r for r in rt.ledger.records("parse1") if r["kind"] == "tool_call"]
    assert call["error_type"] == "ValueError" and call["status"] == "error"
    assert call["error"] == "tool 'parse_pin' failed: ValueError: invalid literal for int() with base 10: " \
                            "'[secret:pin]'"
    hay = _secret_hay(otel, rt, "parse1")
    assert not _where(hay, SECRET_PASSWORD), _where(hay, SECRET_PASSWORD)


def test_the_scan_finds_each_kind_of_material_it_looks_for(
        store_path: Path, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    # The scans above prove something only if they would have seen a leak.
    found = Secrets()
    rt = make_runtime(make_workflow(READ_PLAN, executor=Keeper(found, builders=BUILDERS)))
    assert rt.run("read", run_id="self1").status == "completed"
    needles = found.needles(store_path)
    grant = found.tokens[0]
    pem = (store_path.parent / "keys" / "grant.000001.key").read_bytes()  # the keystore's, not the store's
    domain_key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(domain_key, Ed25519PrivateKey)
    planted = [grant, grant.split(".")[2], found.tokens[1], *_key_forms(domain_key), bytes(pem).decode(),
               *_key_forms(found.keys[0]), "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2ln"]
    for i, material in enumerate(planted):
        hay = Haystack()
        hay.add(f"planted {i}", {"attribute": f"before {material} after"})
        assert hay.leaks(needles), f"planted material #{i} went unnoticed"
    clean = Haystack()
    clean.add("clean", {"grant_id": "0b63acbf30f54d228d963abd0576abcd", "spiffe": "spiffe://scopegraph.local/x"})
    assert clean.leaks(needles) == []
