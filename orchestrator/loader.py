"""Loading a user's workflow from ``MODULE:ATTR`` or ``path/to/file.py:ATTR``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .workflow import Workflow


def load_workflow(target: str) -> Workflow:
    """Import ``target`` and return the workflow it names.

    ``ATTR`` may be a ``Workflow`` or a callable taking no arguments that returns one.

    Raises:
        ConfigError: the target is malformed, cannot be imported, or is not a workflow.
    """
    obj = load_object(target)
    if callable(obj) and not isinstance(obj, Workflow):
        try:
            obj = obj()
        except Exception as exc:
            raise ConfigError(f"{target!r} failed to build a workflow: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, Workflow):
        raise ConfigError(f"{target!r} is a {type(obj).__name__}, not a Workflow")
    return obj


def load_object(target: str) -> Any:
    """Import ``MODULE:ATTR`` (or ``FILE.py:ATTR``) and return the attribute.

    Raises:
        ConfigError: the target is malformed, cannot be imported, or lacks the attribute.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"workflow target {target!r} must look like MODULE:ATTR or FILE.py:ATTR")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"workflow file {module_name!r} does not exist")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or spec.loader is None:
                raise ConfigError(f"cannot load workflow file {module_name!r}")
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj
