"""Where scopegraph's private keys live: a file keystore or a PKCS#11 token, never the store.

``open_keystore`` picks one from ``$SCOPEGRAPH_KEYSTORE``: a ``pkcs11:`` URI opens a
token (``python-pkcs11``, the ``pkcs11`` extra), anything else is a directory for the
file keystore (default ``.scopegraph/keys/``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .base import (
    PURPOSE_ALGORITHM,
    PURPOSES,
    Algorithm,
    Keystore,
    Purpose,
    Signer,
    VerificationKey,
    check_purpose,
    find_key,
    jwk_thumbprint,
    jwks,
)
from .file_keystore import KEYSTORE_ENV, PASSPHRASE_ENV, FileKeystore
from .signing import sign_certificate, sign_jwt

__all__ = [
    "KEYSTORE_ENV", "PASSPHRASE_ENV", "PURPOSES", "PURPOSE_ALGORITHM", "Algorithm", "FileKeystore", "Keystore",
    "Purpose", "Signer", "VerificationKey", "check_purpose", "find_key", "jwk_thumbprint", "jwks",
    "open_keystore", "sign_certificate", "sign_jwt",
]


def open_keystore(default_directory: Path | str, environ: Mapping[str, str] | None = None) -> Keystore:
    """The keystore ``$SCOPEGRAPH_KEYSTORE`` names, or the file keystore in ``default_directory``.

    Raises:
        KeystoreError: the keystore cannot be opened safely (see each implementation).
    """
    env = os.environ if environ is None else environ
    location = env.get(KEYSTORE_ENV, "")
    if location.startswith("pkcs11:"):
        from .pkcs11_keystore import Pkcs11Keystore  # the optional dependency, only when asked for

        return Pkcs11Keystore.from_uri(location, env)
    return FileKeystore.from_env(default_directory, env)
