"""``Guard``: one workflow's trust roots, issuer, policy, approvals, ledger and gateway,
bound to one store, opening a ``Session`` per run.

Building a guard does the expensive work once: open the store, bind its keystore (see
``scopegraph.trust``), parse and validate the policies. A session (see
``scopegraph.session``) is then cheap: any host, the ``Runtime`` among them, opens one
per run and drives every call of the run through it.

::

    with Guard(workflow, store="sqlite:///.scopegraph/store.db") as guard:
        session = guard.start_run("pay invoice 42", initiator="alice", planner=workflow.planner)
        decision = session.check("pay", "pay_invoice", {"invoice": 42})
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from typing import Any

from . import tracing as tr
from .approvals import ApprovalService
from .approvers import Principal, os_principal
from .brokers.service import SecretService
from .canonical import sha256_hex
from .clock import Clock, SystemClock
from .credentials import GrantIssuer
from .enrolment import ApproverRegistry
from .errors import ConfigError
from .gateway import Gateway
from .identity import TrustDomain
from .keys import Keystore
from .ledger import Ledger
from .plan import Plan
from .policy import CedarPolicyEngine, PolicyEngine
from .roles import Planner
from .run_events import Listener
from .session import Session
from .store import RunRecord, Store, open_store
from .trust import TrustRoots
from .workflow import Workflow

RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


def owner_alive(owner: str) -> bool:
    """Whether a lease (or a broker's credential) holder may still be running: a dead
    process on this host is not."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return True  # another machine: trust the lease until it expires
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Guard:
    """The decision machinery of one workflow over one store. Use as a context manager,
    or call ``close``.

    Attributes a host may read: ``workflow``, ``store``, ``clock``, ``policy``, ``trust``,
    ``domain``, ``issuer``, ``ledger``, ``approvers``, ``approvals`` (the same approval
    service the CLI answers through), ``secrets``, ``gateway``, ``metrics``.
    """

    def __init__(
        self,
        workflow: Workflow,
        *,
        store: str | Store | None = None,
        clock: Clock | None = None,
        policy: PolicyEngine | None = None,
        target: str = "",
        keystore: Keystore | None = None,
    ) -> None:
        """``store`` is a store URL or an open store (the guard closes it); ``keystore``
        holds the private keys, by default the one configured for the store.

        Raises:
            PolicyError: the workflow's policies do not parse or validate.
            StoreError, KeystoreError: the store or its keys cannot be opened.
        """
        self.workflow = workflow
        self.clock = clock or SystemClock()
        self.target = target or workflow.name
        owns_store = store is None or isinstance(store, str)
        self.store: Store = open_store(store) if store is None or isinstance(store, str) else store
        try:
            self._setup(workflow, policy, keystore)
        except BaseException:
            if owns_store:
                self.store.close()  # a refused start leaves nothing open
            raise

    def _setup(self, workflow: Workflow, policy: PolicyEngine | None, keystore: Keystore | None) -> None:
        # Policies are validated before anything else can happen: an invalid file stops here.
        self.policy = policy or CedarPolicyEngine.from_paths(
            workflow.policies, workflow.registry, schema=workflow.schema, baseline=workflow.baseline
        )
        self.trust = TrustRoots.open(self.store, keystore=keystore, clock=self.clock)
        self.domain = TrustDomain(workflow.trust_domain, trust=self.trust, clock=self.clock)
        self.issuer = GrantIssuer(self.domain, self.store, clock=self.clock,
                                  ttl=workflow.grant_ttl, max_uses=workflow.grant_max_uses)
        self.ledger = Ledger(self.store, clock=self.clock, trust=self.trust)
        self.metrics = tr.Metrics()
        self.approvers = ApproverRegistry(self.store, self.trust, clock=self.clock, ledger=self.ledger)
        self.approvals = ApprovalService(self.store, clock=self.clock, ledger=self.ledger, approvers=self.approvers)
        self.secrets = SecretService(brokers=workflow.brokers, store=self.store, ledger=self.ledger,
                                     clock=self.clock, workflow=workflow.name, metrics=self.metrics,
                                     owner_alive=owner_alive)
        self.secrets.check_tools(workflow.registry)
        self.gateway = Gateway(tools=workflow.registry, issuer=self.issuer, policy=self.policy,
                               store=self.store, clock=self.clock, retry=workflow.retry,
                               approvals=self.approvals, ledger=self.ledger, metrics=self.metrics,
                               secrets=self.secrets)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.trust.close()
        self.store.close()

    def start_run(self, task: str, *, initiator: str | Principal | None = None, run_id: str | None = None,
                  plan: Plan | dict[str, Any] | str | None = None, planner: Planner | None = None,
                  listener: Listener | None = None) -> Session:
        """Start a run of ``task`` and open its session.

        The run's record and its ``run_started`` audit record land in one write (in the
        caller's transaction, if one is open). With ``plan`` (or a ``planner`` to make one
        from the task alone), the plan is fixed too; otherwise call ``Session.fix_plan``
        or ``Session.make_plan`` before the first check. ``listener`` is told of the
        run's events (see ``scopegraph.run_events``).

        ``initiator`` is who starts the run, an authenticated principal: the operating
        system's user by default, or one the host vouches for (a name, or a
        ``Principal``). Nobody approves the run's calls under any spelling of that name.

        Raises:
            ConfigError: empty task, a bad or existing run id, an invalid initiator name,
                or both ``plan`` and ``planner``.
            PlanError: the plan is malformed or does not fit the workflow's tools.
        """
        if not task or not task.strip():
            raise ConfigError("the task is empty")
        if plan is not None and planner is not None:
            raise ConfigError("give a plan or a planner, not both")
        principal = (initiator if isinstance(initiator, Principal) else os_principal() if initiator is None
                     else Principal.of(initiator, authenticated_by="application"))
        run_id = run_id or uuid.uuid4().hex
        if not RUN_ID.match(run_id):
            raise ConfigError(f"invalid run id {run_id!r}")
        session = Session(self, run_id=run_id, initiator=principal.display, listener=listener)
        with self.store.atomic():  # the run and its first audit record land together
            existing = self.store.get_run(run_id)
            # A run submitted to the workers waits as "queued": starting it is its first drive.
            if existing is not None and (existing.status != "queued" or existing.workflow != self.workflow.name):
                raise ConfigError(f"run {run_id!r} exists already; use resume (or Guard.session to reopen it)")
            now = self.clock.now()
            self.store.upsert_run(RunRecord(
                run_id=run_id, workflow=self.workflow.name, target=self.target, initiator=principal.display,
                status="running", created_at=now, updated_at=now,
            ))
            self.ledger.append("run_started", run_id, workflow=self.workflow.name, target=self.target,
                               initiator=principal.display, initiator_principal=principal.name,
                               initiator_authenticated_by=principal.authenticated_by,
                               task_digest=sha256_hex(task), planner=str(session.planner_id),
                               policy_version=self.policy.version)
        if plan is not None:
            session.fix_plan(plan)
        elif planner is not None:
            session.make_plan(task, planner)
        return session

    def session(self, run_id: str, *, plan: Plan | None = None, initiator: str | None = None,
                listener: Listener | None = None) -> Session:
        """The session of a run already started (by this process or another): to answer
        its approvals, resume it, record what is left, or end it.

        Raises:
            ConfigError: the run is unknown, or belongs to another workflow.
        """
        if initiator is None:
            record = self.store.get_run(run_id)
            if record is None:
                raise ConfigError(f"unknown run {run_id!r}")
            if record.workflow != self.workflow.name:
                raise ConfigError(f"run {run_id!r} belongs to workflow {record.workflow!r}, "
                                  f"not {self.workflow.name!r}")
            initiator = record.initiator
        return Session(self, run_id=run_id, initiator=initiator, plan=plan, listener=listener)

    def revoke_run(self, run_id: str, *, reason: str) -> int:
        """Revoke every live grant of ``run_id``, and audit it (its downstream credentials too)."""
        self.secrets.end_run(run_id, reason=reason)
        live = [g.jti for g in self.store.grants_for_run(run_id) if g.revoked_at is None]
        if not live:
            self.issuer.forget_run(run_id)  # a grant minted but not written yet is dropped
            return 0
        with self.store.atomic():
            count = self.issuer.revoke_run(run_id, reason=reason)
            if count:
                self.ledger.append("grant_revoked", run_id, grant_id=None, grant_ids=live,
                                   count=count, reason=reason)
        if count:
            self.metrics.grants_revoked.add(count, {"workflow": self.workflow.name, "tool": "*"})
        return count
