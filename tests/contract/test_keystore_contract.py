"""What every keystore must do, run on the file keystore and on a PKCS#11 token (SoftHSM2).

Then what each one must refuse: files others can read, symlinks, planted or unencrypted
keys, a missing or wrong passphrase; extractable, imported or unreadable-PIN token keys.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from scopegraph.errors import KeystoreError
from scopegraph.keys import (
    PURPOSES,
    FileKeystore,
    Keystore,
    VerificationKey,
    find_key,
    jwk_thumbprint,
    open_keystore,
    sign_certificate,
    sign_jwt,
)
from scopegraph.keys.pkcs11_keystore import Pkcs11Keystore
from tests.softhsm import USER_PIN, SoftHsm, softhsm

KeystoreFactory = Callable[[], Keystore]


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    with softhsm(tmp_path_factory.mktemp("softhsm")) as made:
        yield made


@pytest.fixture
def token(hsm: SoftHsm) -> str:
    return hsm.new_token()


@pytest.fixture(params=["file", "pkcs11"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeystoreFactory]:
    """Opens the keystore under test; every call opens it afresh (as another process would)."""
    opened: list[Keystore] = []
    if request.param == "file":
        def factory() -> Keystore:
            opened.append(FileKeystore(tmp_path / "keys"))
            return opened[-1]
    else:
        hsm: SoftHsm = request.getfixturevalue("hsm")
        label = hsm.new_token()

        def factory() -> Keystore:
            opened.append(Pkcs11Keystore(module=hsm.module, token_label=label, pin=USER_PIN))
            return opened[-1]
    yield factory
    for keystore in opened:
        keystore.close()


def _independent_verify(pem: str, data: bytes, signature: bytes) -> None:
    """Verify with cryptography directly, from the PEM alone (raises InvalidSignature)."""
    key = serialization.load_pem_public_key(pem.encode())
    if isinstance(key, Ed25519PublicKey):
        key.verify(signature, data)
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey) and len(signature) == 64
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))


def _thumbprint_by_hand(jwk: dict[str, str]) -> str:
    required = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    text = "{" + ",".join(f'"{m}":"{jwk[m]}"' for m in required) + "}"
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()


# the contract ----------------------------------------------------------------------------
@pytest.mark.parametrize("purpose", PURPOSES)
def test_a_signature_verifies_with_the_public_key_only(open_store: KeystoreFactory, purpose: str) -> None:
    signer = open_store().signer(purpose)
    data = f"scopegraph {purpose} ✓".encode()
    signature = signer.sign(data)
    _independent_verify(signer.public_pem(), data, signature)
    assert signer.verification_key.verifies(data, signature)
    assert not signer.verification_key.verifies(data + b"!", signature)
    assert signer.algorithm == ("ES256" if purpose == "svid" else "EdDSA")
    assert signer.public_jwk()["alg"] == signer.algorithm and signer.public_jwk()["kid"] == signer.kid


def test_kid_is_the_jwk_thumbprint_and_stable_across_opens(open_store: KeystoreFactory) -> None:
    first = {p: open_store().signer(p).kid for p in PURPOSES}
    again = open_store()
    for purpose in PURPOSES:
        signer = again.signer(purpose)
        assert signer.kid == first[purpose] == _thumbprint_by_hand(signer.public_jwk())
        assert [k.kid for k in again.verification_keys(purpose)] == [signer.kid]


def test_rotation_keeps_previous_public_keys_for_verification(open_store: KeystoreFactory) -> None:
    keystore = open_store()
    old = keystore.signer("grant")
    signed_before = old.sign(b"grant signed before the rotation")
    new_key = keystore.rotate("grant")
    assert new_key.kid != old.kid and new_key.generation == old.verification_key.generation + 1
    assert keystore.signer("grant").kid == new_key.kid
    reopened = open_store()
    keys = reopened.verification_keys("grant")
    assert [k.kid for k in keys] == [new_key.kid, old.kid]  # newest first
    assert reopened.signer("grant").kid == new_key.kid
    found = find_key(keys, old.kid)
    assert found is not None and found.verifies(b"grant signed before the rotation", signed_before)
    assert not keys[0].verifies(b"grant signed before the rotation", signed_before)


def test_purposes_have_separate_keys(open_store: KeystoreFactory) -> None:
    keystore = open_store()
    kids = {p: keystore.signer(p).kid for p in PURPOSES}
    assert len(set(kids.values())) == 3
    keystore.rotate("svid")
    assert keystore.signer("grant").kid == kids["grant"] and keystore.signer("ledger").kid == kids["ledger"]
    assert keystore.signer("svid").kid != kids["svid"]
    assert [k.kid for k in keystore.verification_keys("ledger")] == [kids["ledger"]]
    ledger_sig = keystore.signer("ledger").sign(b"head")
    assert not keystore.signer("grant").verification_key.verifies(b"head", ledger_sig)


@pytest.mark.parametrize("call", ["signer", "rotate", "verification_keys"])
def test_unknown_purposes_are_refused(open_store: KeystoreFactory, call: str) -> None:
    keystore = open_store()
    for bad in ("admin", "", "GRANT", "grant "):
        with pytest.raises(KeystoreError, match=r"unknown key purpose .*expected one of grant, svid, ledger"):
            getattr(keystore, call)(bad)


def test_jwts_and_certificates_signed_by_the_keystore_verify_with_standard_tools(
        open_store: KeystoreFactory) -> None:
    keystore = open_store()
    for purpose in ("grant", "svid"):
        signer = keystore.signer(purpose)
        token = sign_jwt(signer, {"sub": "spiffe://example.org/agent", "aud": "tool:x"})
        assert jwt.get_unverified_header(token)["kid"] == signer.kid
        key = jwt.PyJWK.from_dict(signer.public_jwk()).key
        claims = jwt.decode(token, key, algorithms=[signer.algorithm], audience="tool:x")
        assert claims["sub"] == "spiffe://example.org/agent"
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"), key,
                       algorithms=[signer.algorithm], audience="tool:x")
    signer = keystore.signer("svid")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example.org")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(signer.public_key)
               .serial_number(7).not_valid_before(_dt(2020)).not_valid_after(_dt(2040))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True))
    ca = sign_certificate(builder, signer)
    ca.verify_directly_issued_by(ca)
    assert ca.public_key() == signer.public_key


def _dt(year: int) -> dt.datetime:
    return dt.datetime(year, 1, 1, tzinfo=dt.timezone.utc)


def test_a_signer_shows_no_private_material(open_store: KeystoreFactory) -> None:
    signer = open_store().signer("grant")
    text = repr(signer) + str(signer)
    assert "redacted" in text and "PRIVATE" not in text and signer.kid in text
    assert not any(name.startswith("danger") or "private_bytes" in name for name in dir(signer))


# the file keystore -----------------------------------------------------------------------
def test_file_keystore_makes_an_owner_only_directory_and_files(tmp_path: Path) -> None:
    keystore = FileKeystore(tmp_path / ".scopegraph" / "keys")
    keystore.signer("grant")
    assert (os.stat(keystore.directory).st_mode & 0o777) == 0o700
    names = sorted(os.listdir(keystore.directory))
    assert names == ["grant.000001.key", "grant.000001.pub"]
    for name in names:
        assert (os.stat(keystore.directory / name).st_mode & 0o777) == 0o600


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o755, 0o777])
def test_file_keystore_refuses_a_directory_others_can_read(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "keys"
    FileKeystore(directory).signer("ledger")
    os.chmod(directory, mode)
    with pytest.raises(KeystoreError) as info:
        FileKeystore(directory)
    assert str(directory) in str(info.value) and f"{mode:04o}" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_file_keystore_refuses_a_key_file_others_can_read(tmp_path: Path, mode: int) -> None:
    keystore = FileKeystore(tmp_path / "keys")
    keystore.signer("grant")
    key_file = keystore.directory / "grant.000001.key"
    os.chmod(key_file, mode)
    with pytest.raises(KeystoreError, match=rf"{key_file} has mode {mode:04o}"):
        FileKeystore(tmp_path / "keys")
    with pytest.raises(KeystoreError, match="group and others must have no access"):
        keystore.signer("grant")  # already open: the file is checked again when it is read


def test_file_keystore_refuses_a_symlinked_key_file(tmp_path: Path) -> None:
    keystore = FileKeystore(tmp_path / "keys")
    keystore.signer("grant")
    elsewhere = tmp_path / "planted.key"
    os.rename(keystore.directory / "grant.000001.key", elsewhere)
    os.symlink(elsewhere, keystore.directory / "grant.000001.key")
    with pytest.raises(KeystoreError, match="is not a regular file"):
        FileKeystore(tmp_path / "keys")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_file_keystore_refuses_keys_someone_else_made(tmp_path: Path) -> None:
    keystore = FileKeystore(tmp_path / "keys")
    keystore.signer("grant")
    os.chown(keystore.directory / "grant.000001.key", 4242, -1)
    with pytest.raises(KeystoreError, match="belongs to uid 4242, not to this user"):
        FileKeystore(tmp_path / "keys")
    os.chown(keystore.directory / "grant.000001.key", os.geteuid(), -1)
    os.chown(keystore.directory, 4242, -1)
    with pytest.raises(KeystoreError, match=r"keystore directory .* belongs to uid 4242"):
        FileKeystore(tmp_path / "keys")


def test_file_keystore_refuses_a_planted_key_that_does_not_match_its_public_key(tmp_path: Path) -> None:
    keystore = FileKeystore(tmp_path / "keys")
    original = keystore.signer("grant").kid
    key_file = keystore.directory / "grant.000001.key"
    planted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_file.write_bytes(planted)
    with pytest.raises(KeystoreError, match="does not match its public key"):
        FileKeystore(tmp_path / "keys").signer("grant")
    assert [k.kid for k in FileKeystore(tmp_path / "keys").verification_keys("grant")] == [original]


def test_file_keystore_lists_a_settled_directory_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scopegraph.keys import file_keystore

    keystore = FileKeystore(tmp_path / "keys")
    kid = keystore.signer("grant").kid
    monkeypatch.setattr(file_keystore, "_SETTLED_NS", 0)  # as if the directory last changed long ago
    listed: list[object] = []
    real_listdir = os.listdir
    monkeypatch.setattr(file_keystore.os, "listdir", lambda path: listed.append(path) or real_listdir(path))
    assert [keystore.signer("grant").kid for _ in range(5)] == [kid] * 5
    assert len(listed) <= 1  # a signer per grant: not a directory listing per grant


def test_file_keystore_sees_a_rotation_by_another_process_while_it_keeps_a_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scopegraph.keys import file_keystore

    monkeypatch.setattr(file_keystore, "_SETTLED_NS", 0)  # every listing kept, however fresh
    keystore = FileKeystore(tmp_path / "keys")
    old = keystore.signer("grant").kid
    keystore.signer("grant")
    other = FileKeystore(tmp_path / "keys")  # another process
    new = other.rotate("grant").kid
    assert keystore.signer("grant").kid == new != old
    other.rotate("grant")
    os.chmod(keystore.directory / "grant.000003.key", 0o644)
    with pytest.raises(KeystoreError, match="group and others must have no access"):
        keystore.signer("grant")  # the rotated-to key file is checked like any other


def test_file_keystore_deletes_retired_private_keys(tmp_path: Path) -> None:
    keystore = FileKeystore(tmp_path / "keys")
    keystore.signer("ledger")
    keystore.rotate("ledger")
    keystore.rotate("ledger")
    assert sorted(os.listdir(keystore.directory)) == [
        "ledger.000001.pub", "ledger.000002.pub", "ledger.000003.key", "ledger.000003.pub"]


def test_passphrase_encrypts_the_keys_and_is_then_required(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    env = {"SCOPEGRAPH_KEYSTORE": str(directory), "SCOPEGRAPH_KEYSTORE_PASSPHRASE": "correct horse"}
    keystore = open_keystore(tmp_path / "unused", env)
    assert isinstance(keystore, FileKeystore) and keystore.directory == directory
    kid = keystore.signer("grant").kid
    pem = (directory / "grant.000001.key").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(pem, password=None)
    with pytest.raises(KeystoreError, match="is encrypted: set SCOPEGRAPH_KEYSTORE_PASSPHRASE"):
        FileKeystore(directory).signer("grant")
    with pytest.raises(KeystoreError, match="cannot be decrypted: wrong passphrase"):
        FileKeystore(directory, passphrase=b"wrong horse").signer("grant")
    assert open_keystore(tmp_path / "unused", env).signer("grant").kid == kid
    with pytest.raises(KeystoreError, match="is empty"):
        open_keystore(tmp_path / "unused", {**env, "SCOPEGRAPH_KEYSTORE_PASSPHRASE": ""})


def test_a_passphrase_refuses_an_unencrypted_key(tmp_path: Path) -> None:
    FileKeystore(tmp_path / "keys").signer("ledger")
    with pytest.raises(KeystoreError, match="not encrypted although a passphrase is set"):
        FileKeystore(tmp_path / "keys", passphrase=b"secret").signer("ledger")


def test_keystore_errors_never_carry_the_passphrase(tmp_path: Path) -> None:
    FileKeystore(tmp_path / "keys", passphrase=b"hunter2-passphrase").signer("grant")
    with pytest.raises(KeystoreError) as info:
        FileKeystore(tmp_path / "keys", passphrase=b"hunter3-passphrase").signer("grant")
    assert "hunter" not in str(info.value)
    assert "hunter" not in repr(FileKeystore(tmp_path / "keys", passphrase=b"hunter2-passphrase"))


def test_the_default_location_is_used_without_the_environment(tmp_path: Path) -> None:
    keystore = open_keystore(tmp_path / ".scopegraph" / "keys", {})
    assert isinstance(keystore, FileKeystore) and keystore.directory == tmp_path / ".scopegraph" / "keys"


# the PKCS#11 keystore --------------------------------------------------------------------
def test_pkcs11_private_keys_cannot_be_read_out_of_the_token(hsm: SoftHsm, token: str) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass
    from pkcs11 import exceptions as p11

    keystore = Pkcs11Keystore(module=hsm.module, token_label=token, pin=USER_PIN)
    try:
        signers = [keystore.signer(p) for p in PURPOSES]
        assert all(s.verification_key.verifies(b"x", s.sign(b"x")) for s in signers)
        # Another session of this process shares the keystore's login, so it sees the private objects.
        with pkcs11.lib(hsm.module).get_token(token_label=token).open() as session:
            privates = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
            assert sorted(p.label for p in privates) == ["scopegraph/grant/1", "scopegraph/ledger/1",
                                                         "scopegraph/svid/1"]
            for private in privates:
                assert private[Attribute.SENSITIVE] and not private[Attribute.EXTRACTABLE]
                assert private[Attribute.NEVER_EXTRACTABLE] and private[Attribute.LOCAL]
                with pytest.raises(p11.AttributeSensitive):
                    private[Attribute.VALUE]  # noqa: B018 - the read itself is the test
                with pytest.raises(p11.PKCS11Error):
                    private.copy({Attribute.EXTRACTABLE: True})
    finally:
        keystore.close()


def test_pkcs11_refuses_an_imported_key_planted_under_its_label(hsm: SoftHsm, token: str) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    keystore = Pkcs11Keystore(module=hsm.module, token_label=token, pin=USER_PIN)
    try:
        keystore.signer("ledger")
        keystore.rotate("ledger")  # generation 2 is current; plant generation 3 by import
        planted = Ed25519PrivateKey.generate()
        raw = planted.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        public_raw = planted.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        with pkcs11.lib(hsm.module).get_token(token_label=token).open(rw=True) as session:
            common = {Attribute.KEY_TYPE: KeyType.EC_EDWARDS, Attribute.TOKEN: True,
                      Attribute.LABEL: "scopegraph/ledger/3", Attribute.EC_PARAMS: bytes.fromhex("06032b6570")}
            session.create_object({**common, Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.VALUE: raw,
                                   Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                                   Attribute.EXTRACTABLE: False, Attribute.SIGN: True})
            session.create_object({**common, Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                                   Attribute.EC_POINT: b"\x04\x20" + public_raw, Attribute.VERIFY: True})
        with pytest.raises(KeystoreError, match="'scopegraph/ledger/3' was not generated in the token"):
            keystore.signer("ledger")
    finally:
        keystore.close()


def test_pkcs11_refuses_an_extractable_key_generated_under_its_label(hsm: SoftHsm, token: str) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism

    keystore = Pkcs11Keystore(module=hsm.module, token_label=token, pin=USER_PIN)
    try:
        keystore.signer("grant")
        with pkcs11.lib(hsm.module).get_token(token_label=token).open(rw=True) as session:
            session.generate_keypair(
                KeyType.EC_EDWARDS, mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, label="scopegraph/grant/2",
                store=True, public_template={Attribute.EC_PARAMS: bytes.fromhex("06032b6570")},
                private_template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
        with pytest.raises(KeystoreError, match="'scopegraph/grant/2' is or was extractable: refusing it"):
            keystore.signer("grant")
    finally:
        keystore.close()


def test_pkcs11_refuses_a_wrong_pin_a_missing_token_and_a_pin_in_the_uri(hsm: SoftHsm, token: str) -> None:
    with pytest.raises(KeystoreError, match=rf"the PIN for PKCS#11 token '{token}' was refused"):
        Pkcs11Keystore(module=hsm.module, token_label=token, pin="0000-wrong")
    with pytest.raises(KeystoreError, match="no PKCS#11 token labelled 'nope'"):
        Pkcs11Keystore(module=hsm.module, token_label="nope", pin=USER_PIN)
    with pytest.raises(KeystoreError, match="must not carry the PIN"):
        Pkcs11Keystore.from_uri(f"pkcs11:token={token};pin-value={USER_PIN}", {})
    with pytest.raises(KeystoreError, match="set SCOPEGRAPH_PKCS11_PIN"):
        Pkcs11Keystore.from_uri(f"pkcs11:token={token}?module-path={hsm.module}", {})
    keystore = Pkcs11Keystore(module=hsm.module, token_label=token, pin=USER_PIN)
    try:  # while one keystore holds the token's login, another must still know the PIN
        with pytest.raises(KeystoreError, match="was refused"):
            Pkcs11Keystore(module=hsm.module, token_label=token, pin="0000-wrong")
    finally:
        keystore.close()


def test_pkcs11_keystore_opens_from_the_environment(hsm: SoftHsm, token: str) -> None:
    env = {"SCOPEGRAPH_KEYSTORE": f"pkcs11:token={token}?module-path={hsm.module}",
           "SCOPEGRAPH_PKCS11_PIN": USER_PIN}
    keystore = open_keystore("/nonexistent", env)
    try:
        assert isinstance(keystore, Pkcs11Keystore) and keystore.location == f"pkcs11:token={token}"
        kid = keystore.signer("grant").kid
    finally:
        keystore.close()
    again = open_keystore("/nonexistent", env)
    try:
        assert [k.kid for k in again.verification_keys("grant")] == [kid]
    finally:
        again.close()


def test_pkcs11_rotation_destroys_the_retired_private_key(hsm: SoftHsm, token: str) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    keystore = Pkcs11Keystore(module=hsm.module, token_label=token, pin=USER_PIN)
    try:
        keystore.signer("grant")
        keystore.rotate("grant")
        with pkcs11.lib(hsm.module).get_token(token_label=token).open() as session:
            labels = sorted((o[Attribute.CLASS], o.label) for o in session.get_objects(
                {Attribute.LABEL: "scopegraph/grant/1"}))
        assert labels == [(ObjectClass.PUBLIC_KEY, "scopegraph/grant/1")]
    finally:
        keystore.close()


def test_rfc8037_thumbprint_vector() -> None:
    """RFC 8037 appendix A.3: the thumbprint of the example Ed25519 key."""
    key = VerificationKey.of("grant", 1, Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(
        "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo=")))
    assert key.kid == jwk_thumbprint(key.public_key) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert json.loads(json.dumps(key.jwk()))["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    with pytest.raises(KeystoreError, match="'svid' keys must be ES256, not EdDSA"):
        VerificationKey.of("svid", 1, key.public_key)
