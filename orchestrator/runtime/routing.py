"""What routing knows of a run's step records, kept up to date a write at a time.

Routing after each step needs the steps that are done, started, waiting for a human,
asking for a re-plan or denied by one, and the steps that are ready. Read afresh from
every record, that is O(N) per step and O(N²) per run (issue 11). A ``Routing`` keeps
those sets and, for each step id, how many of its dependencies are not done yet; the
``steps`` channel's value remembers the writes it was made from (``StepRecords``), so
each route applies only the records written since the last one.

When the lineage is broken (a drive's first route, state read back from a checkpoint, a
view of another branch) or a record goes back on what routing relied on (a completed
step no longer completed, a record dropped), it starts over from all the records:
correct always, incremental on the common path.

Plans with repeated steps (``for_each``) are routed by ``repeat.plan_view`` instead:
an iteration's record stands for part of a plan step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from ..plan import Plan, Step
from .state import StepRecords

MAX_LINEAGE = 64  # writes walked back before starting over costs less than walking on


class Routing:
    """One plan's routing facts, for one run's drive."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.lock = threading.Lock()  # edges of parallel tasks may route at once
        self._position = {s.id: i for i, s in enumerate(plan.steps)}
        self._needs = {s.id: len(set(s.depends_on)) for s in plan.steps}
        self._dependents: dict[str, list[str]] = {}
        for s in plan.steps:
            for d in set(s.depends_on):
                self._dependents.setdefault(d, []).append(s.id)
        self._seen: Any = None
        self._anchor: Any = None
        self._since_anchor: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        self.records: dict[str, Any] = {}
        self.done: set[str] = set()
        self.waiting: set[str] = set()
        self.replan: set[str] = set()
        self.denied: set[str] = set()
        self._missing = dict(self._needs)
        self._ready = {sid for sid, n in self._needs.items() if n == 0}

    def see(self, steps: Mapping[str, Any]) -> None:
        """Bring what routing knows up to date with ``steps`` (hold ``lock``)."""
        if steps is self._seen:
            return
        writes = self._writes_since(steps)
        if writes is None or not all(self._apply(k, v) for w in writes for k, v in (w or {}).items()) \
                or len(self.records) != len(steps):  # a write routing did not see: start over
            self._rebuild(steps)
        self._seen = steps
        self._anchor, self._since_anchor = forget_before(steps)

    def _writes_since(self, steps: Mapping[str, Any]) -> list[Any] | None:
        """The writes that made ``steps`` from what routing saw last, oldest first; ``None``
        if it was not made from that (or too long ago).

        A conditional edge sees a copy of the channel with its node's own writes applied;
        the channel's value the next step starts from is made from the original. So what
        routing saw is reached either itself, or through its ``anchor`` (the original its
        copy was made from) followed by the same writes it saw."""
        batches: list[Any] = []
        node: Any = steps
        while True:
            if node is self._seen:
                return [w for b in reversed(batches) for w in b]
            if node is self._anchor:
                writes = [w for b in reversed(batches) for w in b]
                seen = self._since_anchor
                if len(writes) < len(seen) or any(a is not b for a, b in zip(seen, writes, strict=False)):
                    return None  # another branch's writes
                return writes[len(seen):]
            if not isinstance(node, StepRecords) or node.parent is None or len(batches) > MAX_LINEAGE:
                return None
            batches.append(node.changes)
            node = node.parent

    def _rebuild(self, steps: Mapping[str, Any]) -> None:
        self._reset()
        for k, v in steps.items():
            self._apply(k, v)

    def _apply(self, sid: str, record: Any) -> bool:
        """Apply one write; ``False`` if routing must start over (it undoes a completion)."""
        old = self.records.get(sid)
        was_done = old is not None and old.get("status") == "completed"
        if was_done and (record is None or record.get("status") != "completed"):
            return False
        for group in (self.waiting, self.replan, self.denied):
            group.discard(sid)
        if record is None:
            if old is not None:
                del self.records[sid]
                if self._missing.get(sid) == 0:
                    self._ready.add(sid)  # a step whose record is dropped starts afresh
            return True
        self.records[sid] = record
        self._ready.discard(sid)
        status = record.get("status")
        if status == "awaiting_approval":
            self.waiting.add(sid)
        elif status == "replan":
            self.replan.add(sid)
        if record.get("denied_by"):
            self.denied.add(sid)
        if status == "completed" and not was_done and sid in self._position:
            self.done.add(sid)
            for d in self._dependents.get(sid, ()):
                self._missing[d] -= 1
                if self._missing[d] == 0 and d not in self.records:
                    self._ready.add(d)
        return True

    def ready(self) -> list[Step]:
        """Steps not started whose dependencies are all done, in plan order."""
        return [self.plan.steps[i] for i in sorted(self._position[sid] for sid in self._ready)]

    def results(self) -> Mapping[str, Any]:
        """The results of the done steps, read when asked (a step's dependencies only)."""
        return _Results(self)

    def waiting_in(self, steps: Mapping[str, Any]) -> list[str]:
        """The steps waiting for a human, in the order of their records."""
        return [sid for sid in steps if sid in self.waiting] if self.waiting else []


class _Results(Mapping[str, Any]):
    def __init__(self, routing: Routing) -> None:
        self._r = routing

    def __getitem__(self, sid: str) -> Any:
        if sid not in self._r.done:
            raise KeyError(sid)
        return self._r.records[sid].get("result")

    def __contains__(self, sid: object) -> bool:
        return sid in self._r.done

    def __iter__(self) -> Iterator[str]:
        return iter(self._r.done)

    def __len__(self) -> int:
        return len(self._r.done)


def forget_before(steps: Mapping[str, Any]) -> tuple[Any, list[Any]]:
    """The value ``steps`` was made from before it was copied (itself if it is no copy's
    descendant), and the writes applied since, oldest first. What that value was made
    from is forgotten: routing never walks past it, and each older value holds every
    record (kept, a run of N steps would hold N copies of them)."""
    batches: list[Any] = []
    node: Any = steps
    anchor: Any = steps
    while isinstance(node, StepRecords) and node.parent is not None and len(batches) <= MAX_LINEAGE:
        if node.copied:
            anchor = node.parent
            break
        batches.append(node.changes)
        node = node.parent
    else:
        batches = []
    if isinstance(anchor, StepRecords):
        anchor.parent = None
    return anchor, [w for b in reversed(batches) for w in b]
