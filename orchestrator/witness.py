"""The witness: an append-only file, outside the store, of every signed ledger head.

Whoever can write the store can put back an older, genuinely signed head after deleting
the records behind it; the store alone cannot tell. So each head is also appended here,
as one JSON line (RFC 8785 form) signed by the ``ledger`` key::

    {"at":…,"head":"<record hash>","kid":"…","prev":"<sha256 of the previous line>",
     "records":<ledger records covered>,"seq":<entry number>,"sig":"…","type":"scopegraph.witness.v1"}

``verify_against`` compares the store's head with the witness and reports:

- a store head older than the newest witnessed head (a rollback), or the same record
  count with another hash (a rewrite);
- an edited line (not canonical, or a bad signature), a deleted or reordered line (the
  sequence numbers or the ``prev`` chain break);
- deleted last lines: the store's head records the witness entry it was written with
  (``witness_seq``, covered by the head's signature), so a witness that ends before that
  entry has lost its tail;
- with the ledger's record hashes, any witnessed head that the ledger no longer holds.

What one machine cannot show: someone who can write both the store and this file can roll
both back together to an earlier, consistent pair. Against that, keep a copy elsewhere
(``audit verify --witness COPY`` checks against it) or let telemetry ship each entry to
a backend the same person cannot edit.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .canonical import jcs
from .errors import StoreError
from .keys.base import Signer, VerificationKey, find_key

WITNESS_ENV = "SCOPEGRAPH_WITNESS"
WITNESS_TYPE = "scopegraph.witness.v1"
GENESIS = "0" * 64
_FIELDS = frozenset({"type", "seq", "records", "head", "at", "prev", "kid", "sig"})
_TAIL_CHUNK = 4096


def default_witness_path(state_dir: Path | str, environ: Mapping[str, str] | None = None) -> Path:
    """``$SCOPEGRAPH_WITNESS``, or ``witness.jsonl`` in the state directory (``.scopegraph/``)."""
    env = os.environ if environ is None else environ
    return Path(env.get(WITNESS_ENV) or Path(state_dir) / "witness.jsonl")


@dataclass(frozen=True, kw_only=True)
class WitnessedHead:
    """What the store's signed head says: how many records it covers, their hash, its witness entry."""

    records: int
    hash: str
    witness_seq: int | None = None  # None: a head signed before there was a witness


@dataclass(frozen=True, kw_only=True)
class WitnessEntry:
    seq: int
    records: int
    head: str
    at: float
    prev: str
    kid: str
    sig: str
    line_hash: str  # SHA-256 of this entry's line: the next entry's ``prev``


@dataclass(frozen=True, kw_only=True)
class WitnessLog:
    """The entries that verify, in order, and the first problem after them (if any)."""

    entries: tuple[WitnessEntry, ...]
    problem: str | None = None
    bad_line: int | None = None

    @property
    def newest(self) -> WitnessEntry | None:
        return self.entries[-1] if self.entries else None


@dataclass(frozen=True, kw_only=True)
class WitnessReport:
    ok: bool
    entries: int
    newest_seq: int | None
    newest_records: int | None
    problems: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "newest_seq": self.newest_seq,
                "newest_records": self.newest_records, "problems": list(self.problems)}


def _unsigned(entry: Mapping[str, Any]) -> bytes:
    return jcs({k: v for k, v in entry.items() if k != "sig"})


