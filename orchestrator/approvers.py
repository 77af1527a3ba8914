"""Approvers who prove who they are: enrolled Ed25519 keys, signed answers, one spelling per person.

An approver is enrolled with an Ed25519 public key (PEM, or an OpenSSH ``ssh-ed25519``
line). An answer is signed with the matching private key (PEM or OpenSSH file) over
``answer_message``: the RFC 8785 form of the approval id, the action digest, the
decision, the reason and the approver's name, so a signature approves one call, as one
person, and cannot be replayed as a denial, for another call, or under another name.

Names are principals: compared after Unicode NFKC normalisation and case folding
(``"Alice"`` and full-width ``"ａｌｉｃｅ"`` are ``alice``), and refused when they hold
whitespace, control or format characters (``"alice "`` and ``"ali\\u200bce"`` are not
names), so the initiator cannot answer her own request under another spelling.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import re
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, field_validator

from .canonical import jcs
from .errors import ApprovalError, ConfigError
from .keys.base import jwk_thumbprint

APPROVER_KEY_ENV = "SCOPEGRAPH_APPROVER_KEY"
ANSWER_TYPE = "scopegraph.approval-answer.v1"
MAX_NAME_LENGTH = 128
Decision = Literal["approve", "deny"]
_DIGEST = re.compile(r"^[0-9a-f]{64}\Z")
# Unicode categories a name may not contain: controls, format (zero-width), surrogates,
# private use, unassigned, and every kind of separator (spaces, line and paragraph).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})


# names -------------------------------------------------------------------------------------
def normalize_name(name: str) -> str:
    """The principal a name denotes: NFKC, case-folded, NFKC again (Unicode's NFKC_Casefold idea).

    Raises:
        ConfigError: empty, too long, or holding whitespace, control or format characters.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("an approver name must not be empty")
    for text in (name, unicodedata.normalize("NFKC", name)):
        for ch in text:
            if ch.isspace() or unicodedata.category(ch) in _REFUSED_CATEGORIES:
                raise ConfigError(f"invalid approver name {name!r}: it contains {_describe(ch)}")
    normal = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    if len(normal) > MAX_NAME_LENGTH:
        raise ConfigError(f"invalid approver name {name[:32]!r}…: longer than {MAX_NAME_LENGTH} characters")
    return normal


def same_principal(a: str, b: str) -> bool:
    """Whether two names denote the same person.

    Raises:
        ConfigError: either is not a valid name (never "different" by being malformed).
    """
    return normalize_name(a) == normalize_name(b)


def _describe(ch: str) -> str:
    return f"U+{ord(ch):04X} ({unicodedata.name(ch, unicodedata.category(ch))})"


@dataclass(frozen=True, kw_only=True)
class Principal:
    """An authenticated person: the normalised name used for every comparison, and how it was given."""

    name: str
    display: str
    authenticated_by: str  # "os-user", "application", "approver-key", ...

    @classmethod
    def of(cls, name: str, *, authenticated_by: str) -> Principal:
        """Raises:
        ConfigError: ``name`` is not a valid name.
        """
        return cls(name=normalize_name(name), display=name, authenticated_by=authenticated_by)

    def is_(self, other: Principal | str) -> bool:
        other_name = other.name if isinstance(other, Principal) else normalize_name(other)
        return self.name == other_name


def os_principal() -> Principal:
    """The operating-system user running this process, as a principal (the default initiator).

    A user id with no name (a container's arbitrary uid) is ``uid<N>``.
    """
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        name = f"uid{os.geteuid()}"
    return Principal.of(name, authenticated_by="os-user")


# keys --------------------------------------------------------------------------------------
def parse_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo) or an ``ssh-ed25519 AAAA… comment`` line.

    Raises:
        ConfigError: not a key in either form, or not an Ed25519 key.
    """
    stripped = text.strip() if isinstance(text, str) else ""
    try:
        if stripped.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(stripped.encode("ascii"))
        else:
            key = serialization.load_ssh_public_key(stripped.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm):
        raise ConfigError("the approver key is neither a PEM public key nor an 'ssh-ed25519 AAAA…' line") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"an approver key must be Ed25519, not {type(key).__name__.removeprefix('_')}")
    return key


def openssh_fingerprint(key: Ed25519PublicKey) -> str:
    """``SHA256:…`` as ``ssh-keygen -l`` prints it, so a person can compare it with their own."""
    blob = base64.b64decode(key.public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode("ascii")


def load_private_key(path: Path | str, *, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """An approver's Ed25519 private key from a PEM (PKCS#8 or OpenSSL) or OpenSSH key file.

    Like ``ssh``, refuses a key file that group or others can read.

    Raises:
        ConfigError: missing or unprotected file, wrong passphrase, or not an Ed25519 private key.
    """
    path = Path(path)
    try:
        st = os.stat(path)
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read approver key {path}: {exc.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(f"approver key {path} has mode {mode:04o}: group and others must have no access "
                          f"(chmod 600 {path})")
    key: object
    try:
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
            key = serialization.load_ssh_private_key(data, password=passphrase)
        else:
            key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        raise ConfigError(f"approver key {path} is encrypted: a passphrase is needed"
                          if passphrase is None else f"approver key {path} is not encrypted") from None
    except UnsupportedAlgorithm as exc:
        raise ConfigError(f"approver key {path} cannot be read: {exc}") from None
    except ValueError:
        raise ConfigError(f"approver key {path} cannot be read: not a PEM or OpenSSH private key, "
                          "or a wrong passphrase") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"approver key {path} is not an Ed25519 key")
    return key


# enrolment ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Approver:
    """An enrolled approver: a normalised name and the public key their answers must verify with."""

    name: str
    display: str
    public_key: Ed25519PublicKey = field(repr=False, compare=False)
    kid: str

    def public_pem(self) -> str:
        return self.public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    @property
    def fingerprint(self) -> str:
        return openssh_fingerprint(self.public_key)


class ApproverEnrolment(BaseModel):
    """``approvers add NAME --key PUBKEY``, validated at the trust boundary."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    key: str

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        try:
            normalize_name(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("key")
    @classmethod
    def _valid_key(cls, value: str) -> str:
        try:
            parse_public_key(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    def approver(self) -> Approver:
        key = parse_public_key(self.key)
        return Approver(name=normalize_name(self.name), display=self.name, public_key=key, kid=jwk_thumbprint(key))


# answers -----------------------------------------------------------------------------------
def answer_message(*, approval_id: str, digest: str, decision: Decision, approver: str, reason: str = "") -> bytes:
    """The exact bytes an approver signs: RFC 8785 JSON of the answer, typed and versioned.

    Raises:
        ConfigError: ``digest`` is not a SHA-256 hex digest, ``decision`` is unknown, or
            ``approver`` is not a valid name.
    """
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ConfigError(f"action digest {str(digest)[:80]!r} is not 64 lowercase hex characters")
    if decision not in ("approve", "deny"):
        raise ConfigError(f"unknown decision {decision!r}: expected 'approve' or 'deny'")
    return jcs({"type": ANSWER_TYPE, "approval_id": approval_id, "digest": digest, "decision": decision,
                "approver": normalize_name(approver), "reason": reason})


def sign_answer(key: Ed25519PrivateKey, *, approval_id: str, digest: str, decision: Decision, approver: str,
                reason: str = "") -> str:
    """The approver's signature over ``answer_message``, base64url without padding."""
    message = answer_message(approval_id=approval_id, digest=digest, decision=decision, approver=approver,
                             reason=reason)
    return base64.urlsafe_b64encode(key.sign(message)).rstrip(b"=").decode("ascii")


def verify_answer(enrolled: Approver, signature: str, *, approval_id: str, digest: str, decision: Decision,
                  approver: str, reason: str = "") -> None:
    """Check that ``enrolled`` signed exactly this answer.

    Raises:
        ApprovalError: the answer names another approver, the signature is missing or
            malformed, or it does not verify with the enrolled key.
    """
    if normalize_name(approver) != enrolled.name:
        raise ApprovalError(f"the answer names approver {approver!r} but is checked against {enrolled.display!r}")
    if not signature:
        raise ApprovalError(f"the answer of {enrolled.display!r} to {approval_id!r} is not signed")
    try:
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except (ValueError, TypeError):
        raise ApprovalError(f"the signature on {enrolled.display!r}'s answer to {approval_id!r} is malformed") from None
    message = answer_message(approval_id=approval_id, digest=digest, decision=decision, approver=approver,
                             reason=reason)
    try:
        enrolled.public_key.verify(raw, message)
    except InvalidSignature:
        raise ApprovalError(f"the signature on {enrolled.display!r}'s answer to {approval_id!r} does not verify "
                            f"with the enrolled key {enrolled.fingerprint}") from None
