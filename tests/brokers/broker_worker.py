"""A separate process for the sweep tests: it runs the orders workflow and dies by SIGKILL
inside the tool, while the step holds a live PostgreSQL role.

``python -m tests.brokers.broker_worker STORE_URL ADMIN_URL SCHEMA PREFIX RUN_ID MARKER``
(from the repository's root): before dying, the tool writes its role's name to MARKER.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from scopegraph import Runtime
from scopegraph.brokers.postgres import PostgresCredential, PostgresRoleBroker
from tests.brokers import orders


def main(store_url: str, admin_url: str, schema: str, prefix: str, run_id: str, marker: str) -> None:
    def die(cred: PostgresCredential) -> None:
        path = Path(marker)
        path.write_text(cred.user)
        with path.open("a") as f:
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    orders.ON_CONNECT.append(die)
    broker = PostgresRoleBroker(admin_url, schema=schema, prefix=prefix)
    with Runtime(orders.orders_workflow(broker, orders.orders_plan("c-1")), store=store_url) as rt:
        rt.run("report on customer c-1", initiator="alice", run_id=run_id)
    sys.exit("the worker was meant to die inside the tool")


if __name__ == "__main__":
    main(*sys.argv[1:7])
