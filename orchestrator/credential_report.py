"""Downstream credentials in the least privilege report: ephemeral or static, issued and used.

Per tool of a workflow: each credential it declared or was issued (a broker's per-step
credential is *ephemeral*, a secret source's value *static*; a token exchanged for an
audience is ephemeral too), how often it was issued, used (calls that received it, or
introspections that found a token active), revoked and refused, and any argument the tool
declares ``secret`` (a secret its executor hands it: static, and seen by the executor).
Then proposals: move each static secret behind a broker, so that revoking a step's
credentials maps to that one step. Gathered from the store's records (handles, never
secrets) and, when it loads, the workflow's tool declarations.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from .workflow import Workflow

_TOKEN_BROKER = "token_exchange"


def credential_usage(store: Any, run_ids: Iterable[str], definition: Workflow | None) -> dict[str, Any]:
    """The ``credentials`` section of one workflow in the usage report."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    runs: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for run_id in run_ids:
        for rec in store.secrets_for_run(run_id):
            key = (rec.tool, rec.name, rec.broker)
            row = rows.setdefault(key, _row(rec.tool, rec.name, rec.broker, rec.kind,
                                            "token" if rec.broker == _TOKEN_BROKER else "declared"))
            refused = rec.state == "revoked" and not rec.principal
            row["refused" if refused else "issued"] += 1
            row["used"] += rec.uses
            row["revoked"] += 1 if rec.state == "revoked" and not refused else 0
            row["live"] += 1 if rec.live else 0
            if rec.kind == "static" and rec.principal:
                row["sources"] = sorted({*row["sources"], rec.principal})
            runs[key].add(run_id)
    for key, row in rows.items():
        row["runs"] = len(runs[key])
    secret_arguments: dict[str, list[str]] = {}
    if definition is not None:
        for tool in definition.registry.values():
            for spec in tool.credentials:
                key = (tool.name, spec.param, spec.broker)
                if key not in rows:  # declared, never issued in these runs
                    kind = "static" if spec.kind_name == "static secret" else "ephemeral"
                    rows[key] = {**_row(tool.name, spec.param, spec.broker, kind, "declared"), "runs": 0}
                rows[key]["describes"] = spec.describe()
            if tool.secrets:
                secret_arguments[tool.name] = sorted(tool.secrets)
    tools: dict[str, dict[str, Any]] = {}
    for (tool_name, _, _), row in sorted(rows.items()):
        tools.setdefault(tool_name, {"tool": tool_name, "credentials": [], "secret_arguments": []})
        tools[tool_name]["credentials"].append(row)
    for tool_name, names in sorted(secret_arguments.items()):
        tools.setdefault(tool_name, {"tool": tool_name, "credentials": [], "secret_arguments": []})
        tools[tool_name]["secret_arguments"] = names
    listed = [tools[name] for name in sorted(tools)]
    return {"tools": listed, "proposals": _proposals(listed),
            "declarations": "loaded" if definition is not None else "unavailable"}


def _row(tool: str, name: str, broker: str, kind: str, source: str) -> dict[str, Any]:
    return {"tool": tool, "name": name, "broker": broker, "kind": kind, "source": source, "issued": 0, "used": 0,
            "revoked": 0, "live": 0, "refused": 0, "runs": 0, "sources": []}


def _proposals(tools: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for t in tools:
        for c in t["credentials"]:
            if c["kind"] != "static":
                continue
            out.append({
                "id": f"broker-{t['tool']}-{c['name']}", "kind": "move_static_behind_broker", "tool": t["tool"],
                "credential": c["name"],
                "summary": (f"move {t['tool']}'s static secret {c['name']!r} behind a broker: issue it per step "
                            "(postgres_role for a database, token exchange for an HTTP service) so that it is "
                            "revoked when its step ends"),
                "evidence": {"issued": c["issued"], "used": c["used"], "runs": c["runs"], "sources": c["sources"]},
            })
        for name in t["secret_arguments"]:
            out.append({
                "id": f"broker-{t['tool']}-{name}-argument", "kind": "secret_argument_to_broker", "tool": t["tool"],
                "credential": name,
                "summary": (f"{t['tool']} takes secret argument {name!r} from its executor: declare it as a "
                            "credential instead (a broker's per step, or static_secret), so that no executor or "
                            "model ever holds it"),
                "evidence": {"declared": "roles={%r: 'secret'}" % name},
            })
    return out


def render_credentials(section: Mapping[str, Any], workflow: str) -> list[str]:
    """The credentials section for a terminal."""
    if not section["tools"]:
        return []
    lines = ["", f"downstream credentials for {workflow}:"]
    for t in section["tools"]:
        lines.append(f"  tool {t['tool']}")
        for c in t["credentials"]:
            counts = (f"issued {c['issued']}  used {c['used']}  revoked {c['revoked']}  refused {c['refused']}"
                      f"  live {c['live']}  in {c['runs']} run(s)")
            what = "token for audience" if c["source"] == "token" else "credential"
            lines.append(f"    {what} {c['name']!r}  {c['kind']} ({c['broker']})  {counts}")
        for name in t["secret_arguments"]:
            lines.append(f"    secret argument {name!r}  static (passed by the executor)")
    if section["proposals"]:
        lines.append(f"  proposed for {workflow} (review before applying; nothing is changed):")
        for i, p in enumerate(section["proposals"], 1):
            lines.append(f"    {i}. {p['summary']}")
    return lines
