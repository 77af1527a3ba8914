"""The command line's trust-root commands: ``keys``, ``approvers``, and signing answers.

``scopegraph keys rotate [--purpose P]`` makes new current keys in the keystore (the
previous public keys stay, so what they signed still verifies) and ``keys list`` shows
them. ``scopegraph approvers add NAME --key PUBKEY`` enrols an approver with an Ed25519
public key (PEM or ``ssh-ed25519 AAAA…``, given as text or as a file), ``approvers
list`` and ``approvers remove NAME`` show and end enrolments.

An answer (``approve``/``deny``, or the terminal prompt) is signed when the store has
enrolled approvers or the request asks for signed answers: with the key file from
``--key PATH``, else ``$SCOPEGRAPH_APPROVER_KEY``, else the demo's key for that name
(``demo-approvers/NAME.key`` beside the store, which ``scopegraph demo`` makes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .approvals import ApprovalRequest, ApprovalService
from .approvers import APPROVER_KEY_ENV, Decision, load_private_key, normalize_name, sign_answer
from .errors import ConfigError
from .store import Store
from .trust import state_directory

DEMO_APPROVERS_DIR = "demo-approvers"


def demo_key_path(store: Store, name: str) -> Path:
    """Where ``scopegraph demo`` keeps the private key of its approver ``name``."""
    return state_directory(store) / DEMO_APPROVERS_DIR / f"{normalize_name(name)}.key"


def answer_key(store: Store, name: str, given: str | None) -> Ed25519PrivateKey | None:
    """The private key to sign ``name``'s answer with: ``given`` (``--key``), else
    ``$SCOPEGRAPH_APPROVER_KEY``, else the demo's key for ``name`` if there is one.

    Raises:
        ConfigError: a named key file is missing, unprotected or not an Ed25519 key.
    """
    path = given or os.environ.get(APPROVER_KEY_ENV)
    if path:
        return load_private_key(path)
    try:
        demo = demo_key_path(store, name)
    except ConfigError:
        return None  # not a valid name: the service says so
    return load_private_key(demo) if demo.is_file() else None


def signed(service: ApprovalService, a: ApprovalRequest, *, approver: str, decision: Decision, reason: str,
           key: Ed25519PrivateKey | None) -> str | None:
    """The signature ``approver`` gives answer ``decision`` to ``a`` with, when one is needed.

    Raises:
        ConfigError: a signature is needed and there is no key to make it with.
    """
    if not service.signatures_required(a):
        return None
    if key is None:
        raise ConfigError(f"approval {a.id!r} needs an answer signed by {approver!r}'s enrolled key: "
                          f"pass --key PATH or set {APPROVER_KEY_ENV}")
    return sign_answer(key, approval_id=a.id, digest=a.digest, decision=decision, approver=approver, reason=reason)


def prompt_key_finder(store: Store) -> Callable[[str], Ed25519PrivateKey | None]:
    """For the terminal prompt: the key of the person who says who they are (see ``answer_key``)."""
    def find(name: str) -> Ed25519PrivateKey | None:
        return answer_key(store, name, None)

    return find


# keys ---------------------------------------------------------------------------------------
def keys_command(args: Any, print_json: Callable[[Any], None]) -> int:
    from .clock import SystemClock
    from .keys import PURPOSES
    from .ledger import LEDGER_RUN, Ledger
    from .store import open_store
    from .trust import TrustRoots

    store = open_store(args.store, create=args.keys_command == "rotate")
    try:
        clock = SystemClock()
        if args.keys_command == "list":
            trust = TrustRoots.for_reading(store, clock=clock)
            try:
                rows = _key_rows(store, trust)
            finally:
                trust.close()
            if args.json:
                print_json(rows)
            else:
                for r in rows:
                    print(f"{r['purpose']:<7} {r['kid']}  generation {r['generation']}  {r['state']}")
            return 0
        trust = TrustRoots.open(store, clock=clock)
        try:
            purposes = PURPOSES if args.purpose == "all" else (args.purpose,)
            ledger = Ledger(store, clock=clock, trust=trust)
            made = {}
            for purpose in purposes:
                before = trust.signer(purpose).kid
                key = trust.rotate(purpose)
                made[purpose] = {"kid": key.kid, "generation": key.generation, "previous": before}
            with store.atomic():
                ledger.append("keys_rotated", LEDGER_RUN, keys={p: m["kid"] for p, m in made.items()})
            ledger.sign_head()
        finally:
            trust.close()
        if args.json:
            print_json({"rotated": made, "keystore": trust.keystore.location})
        else:
            for purpose, m in made.items():
                print(f"rotated the {purpose} key: now {m['kid']} (generation {m['generation']}); "
                      f"{m['previous']} still verifies what it signed")
        return 0
    finally:
        store.close()


def _key_rows(store: Store, trust: Any) -> list[dict[str, Any]]:
    from .keys import PURPOSES

    rows: list[dict[str, Any]] = []
    for purpose in PURPOSES:
        keys = trust.verification_keys(purpose)
        for i, key in enumerate(keys):
            rows.append({"purpose": purpose, "kid": key.kid, "generation": key.generation,
                         "state": "current" if i == 0 else "previous (verifies only)"})
        rows.extend({"purpose": purpose, "kid": m.key.kid, "generation": 0,
                     "state": "migrated from the store (verifies only)"} for m in trust.migrated(purpose))
    return rows


# approvers ----------------------------------------------------------------------------------
def approvers_command(args: Any, print_json: Callable[[Any], None]) -> int:
    from .clock import SystemClock
    from .enrolment import ApproverRegistry
    from .ledger import Ledger
    from .store import open_store
    from .trust import TrustRoots

    command = args.approvers_command
    if command == "invite":
        return _invite(args, print_json)
    store = open_store(args.store, create=command == "add")
    try:
        clock = SystemClock()
        trust = TrustRoots.open(store, clock=clock) if command != "list" else TrustRoots.for_reading(store, clock=clock)
        try:
            registry = ApproverRegistry(store, trust, clock=clock, ledger=Ledger(store, clock=clock, trust=trust))
            if command == "add":
                enrolled = registry.add(args.name, _public_key_text(args.key))
                out = {"name": enrolled.record.name, "display": enrolled.record.display,
                       "kid": enrolled.record.kid, "fingerprint": enrolled.approver.fingerprint}
                if args.json:
                    print_json(out)
                else:
                    print(f"enrolled {enrolled.record.display} ({enrolled.approver.fingerprint}); their answers "
                          "must now be signed with the matching private key")
                return 0
            if command == "remove":
                if not registry.remove(args.name):
                    raise ConfigError(f"no approver named {args.name!r} is enrolled")
                if args.json:
                    print_json({"removed": normalize_name(args.name)})
                else:
                    print(f"removed {args.name}; their past answers still verify")
                return 0
            rows = _approver_rows(store, trust, registry, include_removed=args.all)
        finally:
            trust.close()
    finally:
        store.close()
    if args.json:
        print_json(rows)
    elif not rows:
        print("no approvers enrolled: anyone the workflow allows may answer, unsigned")
    else:
        for r in rows:
            print(_approver_line(r))
            for p in r["passkeys"]:
                print(_passkey_line(p))
    return 0


def _approver_rows(store: Store, trust: Any, registry: Any, *, include_removed: bool) -> list[dict[str, Any]]:
    """One row per Ed25519 enrolment (as before), each with its approver's passkeys; then one
    row per approver enrolled with passkeys only (``kid`` None)."""
    from .passkeys import PasskeyRegistry
    from .store.web_records import PasskeyRecord, WebStore

    passkeys = PasskeyRegistry(store, trust)
    keys: dict[str, list[PasskeyRecord]] = {}
    for p in cast(WebStore, store).list_passkeys(include_removed=include_removed):
        keys.setdefault(p.name, []).append(p)

    def shown(p: PasskeyRecord) -> dict[str, Any]:
        return {"kid": p.kid, "enrolled_at": p.enrolled_at, "last_used_at": p.last_used_at,
                "removed_at": p.removed_at, "sign_count": p.sign_count, "rp_id": p.rp_id, "origin": p.origin,
                "vouched_for": p.removed_at is not None or passkeys.endorsed(p)}

    records = registry.records(include_removed=include_removed)
    good = {e.record.kid for e in registry.enrolled()}
    last_row_of = {r.name: i for i, r in enumerate(records)}  # a name's passkeys go with its latest enrolment
    rows = [{"name": r.name, "display": r.display, "kid": r.kid, "enrolled_at": r.enrolled_at,
             "removed_at": r.removed_at, "vouched_for": r.kid in good or r.removed_at is not None,
             "passkeys": [shown(p) for p in keys.get(r.name, [])] if last_row_of[r.name] == i else []}
            for i, r in enumerate(records)]
    for name, found in keys.items():
        if name in last_row_of:
            continue
        live = [p for p in found if p.removed_at is None]
        listed = [shown(p) for p in found]
        rows.append({"name": name, "display": found[-1].display, "kid": None, "enrolled_at": found[0].enrolled_at,
                     "removed_at": None if live else max(p.removed_at or 0.0 for p in found),
                     "vouched_for": any(p["vouched_for"] for p in listed), "passkeys": listed})
    for row in rows:
        row["passkey_count"] = sum(1 for p in row["passkeys"] if p["removed_at"] is None)
    return rows


def _approver_line(r: dict[str, Any]) -> str:
    state = "removed" if r["removed_at"] is not None else (
        "enrolled" if r["vouched_for"] else "NOT VOUCHED FOR BY THE KEYSTORE (ignored)")
    count = r["passkey_count"]
    keys = f"{count} passkey{'' if count == 1 else 's'}"
    return f"{r['display']:<16} {r['kid'] or '(no Ed25519 key)'}  {state}  {keys}"


def _passkey_line(p: dict[str, Any]) -> str:
    from .timestamps import iso

    state = "  removed" if p["removed_at"] is not None else (
        "" if p["vouched_for"] else "  NOT VOUCHED FOR BY THE KEYSTORE (ignored)")
    return (f"  passkey {p['kid']}  created {iso(p['enrolled_at'])}  "
            f"last used {iso(p['last_used_at']) or 'never'}{state}")


def _invite(args: Any, print_json: Callable[[Any], None]) -> int:
    """``approvers invite NAME``: a one-time enrolment link, printed once (the store keeps its hash)."""
    from .clock import SystemClock
    from .ledger import Ledger
    from .passkeys import PasskeyRegistry
    from .store import open_store
    from .trust import TrustRoots

    store = open_store(args.store, create=False)
    try:
        clock = SystemClock()
        trust = TrustRoots.open(store, clock=clock)
        try:
            registry = PasskeyRegistry(store, trust, clock=clock, ledger=Ledger(store, clock=clock, trust=trust))
            invitation = registry.invite(args.name, ttl=args.ttl)
        finally:
            trust.close()
    finally:
        store.close()
    link = invitation.link(args.url)
    if args.json:
        print_json({"name": invitation.name, "link": link, "expires_at": invitation.expires_at})
    else:
        print(f"invitation for {invitation.display} (works once, for {args.ttl / 60:.0f} minutes):\n  {link}\n"
              "open it in the browser that will hold their passkey; `scopegraph serve` must be running there")
    return 0


def _public_key_text(value: str) -> str:
    """``--key``: the key itself (``ssh-ed25519 …`` or PEM) or a file holding it."""
    text = value.strip()
    if text.startswith(("ssh-ed25519 ", "-----BEGIN")):
        return text
    path = Path(value)
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--key {value!r} is neither a public key nor a readable key file "
                          f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
