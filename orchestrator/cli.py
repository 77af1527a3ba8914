"""The ``scopegraph`` command.

Exit codes: 0 ok; 1 a run ended denied or failed (or a check failed); 2 bad usage or
input; 3 paused waiting for approval; 130 interrupted (Ctrl-C) at the approval prompt,
the run still paused. Errors are one line on stderr, never a traceback.
Global options (``--store``) go before or after the subcommand. With ``--json``, stdout
holds only JSON (timestamps as epoch seconds and ISO 8601); anything for people (the
approval prompt, the summary before it, what to do after exit 3) goes to stderr.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import shlex
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TextIO

from .errors import ScopegraphError
from .loader import load_object, load_workflow
from .store import DEFAULT_STORE_URL
from .timestamps import with_iso_times

DEMO_TARGET = "scopegraph.agents.demo:workflow"
DEMO_TASK = "scopegraph.agents.demo:TASK"
DEMO_ENROL = "scopegraph.agents.demo:enrol_approvers"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PAUSED = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class UsageError(Exception):
    pass


class PausedAtPrompt(Exception):
    """Ctrl-C at the approval prompt: the run stays paused; the message says how to go on."""


class _Parser(argparse.ArgumentParser):
    """Every parser, the top one and each subcommand's, takes the global options.

    Their defaults are ``SUPPRESS``: a value given after the subcommand is not overwritten
    by a default, and one given before it still counts. ``_resolve_globals`` fills in
    the defaults after parsing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--store", default=argparse.SUPPRESS, metavar="URL",
                          help=f"store URL (default: $SCOPEGRAPH_STORE or {DEFAULT_STORE_URL})")

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _resolve_globals(args: argparse.Namespace) -> argparse.Namespace:
    args.store_given = hasattr(args, "store")
    if not args.store_given:
        args.store = os.environ.get("SCOPEGRAPH_STORE", DEFAULT_STORE_URL)
    return args


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scopegraph")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _seconds_option(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds above 0")
    return value


