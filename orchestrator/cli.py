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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from .errors import ScopegraphError
from .loader import load_object, load_workflow
from .store import DEFAULT_STORE_URL

DEMO_TARGET = "scopegraph.agents.demo:workflow"
DEMO_TASK = "scopegraph.agents.demo:TASK"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PAUSED = 0, 1, 2, 3


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


@contextmanager
def _opened_store(args: argparse.Namespace, *, create: bool = True) -> Iterator[Any]:
    """The store ``--store`` names; commands that only read pass ``create=False``, so a
    mistyped URL is an error (``no store at …``) rather than a new, empty store."""
    from .store import open_store

    store = open_store(args.store, create=create)
    try:
        yield store
    finally:
        store.close()


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

    resume = sub.add_parser("resume", help="continue a paused or interrupted run")
    resume.add_argument("run_id")
    resume.add_argument("--json", action="store_true", help="print the run record as JSON")
    resume.add_argument("--workflow", dest="target", help="MODULE:ATTR (default: the one the run started with)")
    resume.add_argument("--traces", metavar="PATH", help="JSONL file for spans (see run)")

    submit = sub.add_parser("submit", help="queue a run for the workers (PostgreSQL store)")
    submit.add_argument("target", help="MODULE:ATTR or FILE.py:ATTR naming a Workflow")
    submit.add_argument("--task", required=True, help="the trusted task for the planner")
    submit.add_argument("--as", dest="initiator", default=_default_user(), help="who starts the run")
    submit.add_argument("--json", action="store_true", help='print {"run_id": ...}')

    worker = sub.add_parser("worker", help="take queued runs and answered approvals (PostgreSQL store)")
    worker.add_argument("--concurrency", type=int, default=1, help="runs driven at once (default 1)")
    worker.add_argument("--once", action="store_true", help="drain the queue, then exit")
    worker.add_argument("--stalled-after", type=float, default=30.0, metavar="SECONDS",
                        help="requeue the jobs of a worker silent this long (default 30)")
    worker.add_argument("--traces", metavar="PATH", help="JSONL file for spans (see run)")

    approvals = sub.add_parser("approvals", help="list or show approval requests")
    asub = approvals.add_subparsers(dest="approvals_command", required=True, parser_class=_Parser)
    alist = asub.add_parser("list", help="list approval requests")
    alist.add_argument("--run", help="only this run's")
    alist.add_argument("--status", choices=["pending", "approved", "denied", "expired", "consumed"])
    alist.add_argument("--all", action="store_true", help="every status (default: pending only)")
    alist.add_argument("--json", action="store_true")
    ashow = asub.add_parser("show", help="show one approval request")
    ashow.add_argument("approval_id")
    ashow.add_argument("--json", action="store_true")

    approve = sub.add_parser("approve", help="approve exactly one pending call")
    approve.add_argument("approval_id")
    approve.add_argument("--as", dest="approver", required=True, help="your name")
    approve.add_argument("--reason", default="")
    approve.add_argument("--json", action="store_true")

    deny = sub.add_parser("deny", help="deny one pending call")
    deny.add_argument("approval_id")
    deny.add_argument("--as", dest="approver", required=True, help="your name")
    deny.add_argument("--reason", required=True)
    deny.add_argument("--propose", metavar="JSON",
                      help="propose other values for some arguments (the rest stay as requested): "
                           "a new call, decided and approved anew")
    deny.add_argument("--json", action="store_true")

    audit = sub.add_parser("audit", help="audit ledger commands")
    audsub = audit.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    verify = audsub.add_parser("verify", help="verify the ledger's hash chain and signed head")
    verify.add_argument("--run", help="also require records of this run")
    verify.add_argument("--json", action="store_true")

    trace_cmd = sub.add_parser("trace", help="show a run as a tree: identities, decisions, approvals")
    trace_cmd.add_argument("run_id")
    trace_cmd.add_argument("--json", action="store_true")

    report = sub.add_parser("report", help="granted versus used, denials, approvals, proposed narrowing")
    report.add_argument("--workflow", help="only this workflow")
    report.add_argument("--json", action="store_true")

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
    p.add_argument("--traces", metavar="PATH",
                   help="JSONL file for spans when no OTLP exporter is configured "
                        "(default: traces.jsonl beside the SQLite store)")
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
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("demo", "run", "resume"):
        shutdown = _telemetry(args)
        try:
            if args.command == "demo":
                return _run(DEMO_TARGET, _demo_task(), args)
            if args.command == "run":
                return _run(args.target, args.task, args)
            return _resume(args)
        finally:
            shutdown()
    if args.command == "submit":
        return _submit(args)
    if args.command == "worker":
        return _worker(args)
    if args.command == "approvals":
        return _approvals(args)
    if args.command in ("approve", "deny"):
        return _answer(args)
    if args.command == "audit":
        return _audit_verify(args)
    if args.command == "trace":
        return _trace(args)
    if args.command == "report":
        return _report(args)
    if args.command == "bundle":
        return _bundle(args)
    if args.command == "policy":
        return _policy_validate(args)
    raise UsageError(f"scopegraph: unknown command {args.command!r}")  # pragma: no cover