class WitnessFile:
    """An append-only JSON-lines witness; ``keys`` are the ``ledger`` keys its entries may be signed by."""

    def __init__(self, path: Path | str, *, keys: Sequence[VerificationKey] = ()) -> None:
        self.path = Path(path)
        self.keys = tuple(keys)
        # The entry this object last wrote or read at the end of the file, and the file's
        # stat just after: while the stat is the same (no one wrote, renamed, truncated or
        # touched it: a write moves the size and ctime, and ctime cannot be set back), the
        # last line is that entry and is not read and parsed again.
        self._tail: tuple[tuple[int, ...], WitnessEntry] | None = None

    def __repr__(self) -> str:
        return f"WitnessFile({str(self.path)!r})"

    def append(self, *, records: int, head: str, at: float, signer: Signer) -> WitnessEntry:
        """Witness a head covering ``records`` ledger records whose last hash is ``head``.

        Witnessing the newest head again returns its entry. Appends are serialised with
        an exclusive lock on the file.

        Raises:
            StoreError: the head is older than the newest witnessed one (the ledger was
                rolled back) or rewrites it, the signer is not a ``ledger`` key, the file
                is writable by others, or its last line is damaged.
        """
        if signer.purpose != "ledger":
            raise StoreError(f"the witness must be signed with a 'ledger' key, not a {signer.purpose!r} key")
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:  # its directory is made on first use
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, flags, 0o644)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o022:
                raise StoreError(f"witness {self.path} has mode {mode:04o}: only its owner may write it "
                                 f"(chmod 644 {self.path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)  # under the lock: no other writer moves it now
            tail = self._tail
            last = tail[1] if tail is not None and tail[0] == _stamp(st) else self._last_entry(fd, st.st_size)
            if last is not None:
                if records < last.records:
                    raise StoreError(f"the ledger head covers {records} records but the witness saw "
                                     f"{last.records} (entry {last.seq}): the ledger was rolled back")
                if records == last.records:
                    if head != last.head:
                        raise StoreError(f"the ledger head at record {records} differs from the one the witness "
                                         f"saw (entry {last.seq}): the ledger was rewritten")
                    self._tail = (_stamp(st), last)
                    return last
            entry: dict[str, Any] = {
                "type": WITNESS_TYPE, "seq": (last.seq if last else 0) + 1, "records": records, "head": head,
                "at": at, "prev": last.line_hash if last else GENESIS, "kid": signer.kid,
            }
            entry["sig"] = base64.urlsafe_b64encode(signer.sign(_unsigned(entry))).rstrip(b"=").decode("ascii")
            line = jcs(entry)
            self._tail = None  # until the line is written in full and durable
            written = os.write(fd, line + b"\n")
            if written != len(line) + 1:
                raise StoreError(f"witness {self.path}: a short write ({written} of {len(line) + 1} bytes)")
            _sync(fd)
            made = _entry(entry, line)
            self._tail = (_stamp(os.fstat(fd)), made)
            return made
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> WitnessLog:
        """Every entry that verifies, up to the first that does not."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return WitnessLog(entries=())
        except OSError as exc:
            return WitnessLog(entries=(), problem=f"the witness {self.path} cannot be read: {exc.strerror}",
                              bad_line=None)
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        entries: list[WitnessEntry] = []
        for number, line in enumerate(complete, start=1):
            problem, entry = self._check_line(number, line, entries[-1] if entries else None)
            if problem:
                return WitnessLog(entries=tuple(entries), problem=problem, bad_line=number)
            assert entry is not None
            entries.append(entry)
        if tail:
            return WitnessLog(entries=tuple(entries), bad_line=len(complete) + 1,
                              problem=f"witness line {len(complete) + 1} is incomplete (no newline)")
        return WitnessLog(entries=tuple(entries))

    def verify_against(self, head: WitnessedHead | None, *,
                       ledger_hashes: Mapping[int, str] | None = None) -> WitnessReport:
        """Compare the store's signed head (and, if given, its ledger's record hashes) with the witness.

        ``ledger_hashes`` maps a record's sequence number to its hash.
        """
        log = self.read()
        problems = [log.problem] if log.problem else []
        newest = log.newest
        if head is None:
            if newest is not None:
                problems.append(f"the store has no signed head but the witness saw {newest.records} records "
                                f"(entry {newest.seq}): the ledger was wiped")
        else:
            problems.extend(_compare_head(head, log))
        if ledger_hashes is not None:
            problems.extend(_compare_ledger(log.entries, ledger_hashes))
        return WitnessReport(ok=not problems, entries=len(log.entries), problems=tuple(problems),
                             newest_seq=newest.seq if newest else None,
                             newest_records=newest.records if newest else None)

    # lines -------------------------------------------------------------------------------
    def _check_line(self, number: int, line: bytes,
                    previous: WitnessEntry | None) -> tuple[str | None, WitnessEntry | None]:
        try:
            raw = json.loads(line)
        except ValueError:
            return f"witness line {number} is not JSON", None
        if not isinstance(raw, dict) or set(raw) != _FIELDS or raw.get("type") != WITNESS_TYPE:
            return f"witness line {number} is not a witness entry", None
        if not (_is_int(raw["seq"]) and _is_int(raw["records"]) and isinstance(raw["at"], int | float)
                and all(isinstance(raw[k], str) for k in ("head", "prev", "kid", "sig"))):
            return f"witness line {number} has fields of the wrong type", None
        try:
            canonical = jcs(raw) == line
        except ValueError:
            canonical = False
        if not canonical:
            return f"witness line {number} is not in canonical form: it was edited", None
        entry = _entry(raw, line)
        want_seq = previous.seq + 1 if previous else 1
        if entry.seq != want_seq:
            return (f"witness line {number} is entry {entry.seq}, expected {want_seq}: "
                    "entries were deleted or reordered"), None
        if entry.prev != (previous.line_hash if previous else GENESIS):
            return f"witness entry {entry.seq} does not follow the entry before it: a line was edited or removed", None
        key = find_key(self.keys, entry.kid)
        if key is None or key.purpose != "ledger":
            return f"witness entry {entry.seq} is signed by key {entry.kid!r}, which is not a known ledger key", None
        try:
            signature = base64.urlsafe_b64decode(entry.sig + "=" * (-len(entry.sig) % 4))
        except ValueError:
            signature = b""
        if not key.verifies(_unsigned(raw), signature):
            return f"witness entry {entry.seq} has a bad signature: it was edited", None
        if previous is not None and (entry.records < previous.records
                                     or (entry.records == previous.records and entry.head != previous.head)):
            return (f"witness entry {entry.seq} goes back from {previous.records} to {entry.records} records: "
                    "the ledger was rolled back or rewritten when it was written"), None
        return None, entry

    def _last_entry(self, fd: int, size: int) -> WitnessEntry | None:
        """The last line's entry, read from the end of the file (no signature check: ``read`` does that)."""
        if size == 0:
            return None
        end = os.pread(fd, 1, size - 1)
        if end != b"\n":
            raise StoreError(f"the last line of witness {self.path} is incomplete: check it with "
                             "'scopegraph audit verify' before witnessing more heads")
        buffer = b""
        offset = size - 1
        while offset > 0 and b"\n" not in buffer:
            start = max(0, offset - _TAIL_CHUNK)
            buffer = os.pread(fd, offset - start, start) + buffer
            offset = start
        line = buffer.rsplit(b"\n", 1)[-1]
        try:
            raw = json.loads(line)
            if set(raw) != _FIELDS or jcs(raw) != line:
                raise ValueError("not a witness entry")
            return _entry(raw, line)
        except (ValueError, TypeError, AttributeError):
            raise StoreError(f"the last line of witness {self.path} is damaged: check it with "
                             "'scopegraph audit verify' before witnessing more heads") from None


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What tells one state of the file from another: which file, its size, when it last changed."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# The entry's bytes, and the file's size, must reach the disk before the head that names it
# is kept; its other metadata need not. (macOS has no fdatasync.)
_sync = getattr(os, "fdatasync", os.fsync)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(raw: Mapping[str, Any], line: bytes) -> WitnessEntry:
    return WitnessEntry(seq=raw["seq"], records=raw["records"], head=raw["head"], at=raw["at"], prev=raw["prev"],
                        kid=raw["kid"], sig=raw["sig"], line_hash=hashlib.sha256(line).hexdigest())


def _compare_head(head: WitnessedHead, log: WitnessLog) -> list[str]:
    problems = []
    newest = log.newest
    if newest is not None:
        if head.records < newest.records:
            problems.append(f"the store's head covers {head.records} records but the witness saw "
                            f"{newest.records} (entry {newest.seq}): the ledger was rolled back")
        elif head.records == newest.records and head.hash != newest.head:
            problems.append(f"the store's head at record {head.records} differs from the witnessed head "
                            f"(entry {newest.seq}): the ledger was rewritten")
    if head.witness_seq is None:
        if newest is not None and head.records > newest.records:
            problems.append(f"the store's head (record {head.records}) was never witnessed")
        return problems
    if log.problem is None and head.witness_seq > (newest.seq if newest else 0):
        problems.append(f"the store's head was witnessed as entry {head.witness_seq} but the witness ends at "
                        f"entry {newest.seq if newest else 0}: its last lines were deleted")
    elif head.witness_seq <= len(log.entries):
        entry = log.entries[head.witness_seq - 1]
        if (entry.records, entry.head) != (head.records, head.hash):
            problems.append(f"witness entry {entry.seq} does not hold the store's head (record {head.records})")
    return problems


def _compare_ledger(entries: Sequence[WitnessEntry], ledger_hashes: Mapping[int, str]) -> list[str]:
    for entry in entries:
        if entry.records == 0:
            continue
        have = ledger_hashes.get(entry.records)
        if have is None:
            return [f"witness entry {entry.seq} covers record {entry.records}, which the ledger no longer has"]
        if have != entry.head:
            return [f"ledger record {entry.records} differs from the head witnessed in entry {entry.seq}: "
                    "the ledger was rewritten"]
    return []
