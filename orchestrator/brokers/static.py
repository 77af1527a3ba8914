"""Static secrets, contained: secrets no broker can make per step (an API key, a password).

A tool declares one with ``static_secret("api_key", name="billing")``; a secret source
(the environment, or a directory of files kept like the keystore's) supplies its value
after the gateway allowed a call, and only to the tools that declare it. The value
never enters the arguments the executor proposes, the catalogue a planner sees, the
store, a span or the ledger, and the gateway scrubs it from the tool's error messages.
A static secret cannot be revoked when the step ends (the source only stops handing it
out), which is why the least privilege report proposes moving it behind a broker.
"""

from __future__ import annotations

import os
import re
import stat
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..errors import SecretError, ToolError
from .base import Credential, Issued, SecretKind, SecretSpec, StepScope

ENV_PREFIX = "SCOPEGRAPH_SECRET_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


@dataclass(frozen=True, kw_only=True)
class StaticSecretSpec(SecretSpec):
    """A tool parameter that receives the static secret ``name`` from source ``broker``."""

    name: str
    kind_name: ClassVar[str] = "static secret"

    def check_tool(self, tool: str, arguments: Sequence[str], risk: str) -> None:
        if not _NAME.match(self.name):
            raise ToolError(f"tool {tool!r}: invalid secret name {self.name!r}: use letters, digits, '_', '.', '-'")

    def describe(self) -> str:
        return f"static secret {self.name!r} from {self.broker!r}"


def static_secret(param: str, *, name: str | None = None, source: str = "env") -> StaticSecretSpec:
    """Declare that the tool's parameter ``param`` receives the static secret ``name``
    (default: the parameter's name) from the secret source called ``source``."""
    return StaticSecretSpec(param=param, broker=source, name=name or param)


class StaticSecret(Credential):
    """A static secret as its tool receives it; ``danger_value`` is the secret itself."""

    def __init__(self, *, handle: str, name: str, value: str) -> None:
        self.handle = handle
        self.name = name
        self._value = value

    def danger_value(self) -> str:
        """The secret. Never log, trace or return it."""
        return self._value

    def scrub_values(self) -> tuple[str, ...]:
        return (self._value,)


class _StaticSource(ABC):
    kind: SecretKind = "static"

    def accepts(self, spec: SecretSpec) -> bool:
        return isinstance(spec, StaticSecretSpec)

    def issue(self, spec: SecretSpec, scope: StepScope, *, handle: str) -> Issued:
        if not isinstance(spec, StaticSecretSpec):
            raise SecretError(f"{type(self).__name__} cannot issue {spec.describe()}")
        where, value = self._read(spec.name)
        if not value:
            raise SecretError(f"static secret {spec.name!r} is empty in {where}")
        return Issued(credential=StaticSecret(handle=handle, name=spec.name, value=value), principal=where,
                      detail={"secret": spec.name})

    def revoke(self, handle: str, principal: str) -> None:
        """Nothing downstream to destroy: the source simply hands the value to no one else."""
        return None

    def leftovers(self) -> list[tuple[str, str]]:
        return []

    @abstractmethod
    def _read(self, name: str) -> tuple[str, str]:
        """The secret ``name`` and where it came from."""


class EnvSecretSource(_StaticSource):
    """Static secrets from environment variables: ``name`` is read from
    ``SCOPEGRAPH_SECRET_<NAME>`` (upper case, ``.`` and ``-`` as ``_``)."""

    def __init__(self, *, prefix: str = ENV_PREFIX, environ: Mapping[str, str] | None = None) -> None:
        self.prefix = prefix
        self._environ = environ

    def variable(self, name: str) -> str:
        return self.prefix + re.sub(r"[^A-Z0-9_]", "_", name.upper())

    def _read(self, name: str) -> tuple[str, str]:
        var = self.variable(name)
        env = os.environ if self._environ is None else self._environ
        value = env.get(var)
        if value is None:
            raise SecretError(f"static secret {name!r} is not set: export {var}")
        return f"env:{var}", value

    def __repr__(self) -> str:
        return f"EnvSecretSource(prefix={self.prefix!r})"


class FileSecretSource(_StaticSource):
    """Static secrets as files in a directory only its owner can read (the keystore's rules):
    the directory ``0700``, each file ``0600``, both owned by this user, no symlinks. The
    file ``<directory>/<name>`` holds the secret (one trailing newline is dropped)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def _read(self, name: str) -> tuple[str, str]:
        where = f"file:{self.directory / name}"
        _check_private(self.directory, directory=True)
        path = self.directory / name
        try:
            _check_private(path, directory=False)
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SecretError(f"static secret {name!r} is not in {str(self.directory)!r}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretError(f"static secret {name!r} cannot be read from {str(self.directory)!r}: "
                              f"{type(exc).__name__}") from None
        return where, text[:-1] if text.endswith("\n") else text

    def __repr__(self) -> str:
        return f"FileSecretSource({str(self.directory)!r})"


def _check_private(path: Path, *, directory: bool) -> None:
    """Refuse a path others can read or that is not ours (the keystore's rule).

    Raises:
        SecretError: a symlink, the wrong type, another owner, or group/other permissions.
        FileNotFoundError: nothing is there.
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise SecretError(f"secret path {str(path)!r} is a symlink; refused")
    if directory != stat.S_ISDIR(st.st_mode):
        raise SecretError(f"secret path {str(path)!r} is not a {'directory' if directory else 'file'}")
    if st.st_uid != os.geteuid():
        raise SecretError(f"secret path {str(path)!r} belongs to another user; refused")
    if st.st_mode & 0o077:
        raise SecretError(f"secret path {str(path)!r} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                          f"chmod {'700' if directory else '600'} it")
