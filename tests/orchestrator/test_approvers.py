"""Approver identity: keys in PEM and OpenSSH form, one principal per spelling, signed answers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from scopegraph.approvers import (
    Approver,
    ApproverEnrolment,
    Principal,
    answer_message,
    load_private_key,
    normalize_name,
    openssh_fingerprint,
    os_principal,
    parse_public_key,
    same_principal,
    sign_answer,
    verify_answer,
)
from scopegraph.canonical import action_digest
from scopegraph.errors import ApprovalError, ConfigError

DIGEST = action_digest(run_id="r1", step_id="pay", tool="send_payment", arguments={"amount": 10},
                       policy_version="v1")
OTHER_DIGEST = action_digest(run_id="r1", step_id="pay", tool="send_payment", arguments={"amount": 10_000},
                             policy_version="v1")


def _write_key(path: Path, key: Ed25519PrivateKey, fmt: serialization.PrivateFormat,
               passphrase: bytes | None = None) -> Path:
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, encryption))
    os.chmod(path, 0o600)
    return path


def _enrol(name: str, key: Ed25519PrivateKey) -> Approver:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return ApproverEnrolment(name=name, key=line.decode() + f" {name}@laptop").approver()


# names -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["alice", "Alice", "ALICE", "ａｌｉｃｅ", "Ａｌｉｃｅ", "aLiCe"])
def test_spellings_of_one_name_are_one_principal(spelling: str) -> None:
    assert normalize_name(spelling) == "alice"
    assert same_principal(spelling, "alice") and same_principal("ALICE", spelling)


def test_compatibility_forms_and_case_folding_meet() -> None:
    assert same_principal("ﬁona", "FIONA")  # the 'fi' ligature
    assert same_principal("straße", "STRASSE")  # full case folding, not lower()
    assert same_principal("e\u0301mile", "\u00c9MILE")  # decomposed and composed
    assert not same_principal("alice", "alicia")


@pytest.mark.parametrize("bad", ["alice ", " alice", "al ice", "alice\t", "alice\n", "alice\u3000",
                                 "ali\u200bce", "alice\u00a0", "ali\x00ce", "alice\u2028", "\u202ealice",
                                 "", "\u00ad"])
def test_names_with_whitespace_control_or_format_characters_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="approver name"):
        normalize_name(bad)
    with pytest.raises(ConfigError):
        same_principal(bad, "alice")  # never "a different person" by being malformed


def test_a_principal_compares_by_its_normalised_name() -> None:
    initiator = Principal.of("Alice", authenticated_by="application")
    assert initiator.name == "alice" and initiator.display == "Alice"
    assert initiator.is_("ａｌｉｃｅ") and initiator.is_(Principal.of("ALICE", authenticated_by="os-user"))
    assert not initiator.is_("bob")
    me = os_principal()
    assert me.authenticated_by == "os-user" and me.name == normalize_name(me.display)


# keys --------------------------------------------------------------------------------------
def test_public_keys_are_read_from_pem_and_openssh_lines() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    ssh = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    assert parse_public_key(pem) == key
    assert parse_public_key(f"  {ssh} alice@laptop \n") == key
    assert parse_public_key(ssh) == key


def test_non_ed25519_and_garbage_keys_are_refused() -> None:
    ecdsa = ec.generate_private_key(ec.SECP256R1()).public_key()
    for text in (ecdsa.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode(),
                 ecdsa.public_bytes(serialization.Encoding.PEM,
                                    serialization.PublicFormat.SubjectPublicKeyInfo).decode()):
        with pytest.raises(ConfigError, match="must be Ed25519"):
            parse_public_key(text)
    for garbage in ("", "AAAAC3NzaC1lZDI1NTE5AAAAI", "ssh-ed25519 not-base64!", "-----BEGIN PUBLIC KEY-----\nxx"):
        with pytest.raises(ConfigError):
            parse_public_key(garbage)
    with pytest.raises(ValidationError, match="must be Ed25519"):
        ApproverEnrolment(name="bob", key=ecdsa.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode())
    with pytest.raises(ValidationError, match="contains U\\+0020"):
        ApproverEnrolment(name="bob ", key="ssh-ed25519 x")


def test_keys_made_by_ssh_keygen_sign_answers_that_verify(tmp_path: Path) -> None:
    """Standard tooling: a key pair from ssh-keygen, enrolled from its .pub line."""
    key_file = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f", str(key_file)],
                   check=True, timeout=60)
    approver = ApproverEnrolment(name="Alice", key=(tmp_path / "id_ed25519.pub").read_text()).approver()
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "id_ed25519.pub")], check=True,
                                 capture_output=True, text=True, timeout=60).stdout.split()[1]
    assert approver.fingerprint == fingerprint
    signature = sign_answer(load_private_key(key_file), approval_id="ap-1", digest=DIGEST, decision="approve",
                            approver="alice", reason="ok")
    verify_answer(approver, signature, approval_id="ap-1", digest=DIGEST, decision="approve", approver="ALICE",
                  reason="ok")


@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.OpenSSH])
def test_private_keys_are_read_from_pem_and_openssh_files(tmp_path: Path, fmt: serialization.PrivateFormat) -> None:
    key = Ed25519PrivateKey.generate()
    path = _write_key(tmp_path / "key", key, fmt)
    assert load_private_key(path).public_key() == key.public_key()
    encrypted = _write_key(tmp_path / "enc", key, fmt, passphrase=b"pass phrase")
    assert load_private_key(encrypted, passphrase=b"pass phrase").public_key() == key.public_key()
    with pytest.raises(ConfigError, match="is encrypted"):
        load_private_key(encrypted)
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_private_key(encrypted, passphrase=b"wrong")


def test_a_private_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = _write_key(tmp_path / "key", Ed25519PrivateKey.generate(), serialization.PrivateFormat.PKCS8)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match=rf"approver key {path} has mode 0644"):
        load_private_key(path)
    with pytest.raises(ConfigError, match="cannot read approver key"):
        load_private_key(tmp_path / "missing")


# signed answers ----------------------------------------------------------------------------
@pytest.fixture
def alice_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def alice(alice_key: Ed25519PrivateKey) -> Approver:
    return _enrol("Alice", alice_key)


def test_an_answer_signed_by_the_enrolled_key_verifies(alice: Approver, alice_key: Ed25519PrivateKey) -> None:
    signature = sign_answer(alice_key, approval_id="ap-1", digest=DIGEST, decision="approve", approver="alice")
    verify_answer(alice, signature, approval_id="ap-1", digest=DIGEST, decision="approve", approver="ａｌｉｃｅ")
    assert alice.name == "alice" and alice.display == "Alice"


def test_a_signature_by_another_key_is_refused(alice: Approver) -> None:
    mallory_key = Ed25519PrivateKey.generate()
    signature = sign_answer(mallory_key, approval_id="ap-1", digest=DIGEST, decision="approve", approver="alice")
    with pytest.raises(ApprovalError, match="does not verify with the enrolled key SHA256:"):
        verify_answer(alice, signature, approval_id="ap-1", digest=DIGEST, decision="approve", approver="alice")


@pytest.mark.parametrize("changed", [
    {"digest": OTHER_DIGEST}, {"approval_id": "ap-2"}, {"decision": "deny"}, {"reason": "edited reason"},
])
def test_a_signature_over_another_answer_is_refused(alice: Approver, alice_key: Ed25519PrivateKey,
                                                     changed: dict[str, str]) -> None:
    signed = {"approval_id": "ap-1", "digest": DIGEST, "decision": "approve", "reason": "looks right"}
    signature = sign_answer(alice_key, approver="alice", **signed)  # type: ignore[arg-type]
    with pytest.raises(ApprovalError, match="does not verify"):
        verify_answer(alice, signature, approver="alice", **(signed | changed))  # type: ignore[arg-type]


def test_an_enrolled_approver_cannot_answer_as_another(alice: Approver, alice_key: Ed25519PrivateKey) -> None:
    bob_key = Ed25519PrivateKey.generate()
    bob = _enrol("bob", bob_key)
    # Bob signs with his own key but claims to be Alice: checked against Alice's key, it fails ...
    as_alice = sign_answer(bob_key, approval_id="ap-1", digest=DIGEST, decision="approve", approver="alice")
    with pytest.raises(ApprovalError, match="does not verify"):
        verify_answer(alice, as_alice, approval_id="ap-1", digest=DIGEST, decision="approve", approver="alice")
    # ... and checked against his own key, the name in the answer is not his.
    with pytest.raises(ApprovalError, match="names approver 'alice' but is checked against 'bob'"):
        verify_answer(bob, as_alice, approval_id="ap-1", digest=DIGEST, decision="approve", approver="alice")
    # Alice's genuine signature cannot be re-labelled as Bob's answer either.
    genuine = sign_answer(alice_key, approval_id="ap-1", digest=DIGEST, decision="approve", approver="alice")
    with pytest.raises(ApprovalError, match="does not verify"):
        verify_answer(bob, genuine, approval_id="ap-1", digest=DIGEST, decision="approve", approver="bob")


@pytest.mark.parametrize("signature", ["", "!!!", "AAAA", "a" * 86])
def test_missing_or_malformed_signatures_are_refused(alice: Approver, signature: str) -> None:
    with pytest.raises(ApprovalError, match="not signed|malformed|does not verify"):
        verify_answer(alice, signature, approval_id="ap-1", digest=DIGEST, decision="approve", approver="alice")


def test_the_signed_message_is_canonical_and_typed() -> None:
    message = answer_message(approval_id="ap-1", digest=DIGEST, decision="deny", approver="ＢＯＢ", reason="no")
    assert message == (b'{"approval_id":"ap-1","approver":"bob","decision":"deny","digest":"' + DIGEST.encode()
                       + b'","reason":"no","type":"scopegraph.approval-answer.v1"}')
    with pytest.raises(ConfigError, match="not 64 lowercase hex"):
        answer_message(approval_id="ap-1", digest=DIGEST.upper(), decision="deny", approver="bob")
    with pytest.raises(ConfigError, match="unknown decision"):
        answer_message(approval_id="ap-1", digest=DIGEST, decision="maybe", approver="bob")  # type: ignore[arg-type]


def test_fingerprint_matches_openssh_form(alice: Approver) -> None:
    assert alice.fingerprint == openssh_fingerprint(alice.public_key) and alice.fingerprint.startswith("SHA256:")
    assert "PRIVATE" not in repr(alice) and "public_key" not in repr(alice)
