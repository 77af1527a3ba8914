"""The ``scopegraph`` command.

Exit codes: 0 ok; 1 a run ended denied or failed (or a check failed); 2 bad usage or
input; 3 paused waiting for approval. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import ScopegraphError
from .loader import load_object, load_workflow
from .store import DEFAULT_STORE_URL

DEMO_TARGET = "agents.demo:workflow"
DEMO_TASK = "agents.demo:TASK"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PAUSED = 0, 1, 2, 3


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "anonymous"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scopegraph", description="Multi-agent workflows with request-time scoping.")
    parser.add_argument("--store", default=os.environ.get("SCOPEGRAPH_STORE", DEFAULT_STORE_URL),
                        help=f"store URL (default: $SCOPEGRAPH_STORE or {DEFAULT_STORE_URL})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="run the bundled expenses demo offline")
    _run_options(demo)

    run = sub.add_parser("run", help="run a workflow: scopegraph run MODULE:ATTR --task TEXT")
    run.add_argument("target", help="MODULE:ATTR or FILE.py:ATTR naming a Workflow")
    run.add_argument("--task", required=True, help="the trusted task for the planner")
    _run_options(run)

    bundle = sub.add_parser("bundle", help="print the trust bundle's public keys")
    bundle.add_argument("target", nargs="?", default=DEMO_TARGET,
                        help="workflow whose trust domain to show (default: the demo)")
    bundle.add_argument("--jwks", action="store_true", required=True, help="print as a JWKS")

    policy = sub.add_parser("policy", help="policy commands")
    psub = policy.add_subparsers(dest="policy_command", required=True, parser_class=_Parser)
    validate = psub.add_parser("validate", help="validate Cedar policy files against the schema")
    validate.add_argument("paths", nargs="*", help="policy files or directories (default: the baseline)")
    validate.add_argument("--workflow", help="MODULE:ATTR whose tools type the arguments")
    validate.add_argument("--json", action="store_true")
    return parser


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the run record as JSON")
    p.add_argument("--as", dest="initiator", default=_default_user(), help="who starts the run")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _dispatch(args)
    except UsageError as exc:
        print(f"{exc}", file=sys.stderr)
        return EXIT_USAGE
    except ScopegraphError as exc:
        print(f"scopegraph: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("scopegraph: interrupted", file=sys.stderr)
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _run(DEMO_TARGET, _demo_task(), args)
    if args.command == "run":
        return _run(args.target, args.task, args)
    if args.command == "bundle":
        return _bundle(args)
    if args.command == "policy":
        return _policy_validate(args)
    raise UsageError(f"scopegraph: unknown command {args.command!r}")  # pragma: no cover


def _demo_task() -> str:
    # Loaded by name like any user workflow: the runtime never imports ``agents``.
    return str(load_object(DEMO_TASK))


def _run(target: str, task: str, args: argparse.Namespace) -> int:
    from .runtime import Runtime

    workflow = load_workflow(target)
    with Runtime(workflow, store=args.store, target=target) as rt:
        report = rt.run(task, initiator=args.initiator)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(report.summary())
    return report.exit_code


def _bundle(args: argparse.Namespace) -> int:
    from .identity import TrustDomain
    from .store import open_store

    workflow = load_workflow(args.target)
    store = open_store(args.store)
    try:
        print(TrustDomain(workflow.trust_domain, store).bundle().jwks_json())
    finally:
        store.close()
    return EXIT_OK


def _policy_validate(args: argparse.Namespace) -> int:
    from .policy import CedarPolicyEngine
    from .tools import ToolRegistry

    tools = load_workflow(args.workflow).registry if args.workflow else ToolRegistry()
    engine = CedarPolicyEngine.from_paths(args.paths or None, tools)
    out: dict[str, Any] = {"valid": True, "files": list(engine.files), "version": engine.version}
    print(json.dumps(out) if args.json else f"ok: {len(engine.files)} file(s) valid, version {engine.version}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
