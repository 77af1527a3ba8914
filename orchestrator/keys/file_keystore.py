"""A keystore of PEM files in a directory that only its owner can read.

Layout: ``<purpose>.<generation>.key`` (PKCS#8, encrypted when a passphrase is set) and
``<purpose>.<generation>.pub`` (SubjectPublicKeyInfo) for each generation; the current
key is the newest generation that still has a ``.key`` file. Rotation writes a new
generation and deletes the previous ``.key``; every ``.pub`` stays, for verification.

The directory must be ``0700`` and every file ``0600``, both owned by this user: a
keystore that others can read, or that someone else made (a planted directory, a
symlinked file), is refused with one line naming the path and its mode. Files are
created whole (written to a temporary name, then linked into place), so a reader never
sees half a key and two processes never both create the same generation.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ..errors import KeystoreError
from .base import PURPOSE_ALGORITHM, Purpose, SignerBase, VerificationKey, check_purpose

KEYSTORE_ENV = "SCOPEGRAPH_KEYSTORE"
PASSPHRASE_ENV = "SCOPEGRAPH_KEYSTORE_PASSPHRASE"
_FILE = re.compile(r"^(grant|svid|ledger)\.(\d{6})\.(key|pub)\Z")
_PRIVATE_MODE_BITS = 0o077
# Looking up a signer (once per grant) reuses the directory's last listing while the
# directory's stat is unchanged; a listing taken less than this long after the directory
# last changed is not kept (file times are coarse, a clock tick at most: a file added in the
# same tick as the listing would leave them unchanged). A listing that is stale all the
# same can only name the key that was current when it was taken, which signs until its
# file is gone (a rotation deletes it at once), as in any race with a rotation.
_SETTLED_NS = 100_000_000

PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class FileSigner(SignerBase):
    """Signs with a private key loaded from the file keystore."""

    def __init__(self, verification_key: VerificationKey, key: PrivateKey) -> None:
        super().__init__(verification_key)
        self._key = key

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, Ed25519PrivateKey):
            return self._key.sign(data)
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _new_private_key(purpose: Purpose) -> PrivateKey:
    if PURPOSE_ALGORITHM[purpose] == "EdDSA":
        return Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


class FileKeystore:
    """Private keys as files in one directory (default ``.scopegraph/keys/``)."""

    def __init__(self, directory: Path | str, *, passphrase: bytes | None = None) -> None:
        """Open (and, if missing, create) the keystore directory.

        Raises:
            KeystoreError: the directory or a key file is accessible by group or others,
                belongs to another user, is a symlink, or the passphrase is empty.
        """
        if passphrase is not None and not passphrase:
            raise KeystoreError(f"the keystore passphrase for {directory} is empty: unset {PASSPHRASE_ENV} or set it")
        self.directory = Path(directory)
        self._path = str(self.directory)  # for the checks made on every signature (pathlib is slow)
        self._passphrase = passphrase
        self._lock = threading.Lock()
        self._signers: dict[tuple[Purpose, int], FileSigner] = {}
        self._listing: tuple[tuple[int, ...], list[tuple[str, str, int, str]]] | None = None
        # The current (generation, key path) per purpose, as read from the listing held here.
        self._current_keys: tuple[list[tuple[str, str, int, str]] | None, dict[Purpose, tuple[int, str]]] = (None, {})
        if not self.directory.exists():
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.directory.mkdir(mode=0o700)
            except FileExistsError:
                pass
            else:
                os.chmod(self.directory, 0o700)  # whatever the umask
        self._check_directory()
        for name in self._names():
            self._check_file_stat(self.directory / name, os.lstat(self.directory / name))

    @classmethod
    def from_env(cls, default_directory: Path | str, environ: Mapping[str, str] | None = None) -> FileKeystore:
        """The keystore at ``$SCOPEGRAPH_KEYSTORE`` (or ``default_directory``), with the passphrase
        from ``$SCOPEGRAPH_KEYSTORE_PASSPHRASE`` when set."""
        env = os.environ if environ is None else environ
        passphrase = env.get(PASSPHRASE_ENV)
        return cls(env.get(KEYSTORE_ENV) or default_directory,
                   passphrase=None if passphrase is None else passphrase.encode("utf-8"))

    @property
    def location(self) -> str:
        return str(self.directory)

    def __repr__(self) -> str:
        return f"FileKeystore({self.location!r}, encrypted={self._passphrase is not None})"

    # the Keystore protocol ---------------------------------------------------------------
    def signer(self, purpose: str) -> FileSigner:
        """The current signer of ``purpose``; its first key is made on first use.

        Raises:
            KeystoreError: unknown purpose, unsafe files, a missing or wrong passphrase,
                or a key file that does not match its public key.
        """
        checked = check_purpose(purpose)
        with self._lock:
            listed = self._check_directory()
            generation, path = self._current_key(checked, listed)
            cached = self._signers.get((checked, generation))
            if cached is not None:  # loaded before: the file must still be safe to hold the key
                st: os.stat_result | None
                try:
                    st = os.lstat(path)
                except FileNotFoundError:  # rotated away since the directory was listed: list it again
                    self._listing = None
                    generation = self._current_or_first(checked)
                    cached = self._signers.get((checked, generation))
                    path = os.path.join(self._path, _name(checked, generation, "key"))
                    st = os.lstat(path) if cached is not None else None
                if st is not None:
                    self._check_file_stat(path, st)
            if cached is None:
                cached = self._load_signer(checked, generation)
                self._signers = {(checked, generation): cached, **{
                    k: v for k, v in self._signers.items() if k[0] != checked}}
            return cached

    def _current_key(self, purpose: Purpose, listed: os.stat_result) -> tuple[int, str]:
        """The current generation of ``purpose`` and its key file's path. Worked out once per
        settled listing of the directory (the same listing gives the same answer); the
        directory's stat and the key file's lstat are still checked on every lookup."""
        entries = self._entries(listed)
        if entries is not self._current_keys[0]:
            self._current_keys = (entries, {})
        known = self._current_keys[1].get(purpose)
        if known is not None:
            return known
        generation = self._current_generation(purpose, listed)
        if generation is None:  # its first key is made: nothing to remember from this listing
            generation = self._current_or_first(purpose, listed)
            return generation, os.path.join(self._path, _name(purpose, generation, "key"))
        known = generation, os.path.join(self._path, _name(purpose, generation, "key"))
        if self._listing is not None and self._listing[1] is entries:  # kept: the answer can be too
            self._current_keys[1][purpose] = known
        return known

    def verification_keys(self, purpose: str) -> tuple[VerificationKey, ...]:
        checked = check_purpose(purpose)
        with self._lock:
            self._check_directory()
            generations = sorted(self._generations(checked, "pub"), reverse=True)
            return tuple(self._load_public(checked, g) for g in generations)

    def rotate(self, purpose: str) -> VerificationKey:
        """Make a new current key of ``purpose`` and retire the previous private key.

        Raises:
            KeystoreError: as ``signer``, or another process rotated at the same moment.
        """
        checked = check_purpose(purpose)
        with self._lock:
            self._check_directory()
            generation = self._create(checked, self._next_generation(checked), exclusive=True)
            for old in self._generations(checked, "key"):
                if old < generation:
                    (self.directory / _name(checked, old, "key")).unlink(missing_ok=True)
            self._fsync_directory()
            self._signers = {k: v for k, v in self._signers.items() if k[0] != checked}
            return self._load_public(checked, generation)

    def close(self) -> None:
        with self._lock:
            self._signers = {}

    # files -------------------------------------------------------------------------------
    def _names(self) -> list[str]:
        return [name for name, _, _, _ in self._entries()]

    def _entries(self, st: os.stat_result | None = None) -> list[tuple[str, str, int, str]]:
        """The key files: ``(name, purpose, generation, kind)``. With ``st`` (the directory's
        stat, just taken: a signer's lookup), the last listing is reused while that stat is
        unchanged (see ``_SETTLED_NS``); otherwise the directory is listed afresh."""
        reuse = st is not None
        st = st or os.stat(self._path)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, st.st_size)
        if reuse and self._listing is not None and self._listing[0] == key:
            return self._listing[1]
        listed_at = time.time_ns()
        entries = []
        for name in sorted(os.listdir(self._path)):
            m = _FILE.match(name)
            if m:
                entries.append((name, m.group(1), int(m.group(2)), m.group(3)))
        settled = listed_at - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS
        self._listing = (key, entries) if settled else None
        return entries

    def _generations(self, purpose: Purpose, kind: str, st: os.stat_result | None = None) -> set[int]:
        return {g for _, p, g, k in self._entries(st) if p == purpose and k == kind}

    def _current_generation(self, purpose: Purpose, st: os.stat_result | None = None) -> int | None:
        return max(self._generations(purpose, "key", st), default=None)

    def _current_or_first(self, purpose: Purpose, st: os.stat_result | None = None) -> int:
        """The current generation of ``purpose``, its first key made if it has none."""
        generation = self._current_generation(purpose, st)
        if generation is None:
            generation = self._create(purpose, self._next_generation(purpose), exclusive=False)
        return generation

    def _next_generation(self, purpose: Purpose) -> int:
        return max(self._generations(purpose, "key") | self._generations(purpose, "pub"), default=0) + 1

    def _check_directory(self) -> os.stat_result:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            raise KeystoreError(f"keystore directory {self.directory} does not exist") from None
        if not stat.S_ISDIR(st.st_mode):
            raise KeystoreError(f"keystore {self.directory} is not a directory")
        _check_owner_and_mode(self.directory, st, "directory", "700")
        return st

    def _check_file_stat(self, path: Path | str, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise KeystoreError(f"keystore file {path} is not a regular file (a symlink is refused)")
        _check_owner_and_mode(path, st, "file", "600")

    def _read(self, path: Path) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeystoreError(f"keystore file {path} is missing") from None
        except OSError as exc:
            raise KeystoreError(f"keystore file {path} cannot be opened: {exc.strerror}") from None
        try:
            self._check_file_stat(path, os.fstat(fd))
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _write_new(self, path: Path, data: bytes) -> bool:
        """Create ``path`` whole with mode 0600; False if it already exists."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # keys --------------------------------------------------------------------------------
    def _create(self, purpose: Purpose, generation: int, *, exclusive: bool) -> int:
        key = _new_private_key(purpose)
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(self._passphrase) if self._passphrase is not None
            else serialization.NoEncryption())
        private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        if not self._write_new(self.directory / _name(purpose, generation, "key"), private_pem):
            if exclusive:
                raise KeystoreError(f"another process made {purpose!r} key generation {generation} in "
                                    f"{self.directory} at the same time; try again")
            return generation  # someone else made the first key: use theirs
        public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        self._write_new(self.directory / _name(purpose, generation, "pub"), public_pem)
        self._fsync_directory()
        return generation

    def _load_public(self, purpose: Purpose, generation: int) -> VerificationKey:
        path = self.directory / _name(purpose, generation, "pub")
        try:
            public = serialization.load_pem_public_key(self._read(path))
        except ValueError:
            raise KeystoreError(f"keystore file {path} is not a PEM public key") from None
        return VerificationKey.of(purpose, generation, public)

    def _load_signer(self, purpose: Purpose, generation: int) -> FileSigner:
        path = self.directory / _name(purpose, generation, "key")
        data = self._read(path)
        encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
        if encrypted and self._passphrase is None:
            raise KeystoreError(f"keystore key {path} is encrypted: set {PASSPHRASE_ENV}")
        if not encrypted and self._passphrase is not None:
            raise KeystoreError(f"keystore key {path} is not encrypted although a passphrase is set: "
                                "refusing a key that may have been planted")
        try:
            key = serialization.load_pem_private_key(data, password=self._passphrase)
        except ValueError:
            raise KeystoreError(f"keystore key {path} cannot be decrypted: wrong passphrase "
                                "or damaged file") from None
        if not isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise KeystoreError(f"keystore key {path} is a {type(key).__name__}, not Ed25519 or ECDSA")
        verification = VerificationKey.of(purpose, generation, key.public_key())
        pub_path = self.directory / _name(purpose, generation, "pub")
        if not pub_path.exists():  # a crash between writing the key and its public half
            self._write_new(pub_path, verification.pem().encode("ascii"))
        if self._load_public(purpose, generation).kid != verification.kid:
            raise KeystoreError(f"keystore key {path} does not match its public key {pub_path.name}")
        return FileSigner(verification, key)


def _name(purpose: Purpose, generation: int, kind: str) -> str:
    return f"{purpose}.{generation:06d}.{kind}"


def _check_owner_and_mode(path: Path | str, st: os.stat_result, what: str, wanted: str) -> None:
    if st.st_uid != os.geteuid():
        raise KeystoreError(f"keystore {what} {path} belongs to uid {st.st_uid}, not to this user "
                            f"(uid {os.geteuid()}): refusing keys someone else made")
    mode = stat.S_IMODE(st.st_mode)
    if mode & _PRIVATE_MODE_BITS:
        raise KeystoreError(f"keystore {what} {path} has mode {mode:04o}: group and others must have no "
                            f"access (chmod {wanted} {path})")