def _telemetry(args: argparse.Namespace) -> Any:
    """Spans go to OTLP when ``OTEL_*`` says so, else to a JSONL file beside the store."""
    from .telemetry import configure

    path = args.traces
    if path is None and args.store.startswith("sqlite:///"):
        path = os.path.join(os.path.dirname(args.store[len("sqlite:///"):]) or ".", "traces.jsonl")
    return configure(jsonl_path=path or None)


def _demo_task() -> str:
    # Loaded by name like any user workflow: the runtime never imports ``scopegraph.agents``.
    return str(load_object(DEMO_TASK))


def _run(target: str, task: str, args: argparse.Namespace) -> int:
    from .runtime import Runtime

    workflow = load_workflow(target)
    with Runtime(workflow, store=args.store, target=target) as rt:
        report = rt.run(task, initiator=args.initiator)
        if report.status == "paused" and _interactive():
            print(report.summary())
            report = _prompt_and_resume(rt, report)
    return _print_report(report, args.json)


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _prompt_and_resume(rt: Any, report: Any) -> Any:
    """Ask about each pending approval at the terminal, then resume; repeat while answered."""
    from .prompt import prompt_for

    while report.status == "paused":
        pending = rt.approvals.list(run_id=report.run_id, status="pending")
        answered = [prompt_for(rt.approvals, a, out=sys.stdout) for a in pending]
        if not any(answered):
            break
        report = rt.resume(report.run_id)
    return report


def _print_report(report: Any, as_json: bool) -> int:
    print(report.model_dump_json(indent=2) if as_json else report.summary())
    return int(report.exit_code)


def _resume(args: argparse.Namespace) -> int:
    from .runtime import Runtime

    with _opened_store(args) as store:
        record = store.get_run(args.run_id)
    if record is None:
        raise ScopegraphError(f"unknown run {args.run_id!r}")
    target = args.target or record.target
    with Runtime(load_workflow(target), store=args.store, target=target) as rt:
        report = rt.resume(args.run_id)
        if report.status == "paused" and _interactive() and not args.json:
            report = _prompt_and_resume(rt, report)
    return _print_report(report, args.json)


def _approval_service(args: argparse.Namespace, *, create: bool = True) -> Any:
    from .approvals import ApprovalService
    from .clock import SystemClock
    from .ledger import Ledger
    from .store import open_store

    store = open_store(args.store, create=create)
    clock = SystemClock()
    return store, ApprovalService(store, clock=clock, ledger=Ledger(store, clock=clock))


def _approvals(args: argparse.Namespace) -> int:
    from .prompt import describe

    store, service = _approval_service(args, create=False)
    try:
        now = service.clock.now()
        if args.approvals_command == "show":
            a = service.get(args.approval_id)
            if args.json:
                print(json.dumps({**a.model_dump(mode="json"), "status": a.effective_status(now)}, indent=2))
            else:
                print(describe(a.model_copy(update={"status": a.effective_status(now)})))
            return EXIT_OK
        status = None if args.all else (args.status or "pending")
        items = service.list(run_id=args.run, status=status)
        if args.json:
            print(json.dumps([{**a.model_dump(mode="json"), "status": a.effective_status(now)}
                              for a in items], indent=2))
        elif not items:
            print("no approval requests" + (f" with status {status}" if status else ""))
        else:
            for a in items:
                print(f"{a.id}  {a.effective_status(now):<9} run {a.run_id}  step {a.step_id}  "
                      f"{a.tool}({json.dumps(a.arguments, sort_keys=True)})")
        return EXIT_OK
    finally:
        store.close()


