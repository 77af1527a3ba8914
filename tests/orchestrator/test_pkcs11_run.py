"""A whole run with its keys in a PKCS#11 token (SoftHSM2), chosen by configuration alone.

``SCOPEGRAPH_KEYSTORE=pkcs11:token=LABEL;module-path=…`` and ``SCOPEGRAPH_PKCS11_PIN``:
the run's grants, SVIDs and ledger heads are signed by the token, with keys generated in
it and marked non-extractable; the store and the keystore directory hold no private key;
py-spiffe accepts the SVIDs; ``audit verify`` checks the heads against the token's keys.
On SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pkcs11
import pytest
import spiffe
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, ObjectClass

from scopegraph import Runtime, Workflow
from scopegraph.cli import main
from scopegraph.clock import SystemClock
from scopegraph.keys.pkcs11_keystore import MODULE_ENV, PIN_ENV
from tests.contract.conftest import postgres_schema, postgres_store_url, postgres_url  # noqa: F401
from tests.softhsm import SO_PIN, USER_PIN, SoftHsm, softhsm

from .trust_helpers import Where, where

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:spiffe")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    with softhsm(tmp_path_factory.mktemp("softhsm")) as made:
        yield made


@pytest.fixture(params=["sqlite", "postgresql"])
def at(request: pytest.FixtureRequest, tmp_path: Path, hsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> Where:
    found = where(request, tmp_path)
    label = hsm.new_token()
    monkeypatch.setenv("SCOPEGRAPH_KEYSTORE", f"pkcs11:token={label};module-path={hsm.module}")
    monkeypatch.setenv(PIN_ENV, USER_PIN)
    monkeypatch.delenv(MODULE_ENV, raising=False)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    return Where(found.backend, found.url, Path(label), found.witness)  # ``keys``: the token's label


def _token_objects(hsm: SoftHsm, label: str) -> list[dict[str, object]]:
    token = pkcs11.lib(hsm.module).get_token(token_label=label)
    with token.open(user_pin=USER_PIN) as session:
        out = []
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
            out.append({"label": obj.label, "extractable": obj[Attribute.EXTRACTABLE],
                        "sensitive": obj[Attribute.SENSITIVE], "local": obj[Attribute.LOCAL],
                        "never_extractable": obj[Attribute.NEVER_EXTRACTABLE]})
        return out


def test_a_run_is_signed_in_the_token_with_keys_that_never_leave_it(
        at: Where, hsm: SoftHsm, make_workflow: Callable[..., Workflow], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    label = str(at.keys)
    seen: dict[str, str] = {}
    with Runtime(make_workflow(), store=at.url, clock=SystemClock()) as rt:
        assert rt.trust.keystore.location == f"pkcs11:token={label}"
        assert rt.run("read", initiator="alice", run_id="hsm1").status == "completed"
        svid = rt.domain.issue_svid(rt.domain.id("agent"))
        token = svid.danger_jwt()
        bundle = spiffe.JwtBundle.parse(spiffe.TrustDomain(rt.domain.name),
                                        json.dumps(rt.domain.jwt_svid_bundle()).encode())
        assert str(spiffe.JwtSvid.parse_and_validate(token, bundle, {"scopegraph"}).spiffe_id).endswith("/agent")
        x509_bundle = spiffe.X509Bundle.parse(
            spiffe.TrustDomain(rt.domain.name), rt.domain.ca_certificate.public_bytes(serialization.Encoding.PEM))
        [authority] = x509_bundle.x509_authorities
        svid.x509_certificate.verify_directly_issued_by(authority)
        head = rt.store.ledger_head()
        assert head is not None
        for purpose in ("grant", "svid", "ledger"):
            seen[purpose] = rt.trust.signer(purpose).kid
        grants = rt.ledger.records("hsm1")
    # Grants, SVIDs and the head name the token's keys.
    minted = [r for r in grants if r["kind"] == "grant_minted"]
    assert minted
    assert jwt.get_unverified_header(token)["kid"] == seen["svid"]
    assert head.kid == seen["ledger"]
    # The token made the keys, keeps them sensitive and never lets them out.
    objects = _token_objects(hsm, label)
    assert sorted(o["label"] for o in objects) == ["scopegraph/grant/1", "scopegraph/ledger/1", "scopegraph/svid/1"]
    assert all(o["extractable"] is False and o["sensitive"] and o["local"] and o["never_extractable"]
               for o in objects)
    # The store records the three public keys, and no private key is anywhere on disk.
    recorded = {r[0]: r[1] for r in at.sql("SELECT purpose, kid FROM sg_trust_keys")}
    assert recorded == seen
    assert not list(tmp_path.rglob("*.key"))
    assert main(["--store", at.url, "audit", "verify", "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ok"] and verdict["witness_entries"] >= 1
    # A grant minted by the run verifies in another process with the token's public key only.
    assert main(["--store", at.url, "bundle", "--jwks"]) == 0
    jwks = json.loads(capsys.readouterr().out)
    assert [k["kid"] for k in jwks["keys"]] == [seen["grant"]]


def test_processes_binding_a_fresh_token_at_once_make_one_key_per_purpose(
        at: Where, hsm: SoftHsm) -> None:
    child = ("import sys; from scopegraph.store import open_store; from scopegraph.trust import TrustRoots; "
             "s = open_store(sys.argv[1]); t = TrustRoots.open(s); print(t.signer('grant').kid); t.close(); s.close()")
    procs = [subprocess.Popen([sys.executable, "-W", "error", "-c", child, at.url], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1, outs
    labels = sorted(str(o["label"]) for o in _token_objects(hsm, str(at.keys)))
    assert labels == ["scopegraph/grant/1", "scopegraph/ledger/1", "scopegraph/svid/1"]


def test_a_pin_in_the_uri_or_a_wrong_pin_is_refused_in_one_line(
        at: Where, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(PIN_ENV, SO_PIN)  # the SO PIN is not the user's
    assert main(["--store", at.url, "keys", "rotate"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "PIN" in err and SO_PIN not in err
