"""The command line around the inbox: ``approvers list`` shows passkeys (how many, when
made, when last used) beside Ed25519 keys; ``serve`` says what it serves as it starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scopegraph.serve import banner, site_for
from scopegraph.timestamps import iso

from .conftest import Served, cli, enrol, free_port

pytestmark = pytest.mark.parametrize("at", ["sqlite"], indirect=True)


def listed(served: Served, *extra: str) -> list[dict[str, Any]]:
    code, out = cli("--store", served.at.url, "approvers", "list", "--json", *extra)
    assert code == 0, out
    return list(json.loads(out))


def test_approvers_list_shows_passkeys_their_creation_and_last_use(
        served: Served, approver_page: Callable[[], Any]) -> None:
    pem = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert cli("--store", served.at.url, "approvers", "add", "alice", "--key", pem)[0] == 0
    enrolled_at = served.clock.now()
    bob = approver_page()
    enrol(bob, served.invite("bob"))

    rows = {r["name"]: r for r in listed(served)}
    assert rows["alice"]["kid"] and rows["alice"]["passkey_count"] == 0 and rows["alice"]["passkeys"] == []
    assert rows["bob"]["kid"] is None and rows["bob"]["passkey_count"] == 1 and rows["bob"]["vouched_for"]
    [key] = rows["bob"]["passkeys"]
    assert key["kid"].startswith("passkey:") and key["enrolled_at"] == enrolled_at
    assert key["last_used_at"] is None and key["vouched_for"] and key["removed_at"] is None

    served.clock.advance(120)  # a sign-in later: the passkey's last use
    bob.locator("header .who button").click()
    bob.wait_for_url("**/login")
    bob.locator("#login").click()
    bob.wait_for_url("**/")
    [key] = {r["name"]: r for r in listed(served)}["bob"]["passkeys"]
    assert key["last_used_at"] == served.clock.now()

    code, out = cli("--store", served.at.url, "approvers", "list")
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("alice") and "enrolled  0 passkeys" in line for line in lines), out
    assert any(line.startswith("bob") and "(no Ed25519 key)  enrolled  1 passkey" in line for line in lines), out
    assert f"  passkey {key['kid']}  created {iso(enrolled_at)}  last used {iso(served.clock.now())}" in lines

    assert cli("--store", served.at.url, "approvers", "remove", "bob")[0] == 0
    assert [r["name"] for r in listed(served)] == ["alice"]
    [gone] = [r for r in listed(served, "--all") if r["name"] == "bob"]
    assert gone["removed_at"] is not None and gone["passkey_count"] == 0
    assert gone["passkeys"][0]["removed_at"] is not None


def test_serve_says_where_the_inbox_is_and_names_token_endpoints_only_when_configured(served: Served) -> None:
    port = free_port()
    env = {**os.environ, "OTEL_SDK_DISABLED": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "scopegraph.cli", "serve", "--store", served.at.url,
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "scopegraph serve did not answer"
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    said = [line for line in err.splitlines() if line.startswith("scopegraph:")]
    assert said == [f"scopegraph: serving the approval inbox at http://localhost:{port}/ "
                    f"(listening on http://127.0.0.1:{port}; Ctrl-C stops)"]

    site = site_for(host="127.0.0.1", port=8700, public_url=None, tls=False)
    lines = banner(site, host="127.0.0.1", port=8700, tls=False,
                   audiences=["https://billing.example=lookup,fetch"], clients=["billing=https://billing.example"])
    assert lines[1] == ("scopegraph: serving token exchange and introspection on http://127.0.0.1:8700: "
                        "POST /oauth/token for audience https://billing.example, "
                        "POST /oauth/introspect for client billing")
    lines = banner(site, host="127.0.0.1", port=8700, tls=False, audiences=[], clients=["a=x", "b=y"])
    assert "for no audience" in lines[1] and "for clients a, b" in lines[1]
    assert lines[2] == "scopegraph: warning: no --audience registered: every token exchange is refused"