def _count_option(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


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


def _initiator(name: str) -> Any:
    """Who starts a run from the command line: the operating-system user (``--as`` by default),
    or the name ``--as`` gives, recorded as given on the command line."""
    from .approvers import Principal, os_principal

    me = os_principal()
    return me if me.is_(name) else Principal.of(name, authenticated_by="command-line")


def _default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "anonymous"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scopegraph", description="Multi-agent workflows with request-time scoping.")
    parser.add_argument("--version", action="version", version=f"scopegraph {_version()}")
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
    _progress_option(resume)

    submit = sub.add_parser("submit", help="queue a run for the workers (PostgreSQL store)")
    submit.add_argument("target", help="MODULE:ATTR or FILE.py:ATTR naming a Workflow")
    submit.add_argument("--task", required=True, help="the trusted task for the planner")
    submit.add_argument("--as", dest="initiator", default=_default_user(), help="who starts the run")
    submit.add_argument("--json", action="store_true", help='print {"run_id": ...}')

    worker = sub.add_parser("worker", help="take queued runs and answered approvals (PostgreSQL store)")
    worker.add_argument("--concurrency", type=_count_option, default=1, help="runs driven at once (default 1)")
    worker.add_argument("--once", action="store_true", help="drain the queue, then exit")
    worker.add_argument("--stalled-after", type=_seconds_option, default=30.0, metavar="SECONDS",
                        help="requeue the jobs of a worker silent this long (default 30)")
    worker.add_argument("--traces", metavar="PATH", help="JSONL file for spans (see run)")
    worker.add_argument("--quiet", action="store_true",
                        help="do not print a line (on stdout) per run started, paused or finished")

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
    approve.add_argument("--key", metavar="PATH", help="your Ed25519 private key, to sign the answer when "
                         "approvers are enrolled (default: $SCOPEGRAPH_APPROVER_KEY)")
    approve.add_argument("--json", action="store_true")

    deny = sub.add_parser("deny", help="deny one pending call")
    deny.add_argument("approval_id")
    deny.add_argument("--as", dest="approver", required=True, help="your name")
    deny.add_argument("--reason", required=True)
    deny.add_argument("--propose", metavar="JSON",
                      help="propose other values for some arguments (the rest stay as requested): "
                           "a new call, decided and approved anew")
    deny.add_argument("--key", metavar="PATH", help="your Ed25519 private key, to sign the answer when "
                      "approvers are enrolled (default: $SCOPEGRAPH_APPROVER_KEY)")
    deny.add_argument("--json", action="store_true")

    audit = sub.add_parser("audit", help="audit ledger commands")
    audsub = audit.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    verify = audsub.add_parser("verify", help="verify the ledger's hash chain and signed head")
    verify.add_argument("--run", help="also require records of this run")
    verify.add_argument("--witness", metavar="FILE",
                        help="check against this copy of the witness (default: the store's own witness file)")
    verify.add_argument("--json", action="store_true")

    keys = sub.add_parser("keys", help="the keystore's signing keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    rotate = ksub.add_parser("rotate", help="make new current keys; the previous ones still verify")
    rotate.add_argument("--purpose", choices=["grant", "svid", "ledger", "all"], default="all")
    rotate.add_argument("--json", action="store_true")
    klist = ksub.add_parser("list", help="list current and previous public keys")
    klist.add_argument("--json", action="store_true")

    approvers = sub.add_parser("approvers", help="enrol approvers with their public keys")
    apsub = approvers.add_subparsers(dest="approvers_command", required=True, parser_class=_Parser)
    apadd = apsub.add_parser("add", help="enrol NAME: from then on answers must be signed")
    apadd.add_argument("name")
    apadd.add_argument("--key", required=True, metavar="PUBKEY",
                       help="Ed25519 public key: PEM, an 'ssh-ed25519 AAAA…' line, or a file holding one")
    apadd.add_argument("--json", action="store_true")
    aplist = apsub.add_parser("list", help="list enrolled approvers")
    aplist.add_argument("--all", action="store_true", help="removed ones too")
    aplist.add_argument("--json", action="store_true")
    apinvite = apsub.add_parser("invite", help="print a one-time link for NAME to enrol a passkey in the inbox")
    apinvite.add_argument("name")
    apinvite.add_argument("--ttl", type=_seconds_option, default=900.0, metavar="SECONDS",
                          help="how long the link works (default 900, at most a day); it works once")
    apinvite.add_argument("--url", default="http://localhost:8700", metavar="URL",
                          help="the inbox's address, as 'serve --public-url' (default http://localhost:8700)")
    apinvite.add_argument("--json", action="store_true")
    apremove = apsub.add_parser("remove", help="end NAME's enrolment (past answers still verify)")
    apremove.add_argument("name")
    apremove.add_argument("--json", action="store_true")

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
    validate.add_argument("paths", nargs="*",
                          help="policy files or directories, checked together with the shipped baseline "
                               "(default: the workflow's policies, or the baseline alone)")
    validate.add_argument("--workflow", help="MODULE:ATTR whose tools type the arguments")
    validate.add_argument("--no-baseline", dest="baseline", action="store_false",
                          help="check PATHS alone, as Workflow(policies=PATHS, baseline=False) loads them")
    validate.add_argument("--json", action="store_true")

    serve = sub.add_parser("serve", help="serve the approval inbox, token exchange and introspection over HTTP")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8700, help="port to listen on (default 8700)")
    serve.add_argument("--audience", action="append", default=[], metavar="AUDIENCE=TOOL[,TOOL...]",
                       help="a downstream audience step grants may be exchanged for, and the tools whose "
                            "grants may ('*': any); repeat for more")
    serve.add_argument("--client", action="append", default=[], metavar="ID=AUDIENCE[,AUDIENCE...]",
                       help="a resource server that may introspect tokens of these audiences (tool:NAME for "
                            "a step grant); its secret is read from $SCOPEGRAPH_CLIENT_SECRET_<ID>")
    serve.add_argument("--token-ttl", type=_seconds_option, default=60.0, metavar="SECONDS",
                       help="lifetime of exchanged tokens, never past their grant (default 60)")
    serve.add_argument("--token-uses", type=_count_option, default=10, metavar="N",
                       help="introspections an exchanged token answers active (default 10)")
    serve.add_argument("--public-url", metavar="URL",
                       help="the inbox's address as browsers reach it (default http://localhost:PORT, https with "
                            "TLS); its host name is the passkeys' relying party")
    serve.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    serve.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    serve.add_argument("--dangerously-serve-http", dest="plain_http", action="store_true",
                       help="allow plain HTTP on a non-loopback address (only behind a proxy that terminates TLS)")
    serve.add_argument("--webhook", action="append", default=[], metavar="URL",
                       help="POST each approval event (request created, answered, expired) to URL, signed "
                            "with $SCOPEGRAPH_WEBHOOK_SECRET; repeat for more")

    init = sub.add_parser("init", help="scaffold a workflow module, a starter policy and a test")
    init.add_argument("dir", nargs="?", default=".", help="where to write them (default: here)")
    return parser


def _progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show the run's progress on stderr (default: when stderr is a terminal)")


def _progress(args: argparse.Namespace) -> Any:
    """The listener that draws a run's events on stderr, one line each, or ``None``."""
    shown = args.progress if args.progress is not None else sys.stderr.isatty()
    if not shown:
        return None
    from .run_events import describe

    lock = threading.Lock()  # parallel steps report from threads of their own

    def show(event: Any) -> None:
        with lock:
            print(f"scopegraph: {describe(event)}", file=sys.stderr, flush=True)

    return show


def _run_options(p: argparse.ArgumentParser) -> None:
    _progress_option(p)
    p.add_argument("--json", action="store_true", help="print the run record as JSON")
    p.add_argument("--traces", metavar="PATH",
                   help="JSONL file for spans when no OTLP exporter is configured "
                        "(default: traces.jsonl beside the SQLite store)")
    p.add_argument("--as", dest="initiator", default=_default_user(), help="who starts the run")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _resolve_globals(build_parser().parse_args(argv))
        return _dispatch(args)
    except SystemExit as exc:  # --help and --version print, then exit 0
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except UsageError as exc:
        print(f"{exc}", file=sys.stderr)
        return EXIT_USAGE
    except ScopegraphError as exc:
        print(f"scopegraph: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PausedAtPrompt as exc:
        print(f"scopegraph: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
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
    if args.command in ("keys", "approvers"):
        from .cli_trust import approvers_command, keys_command

        run = keys_command if args.command == "keys" else approvers_command
        return run(args, _print_json)
    if args.command == "trace":
        return _trace(args)
    if args.command == "report":
        return _report(args)
    if args.command == "bundle":
        return _bundle(args)
    if args.command == "policy":
        return _policy_validate(args)
    if args.command == "init":
        return _init(args)
    if args.command == "serve":
        return _serve(args)
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
        if target == DEMO_TARGET:  # the demo's approvers, enrolled with keys made beside its store
            load_object(DEMO_ENROL)(rt)
        report = rt.run(task, initiator=_initiator(args.initiator), on_event=_progress(args))
        terminal = _prompt_stream(args.json)
        if report.status == "paused" and terminal is not None:
            print(report.summary(), file=terminal)
            report = _prompt_and_resume(rt, report, terminal)
    return _print_report(report, args)


def _prompt_stream(as_json: bool) -> TextIO | None:
    """Where the approval prompt talks, or ``None`` when nobody is at a terminal.

    With ``--json`` stdout holds only JSON, so the prompt uses stderr, on a terminal too.
    """
    out = sys.stderr if as_json else sys.stdout
    return out if sys.stdin.isatty() and out.isatty() else None


def _prompt_and_resume(rt: Any, report: Any, out: TextIO) -> Any:
    """Ask about each pending approval at the terminal, then resume; repeat while answered.

    Raises:
        PausedAtPrompt: Ctrl-C at the prompt; the run is still paused.
    """
    from .cli_trust import prompt_key_finder
    from .prompt import prompt_for

    nothing_pending = False
    while report.status == "paused":
        pending = rt.approvals.list(run_id=report.run_id, status="pending")
        try:
            answered = [prompt_for(rt.approvals, a, out=out, key_for=prompt_key_finder(rt.store)) for a in pending]
        except KeyboardInterrupt:
            raise PausedAtPrompt(_still_paused(rt, report.run_id)) from None
        # Nothing pending: answered elsewhere before the prompt asked; the run can go on (once).
        if (pending and not any(answered)) or (not pending and nothing_pending):
            return rt.report(report.run_id)  # read again: answers given elsewhere show as they are
        nothing_pending = not pending
        report = rt.resume(report.run_id)
    return report


def _still_paused(rt: Any, run_id: str) -> str:
    store = "" if rt.store.url == os.environ.get("SCOPEGRAPH_STORE", DEFAULT_STORE_URL) \
        else f" --store {shlex.quote(rt.store.url)}"
    return (f"interrupted; run {run_id} is still paused: answer with `scopegraph{store} approvals list "
            f"--run {run_id}` and `scopegraph{store} approve|deny ID --as NAME`, then continue with "
            f"`scopegraph{store} resume {run_id}`")


def _print_report(report: Any, args: argparse.Namespace) -> int:
    if args.json:
        _print_json(report.model_dump(mode="json"))
    else:
        print(report.summary())
    if report.status == "paused":
        _print_next_steps(report, args)
    return int(report.exit_code)


def _print_json(value: Any, *, indent: int | None = 2) -> None:
    """The one way JSON reaches stdout: epoch timestamps get ISO 8601 twins."""
    print(json.dumps(with_iso_times(value), indent=indent))


def _print_next_steps(report: Any, args: argparse.Namespace) -> None:
    """After exit 3, on stderr: the exact commands that answer the approvals and resume the run."""
    cmd = "scopegraph" + _store_option(args)
    lines = [f"scopegraph: run {report.run_id} is paused, waiting for approval."]
    pending = [a["id"] for a in report.approvals if a.get("status") == "pending"]
    for aid in pending:
        lines += [f"  see the call:  {cmd} approvals show {aid}",
                  f"  approve it:    {cmd} approve {aid} --as NAME [--reason TEXT]",
                  f"  or deny it:    {cmd} deny {aid} --as NAME --reason TEXT"]
    lines.append(f"  then continue: {cmd} resume {report.run_id}")
    print("\n".join(lines), file=sys.stderr)


def _store_option(args: argparse.Namespace) -> str:
    """`` --store URL`` when the store was chosen on the command line; passwords shown as ``***``."""
    if not args.store_given or args.store == os.environ.get("SCOPEGRAPH_STORE", DEFAULT_STORE_URL):
        return ""
    shown = args.store
    if not shown.startswith("sqlite:"):  # a server URL may carry a password
        from .store.postgres import redact_url

        shown = redact_url(shown)
    return " --store " + shlex.quote(shown)


def _resume(args: argparse.Namespace) -> int:
    from .runtime import Runtime

    with _opened_store(args) as store:
        record = store.get_run(args.run_id)
    if record is None:
        raise ScopegraphError(f"unknown run {args.run_id!r}")
    target = args.target or record.target
    with Runtime(load_workflow(target), store=args.store, target=target) as rt:
        report = rt.resume(args.run_id, on_event=_progress(args))
        terminal = _prompt_stream(args.json)
        if report.status == "paused" and terminal is not None:
            report = _prompt_and_resume(rt, report, terminal)
    return _print_report(report, args)


def _approval_service(args: argparse.Namespace, *, create: bool = True) -> Any:
    from .approvals import ApprovalService
    from .clock import SystemClock
    from .ledger import Ledger
    from .store import open_store

    store = open_store(args.store, create=create)
    clock = SystemClock()
    return store, ApprovalService(store, clock=clock, ledger=Ledger(store, clock=clock))


def _approvals(args: argparse.Namespace) -> int:
    from .prompt import approval_json, describe, render_list

    store, service = _approval_service(args, create=False)
    try:
        now = service.clock.now()
        if args.approvals_command == "show":
            a = service.get(args.approval_id)
            if args.json:
                _print_json(approval_json(a, now))
            else:
                print(describe(a.model_copy(update={"status": a.effective_status(now)}), now))
            return EXIT_OK
        status = None if args.all else (args.status or "pending")
        items = service.list(run_id=args.run, status=status)
        if args.json:
            _print_json([approval_json(a, now) for a in items])
        elif not items:
            print("no approval requests" + (f" with status {status}" if status else ""))
        else:
            print(render_list(items, now))
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
    worker = Worker(args.store, concurrency=args.concurrency, stalled_after=args.stalled_after,
                    on_event=None if args.quiet else _print_event)
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


def _print_event(line: str) -> None:
    print(line, flush=True)


def _answer(args: argparse.Namespace) -> int:
    from .cli_trust import answer_key, signed

    store, service = _approval_service(args)
    try:
        request = service.get(args.approval_id)
        if args.key is not None and not service.signatures_required(request):
            raise UsageError(f"scopegraph {args.command}: --key given, but no approver is enrolled in this store "
                             "to check the signature against (scopegraph approvers add)")
        key = answer_key(store, args.approver, args.key) if service.signatures_required(request) else None
        signature = signed(service, request, approver=args.approver,
                           decision="approve" if args.command == "approve" else "deny", reason=args.reason, key=key)
        if args.command == "approve":
            a = service.approve(args.approval_id, approver=args.approver, reason=args.reason, signature=signature)
        else:
            propose = None
            if args.propose is not None:
                try:
                    propose = json.loads(args.propose)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"scopegraph: --propose is not valid JSON: {exc.msg}") from None
                if not isinstance(propose, dict):
                    raise UsageError("scopegraph: --propose must be a JSON object of arguments")
                _check_proposal(store, service, args.approval_id, propose)
            a = service.deny(args.approval_id, approver=args.approver, reason=args.reason, propose=propose,
                             signature=signature)
    finally:
        store.close()
    queued = a.status != "pending" and _queue_resume(args.store, a.run_id)
    if args.json:
        print(json.dumps({"id": a.id, "status": a.status, "digest": a.digest,
                          "approvers": a.approvers, "run_id": a.run_id, "resume_queued": queued,
                          "required_approvals": a.required_approvals, "still_needed": a.still_needed,
                          "answers": a.answers()}))
    elif a.status == "pending":
        # Resuming now would only pause again: say what is missing instead.
        print(f"{a.id} approved by {args.approver} ({len(set(a.approvers))} of {a.required_approvals}); "
              f"still pending: {a.still_needed} more approval(s) needed from another approver "
              f"({', '.join(x for x in a.allowed_approvers if x not in a.approvers) or 'nobody left'}).")
    else:
        then = "A worker will resume the run." if queued else f"Continue the run with: scopegraph resume {a.run_id}"
        print(f"{a.id} {a.status}. {then}")
    return EXIT_OK


def _check_proposal(store: Any, service: Any, approval_id: str, propose: dict[str, Any]) -> None:
    """Refuse a counter-proposal that cannot work, before anything is recorded: it must fit
    the tool's schema (from the workflow the run started with) and the step's constraints
    (from its grant in the ledger).

    Raises:
        ApprovalError: the proposal is refused (exit 2).
    """
    from .approvals import check_proposal, step_constraints
    from .errors import ConfigError, UnknownToolError

    a = service.get(approval_id)
    record = store.get_run(a.run_id)
    tool = None
    try:
        if record is None:
            raise ConfigError(f"run {a.run_id!r} is not in the store")
        tool = load_workflow(record.target).registry.get_tool(a.tool)
    except (ConfigError, UnknownToolError) as exc:
        print(f"scopegraph: warning: the proposal's types were not checked ({exc}); "
              "the run checks them when it resumes", file=sys.stderr)
    check_proposal(a, propose, tool=tool, constraints=step_constraints(service.ledger, a.run_id, a.step_id))


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
    from .trust import TrustRoots

    if args.witness is not None and not os.path.isfile(args.witness):
        raise UsageError(f"scopegraph audit verify: no witness file at {args.witness!r}")
    with _opened_store(args, create=False) as store:
        if args.run is not None and store.get_run(args.run) is None and not store.ledger_rows(run_id=args.run):
            raise UsageError(f"scopegraph audit verify: no such run {args.run!r}")
        clock = SystemClock()
        trust = TrustRoots.for_reading(store, clock=clock)
        try:
            result = Ledger(store, clock=clock, trust=trust).verify(run_id=args.run, witness=args.witness)
        finally:
            trust.close()
    if args.json:
        print(json.dumps(result.to_dict()))
    elif result.ok:
        print(result.describe())
    else:
        print(f"TAMPERED: {result.problem}")
    return EXIT_OK if result.ok else EXIT_FAILED


def _trace(args: argparse.Namespace) -> int:
    from .trace_view import build_trace, render_trace

    with _opened_store(args, create=False) as store:
        view = build_trace(store, args.run_id)
    if args.json:
        _print_json(view)
    else:
        print(render_trace(view))
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from .usage_report import build_report, render_report

    with _opened_store(args, create=False) as store:
        view = build_report(store, workflow=args.workflow)
    if args.json:
        _print_json(view)
    else:
        print(render_report(view))
    return EXIT_OK


def _bundle(args: argparse.Namespace) -> int:
    from .identity import TrustDomain
    from .trust import TrustRoots

    workflow = load_workflow(args.target)
    with _opened_store(args, create=False) as store:
        trust = TrustRoots.open(store)  # the grant keys, current and previous (made on first use)
        try:
            print(TrustDomain(workflow.trust_domain, trust=trust).bundle().jwks_json())
        finally:
            trust.close()
    return EXIT_OK


def _policy_validate(args: argparse.Namespace) -> int:
    from .policy import CedarPolicyEngine
    from .tools import ToolRegistry

    workflow = load_workflow(args.workflow) if args.workflow else None
    tools = workflow.registry if workflow is not None else ToolRegistry()
    if args.paths:  # as Workflow(policies=PATHS) loads them: with the baseline unless --no-baseline
        engine = CedarPolicyEngine.from_paths(args.paths, tools, baseline=args.baseline)
    elif workflow is not None:  # the policy set the workflow runs under
        engine = CedarPolicyEngine.from_paths(workflow.policies, tools, schema=workflow.schema,
                                              baseline=workflow.baseline)
    elif not args.baseline:
        raise UsageError("scopegraph policy validate: --no-baseline needs policy files to check")
    else:
        engine = CedarPolicyEngine.from_paths(None, tools)
    out: dict[str, Any] = {"valid": True, "files": list(engine.files), "version": engine.version}
    print(json.dumps(out) if args.json else f"ok: {len(engine.files)} file(s) valid, version {engine.version}")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve

    return serve(args.store, host=args.host, port=args.port, audiences=args.audience, clients=args.client,
                 token_ttl=args.token_ttl, token_uses=args.token_uses, public_url=args.public_url,
                 tls_cert=args.tls_cert, tls_key=args.tls_key, plain_http=args.plain_http,
                 webhooks=args.webhook)


def _init(args: argparse.Namespace) -> int:
    from .scaffold import EXAMPLE_TASK, TARGET, scaffold

    written = scaffold(args.dir)
    for path in written:
        print(f"created {path}")
    where = "" if os.path.abspath(args.dir) == os.getcwd() else f" (in {shlex.quote(args.dir)})"
    print(f"next{where}:")
    print(f"  scopegraph run {TARGET} --task {shlex.quote(EXAMPLE_TASK)}"
          "   # the payment waits for bob's approval (exit 3)")
    print("  pytest")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
