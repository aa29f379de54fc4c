"""A flood report as the operator reads it (a table) or a script does (JSON)."""

from __future__ import annotations

import msgspec

from tidegate.bench.model import FloodReport


def format_table(report: FloodReport) -> str:
    cfg = report.config
    modes = list(report.modes.values())

    def num(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    rows: list[tuple[str, list[str]]] = [
        ("submit wall time (s)", [num(m.submit_s, 2) for m in modes]),
        ("submit rate (PubAcks/s)", [num(m.submit_per_s) for m in modes]),
        ("all terminal after (s)", [num(m.terminal_s, 2) for m in modes]),
        ("end to end (tasks/s)", [num(m.tasks_per_s) for m in modes]),
        ("terminal / succeeded", [f"{m.terminal:,} / {m.succeeded:,}" for m in modes]),
        ("DB commits", [num(m.commits) for m in modes]),
        ("commits per task", [num(m.commits_per_task, 3) for m in modes]),
        ("peak commits/s (1 s window)", [num(m.peak_commits_per_s) for m in modes]),
        ("rows written (ins+upd)", [num(m.rows_written) for m in modes]),
        ("rows written per task", [num(m.rows_per_task, 2) for m in modes]),
        ("poller's own commits (excl.)", [num(m.poller_commits) for m in modes]),
    ]
    width = max(12, *(len(v) for _, vals in rows for v in vals), *(len(m.persist) for m in modes))
    label = max(len(name) for name, _ in rows)
    lines = [
        f"tidegate bench flood: {cfg.tasks:,} tasks ({' '.join(cfg.command)}) from "
        f"{cfg.clients} clients, {cfg.executors} executors x {cfg.slots} slots",
        "",
        " " * label + "".join(f"  {m.persist:>{width}}" for m in modes),
    ]
    lines += [f"{name:<{label}}" + "".join(f"  {v:>{width}}" for v in vals) for name, vals in rows]
    for m in modes:
        if m.error:
            lines.append(f"{m.persist}: FAILED: {m.error}")
        elif not m.completed:
            lines.append(f"{m.persist}: only {m.terminal:,} of {m.tasks:,} tasks terminal")
    if report.commit_ratio is not None:
        lines.append(
            f"\nper-event mode committed {report.commit_ratio:,.1f}x as often as batch mode"
        )
    return "\n".join(lines)


def format_json(report: FloodReport) -> str:
    return msgspec.json.format(msgspec.json.encode(report)).decode()
