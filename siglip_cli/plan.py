"""Duplicates you can act on: exact copies by content, a keeper per group by a rule you can see, and a plan of
moves into a quarantine folder that `siglip dedup --apply` carries out only while its files are as planned.
Nothing is ever deleted. Imports no torch."""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict

from .errors import RunError, UsageError

KEEP_RULES = ("largest", "oldest", "path-prefix:")


def exact_groups(index: str) -> list[list[dict]]:
    """Groups of rows whose files have the same bytes (size and sha256, as the index recorded them): no model."""
    from .index.reader import read_index
    from .sources import stored_path

    table = read_index(index, ["path", "path_bytes", "size", "sha256", "width", "height"])
    by_content: dict[tuple, list[dict]] = defaultdict(list)
    for row in table.to_pylist():
        if row["sha256"] and row["size"]:
            row["path"] = stored_path(row["path"], row["path_bytes"])
            by_content[(row["size"], row["sha256"])].append(row)
    return sorted(
        (sorted(g, key=lambda r: r["path"]) for g in by_content.values() if len(g) > 1), key=lambda g: g[0]["path"]
    )


def check_rule(rule: str) -> str:
    if rule in ("largest", "oldest") or (rule.startswith("path-prefix:") and len(rule) > len("path-prefix:")):
        return rule
    raise UsageError(f"--keep {rule}: largest, oldest, or path-prefix:FOLDER (the copy under FOLDER is kept)")


def keeper(members: list[dict], rule: str) -> dict:
    """The member a group keeps: `largest` (most pixels, then bytes), `oldest` (earliest modification time), or
    `path-prefix:FOLDER` (one under FOLDER, the largest of them; else the largest). Ties: the first path."""

    def largest(m: dict) -> tuple:
        return (-(m.get("width") or 0) * (m.get("height") or 0), -(m.get("size") or 0), m["path"])

    if rule == "oldest":
        return min(members, key=lambda m: (m["mtime_ns"], m["path"]))
    if rule.startswith("path-prefix:"):
        prefix = os.path.abspath(rule.split(":", 1)[1]).rstrip(os.sep) + os.sep
        under = [m for m in members if m["path"].startswith(prefix)]
        return min(under or members, key=largest)
    return min(members, key=largest)


def write_plan(groups: list[list[dict]], tier: str, rule: str, place: str, quarantine: str | None) -> int:
    """One JSON line per move: each member but its group's keeper, into the quarantine folder (default: beside the
    library, `<library>.siglip-quarantine`) at its path relative to the library. Returns the moves planned."""
    groups = [[_stat(m) for m in g] for g in groups]
    groups = [[m for m in g if m is not None] for g in groups]
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        lines = []
    else:
        root = os.path.commonpath([m["path"] for g in groups for m in g])
        root = root if os.path.isdir(root) else os.path.dirname(root)
        target = quarantine or root.rstrip(os.sep) + ".siglip-quarantine"
        lines = []
        for n, g in enumerate(groups, start=1):
            keep = keeper(g, rule)
            for m in g:
                if m is not keep:
                    lines.append(
                        {
                            "group": n,
                            "tier": tier,
                            "rule": rule,
                            "move": m["path"],
                            "to": os.path.join(target, os.path.relpath(m["path"], root)),
                            "keep": keep["path"],
                            "size": m["size"],
                            "mtime_ns": m["mtime_ns"],
                        }
                    )
    _write(place, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return len(lines)


def _write(place: str, text: str) -> None:
    """Written under a temporary name, then renamed into place."""
    from .index.files import write_error
    from .scratch import scratch

    try:
        with scratch(os.path.dirname(os.path.abspath(place))) as work:
            tmp = os.path.join(work, "plan.jsonl")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, place)
    except OSError as e:
        raise write_error(place, e) from None


def _stat(member: dict) -> dict | None:
    try:
        st = os.stat(member["path"])
    except OSError:
        return None  # gone since it was indexed: nothing to plan for it
    return {**member, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def apply_plan(place: str) -> tuple[int, str | None]:
    """Carry out a plan: first check every line (the file to move and its keeper still there, unchanged since
    the plan was made, nothing at the destination), then move them all. Refused whole, nothing moved, when one
    is not as planned. Returns the moves made and the folder they went into (None for an empty plan)."""
    try:
        with open(place, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read the plan {place}: {e}") from None
    for line in lines:
        if not {"move", "to", "keep", "size", "mtime_ns"} <= set(line):
            raise RunError(f"{place}: a line that is not a siglip dedup plan's: {line}")
        try:
            st = os.stat(line["move"])
        except OSError:
            raise RunError(f"not applying {place}: {line['move']} is not there now; make a new plan") from None
        if (st.st_size, st.st_mtime_ns) != (line["size"], line["mtime_ns"]):
            raise RunError(f"not applying {place}: {line['move']} changed since the plan; make a new plan")
        if not os.path.isfile(line["keep"]):
            raise RunError(f"not applying {place}: the copy it keeps, {line['keep']}, is not there now")
        if os.path.lexists(line["to"]):
            raise RunError(f"not applying {place}: {line['to']} exists; nothing is ever overwritten")
    for line in lines:
        os.makedirs(os.path.dirname(line["to"]), exist_ok=True)
        shutil.move(line["move"], line["to"])
    return len(lines), os.path.commonpath([line["to"] for line in lines]) if lines else None


def as_results(groups: list[list[dict]], rule: str):
    """Exact groups as dedup's table: one row per member, the keeper first and marked as the representative."""
    from .report import Results

    rows = []
    for n, group in enumerate(groups, start=1):
        keep = keeper([_stat(m) or {**m, "mtime_ns": 0} for m in group], rule)
        for m in sorted(group, key=lambda m: (m["path"] != keep["path"], m["path"])):
            rows.append(
                {
                    "group": n,
                    "representative": m["path"] == keep["path"],
                    "score": 1.0,
                    "path": m["path"],
                    "width": m["width"],
                    "height": m["height"],
                    "size": m["size"],
                    "path_bytes": m["path_bytes"],
                }
            )
    return Results(
        ["group", "representative", "score", "path", "width", "height", "size", "path_bytes"], rows, "identical bytes"
    )


def groups_of(results) -> list[list[dict]]:
    """dedup's rows back into groups of members (their paths as the OS names them)."""
    from .sources import stored_path

    groups: dict[int, list[dict]] = defaultdict(list)
    for row in results.rows:
        groups[row["group"]].append({**row, "path": stored_path(row["path"], row.get("path_bytes"))})
    return [groups[g] for g in sorted(groups)]