def _submit(args: argparse.Namespace) -> int:
    from .workers import submit

    run_id = submit(args.target, args.task, args.initiator, args.store)
    print(json.dumps({"run_id": run_id}) if args.json else run_id)
    return EXIT_OK


def _worker(args: argparse.Namespace) -> int:
    from .errors import StoreError
    from .workers import Worker

    if args.concurrency < 1:
        raise UsageError("scopegraph worker: --concurrency must be at least 1")
    worker = Worker(args.store, concurrency=args.concurrency, stalled_after=args.stalled_after)
    shutdown = _telemetry(args)
    def outage(exc: StoreError, wait: float) -> None:
        print(f"scopegraph: worker: {exc}; no work until it is back, retrying in {wait:.1f} s",
              file=sys.stderr, flush=True)

    try:
        worker.run(once=args.once, on_outage=outage)
    except StoreError as exc:  # fail closed: no store, no work
        print(f"scopegraph: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        shutdown()
    return EXIT_OK


def _answer(args: argparse.Namespace) -> int:
    store, service = _approval_service(args)
    try:
        if args.command == "approve":
            a = service.approve(args.approval_id, approver=args.approver, reason=args.reason)
        else:
            propose = None
            if args.propose is not None:
                try:
                    propose = json.loads(args.propose)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"scopegraph: --propose is not valid JSON: {exc.msg}") from None
                if not isinstance(propose, dict):
                    raise UsageError("scopegraph: --propose must be a JSON object of arguments")
            a = service.deny(args.approval_id, approver=args.approver, reason=args.reason, propose=propose)
    finally:
        store.close()
    queued = a.status != "pending" and _queue_resume(args.store, a.run_id)
    if args.json:
        print(json.dumps({"id": a.id, "status": a.status, "digest": a.digest,
                          "approvers": a.approvers, "run_id": a.run_id, "resume_queued": queued}))
    else:
        left = a.required_approvals - len(a.approvers)
        more = f"; {left} more approver(s) needed" if a.status == "pending" else ""
        then = "A worker will resume the run." if queued else f"Continue the run with: scopegraph resume {a.run_id}"
        print(f"{a.id} {a.status}{more}. {then}")
    return EXIT_OK


def _queue_resume(store_url: str, run_id: str) -> bool:
    """On a PostgreSQL store served by workers, queue the run's resume; the answer stands either way."""
    from .errors import StoreError
    from .workers import enqueue_resume

    try:
        return enqueue_resume(store_url, run_id)
    except StoreError as exc:  # workers also find answered runs by polling the store
        print(f"scopegraph: warning: the resume was not queued ({exc})", file=sys.stderr)
        return False


def _audit_verify(args: argparse.Namespace) -> int:
    from .clock import SystemClock
    from .ledger import Ledger

    with _opened_store(args, create=False) as store:
        result = Ledger(store, clock=SystemClock()).verify(run_id=args.run)
    if args.json:
        print(json.dumps(result.to_dict()))
    elif result.ok:
        tail = f" ({result.unsigned} newer record(s) chained, not yet signed)" if result.unsigned else ""
        print(f"ok: {result.records} records, hash chain intact, head signed at record {result.signed_seq}{tail}")
    else:
        print(f"TAMPERED: {result.problem}")
    return EXIT_OK if result.ok else EXIT_FAILED


def _trace(args: argparse.Namespace) -> int:
    from .trace_view import build_trace, render_trace

    with _opened_store(args, create=False) as store:
        view = build_trace(store, args.run_id)
    print(json.dumps(view, indent=2) if args.json else render_trace(view))
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from .usage_report import build_report, render_report

    with _opened_store(args, create=False) as store:
        view = build_report(store, workflow=args.workflow)
    print(json.dumps(view, indent=2) if args.json else render_report(view))
    return EXIT_OK


def _bundle(args: argparse.Namespace) -> int:
    from .identity import TrustDomain

    workflow = load_workflow(args.target)
    with _opened_store(args, create=False) as store:
        print(TrustDomain(workflow.trust_domain, store).bundle().jwks_json())
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
