"""A separate process for the store contract: it appends ledger records or opens a store.

Run as a script (``python -P store_worker.py COMMAND ...``); the tests start it with
``subprocess`` so that concurrency crosses a real process boundary.

Commands::

    append STORE_URL WRITER COUNT
        open the store, print "ready", read a wall-clock start time from stdin, spin
        until it comes, append COUNT ledger records of run WRITER, print "done".
"""

from __future__ import annotations

import sys
import time

from scopegraph.canonical import canonical_json
from scopegraph.ledger import record_hash
from scopegraph.store import open_store


def append(url: str, writer: str, count: int) -> None:
    store = open_store(url)
    try:
        print("ready", flush=True)
        start_at = float(sys.stdin.readline())
        while time.time() < start_at:
            pass
        for i in range(count):
            at = time.time()
            data = canonical_json({"writer": writer, "i": i})

            def seal(seq: int, prev: str, at: float = at, data: str = data) -> str:
                return record_hash(seq=seq, run_id=writer, kind="decision", at=at, data=data, prev_hash=prev)

            store.append_ledger(run_id=writer, kind="decision", at=at, data=data, seal=seal)
    finally:
        store.close()
    print("done", flush=True)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command != "append":
        sys.exit(f"unknown command {command!r}")
    append(args[0], args[1], int(args[2]))
