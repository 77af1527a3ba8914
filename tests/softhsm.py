"""SoftHSM2 for the PKCS#11 tests: one token directory per test session, a fresh token per test.

SoftHSM reads ``SOFTHSM2_CONF`` when the module is initialised, once per process; so the
configuration is set for the whole session, and after ``softhsm2-util`` adds a token the
module is re-initialised (no keystore session may be open then) to see it. A missing
SoftHSM2 fails these tests instead of skipping them: ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
USER_PIN = "4321-user"
SO_PIN = "8765-so"


@dataclass(frozen=True)
class SoftHsm:
    module: str
    conf: Path

    def new_token(self) -> str:
        """Initialise a fresh token; returns its label."""
        label = f"t-{uuid.uuid4().hex[:12]}"
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                        "--pin", USER_PIN, "--so-pin", SO_PIN],
                       check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
                       timeout=60)
        import pkcs11

        os.environ["SOFTHSM2_CONF"] = str(self.conf)  # another module's SoftHSM may have set its own
        pkcs11.lib(self.module).reinitialize()  # the module lists tokens as of its initialisation
        return label


@contextmanager
def softhsm(tmp_dir: Path) -> Iterator[SoftHsm]:
    missing = [what for what, ok in ((SOFTHSM_MODULE, os.path.exists(SOFTHSM_MODULE)),
                                     ("softhsm2-util", shutil.which("softhsm2-util") is not None)) if not ok]
    if missing:
        pytest.fail(f"SoftHSM2 is not installed ({', '.join(missing)} missing): "
                    "apt-get install -y softhsm2 (.ci/run does this)")
    tokens = tmp_dir / "tokens"
    tokens.mkdir(parents=True)
    conf = tmp_dir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
                    "slots.removable = false\n")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield SoftHsm(module=SOFTHSM_MODULE, conf=conf)
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
