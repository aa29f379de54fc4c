"""A flood report as the operator reads it (a table), as the README shows it (markdown) or as a
script reads it (JSON). The table and the markdown hold the same rows."""

from __future__ import annotations

import functools
from collections.abc import Callable

import msgspec

from tidegate.bench.figures import Spread
from tidegate.bench.kinds import NON_SENSITIVE, SENSITIVE
from tidegate.bench.model import FloodReport, ModeResult
from tidegate.bench.usage import Usage

Row = tuple[str, list[str]]


def num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}x"


def spread_text(s: Spread | None, digits: int = 0) -> str:
    if s is None:
        return "-"
    return f"{s.p50:,.{digits}f} / {s.p95:,.{digits}f} / {s.p99:,.{digits}f}"


def _group(name: str) -> str:
    """`executor0`, `executor1` → `executors`; `driver0` … → `drivers`; others as named."""
    for prefix in ("executor", "driver"):
        if name.startswith(prefix) and name != prefix:
            return prefix + "s"
    return name


def _usage_rows(modes: list[ModeResult]) -> list[Row]:
    """Peak RSS and CPU per component; executors, and drivers when several, summed (their
    peaks: an upper bound)."""

    def grouped(m: ModeResult) -> dict[str, Usage]:
        out: dict[str, Usage] = {}
        for name, u in m.usage.items():
            key = _group(name)
            g = out.setdefault(key, Usage())
            g.peak_rss_mb = round(g.peak_rss_mb + u.peak_rss_mb, 1)
            g.cpu_s = round(g.cpu_s + u.cpu_s, 2)
            if u.tasks_cpu_s is not None:
                g.tasks_cpu_s = round((g.tasks_cpu_s or 0.0) + u.tasks_cpu_s, 2)
        return out

    groups = [grouped(m) for m in modes]
    names = list(dict.fromkeys(n for g in groups for n in g))
    rows: list[Row] = []
    for name in names:
        got = [g.get(name) for g in groups]
        rows.append((f"peak RSS MB: {name}", [num(u.peak_rss_mb) if u else "-" for u in got]))
        rows.append((f"CPU s: {name}", [num(u.cpu_s, 1) if u else "-" for u in got]))
        if any(u and u.tasks_cpu_s is not None for u in got):
            rows.append(("CPU s: tasks", [num(u.tasks_cpu_s if u else None, 1) for u in got]))
    return rows


def _kind_text(m: ModeResult, kind: str) -> str:
    w = m.writes_by_kind.get(kind)
    return "-" if w is None else f"{num(w.rows_per_task, 2)} / {num(w.commits_per_task, 4)}"


def table_rows(report: FloodReport) -> list[Row]:
    modes = list(report.modes.values())

    def each(f: Callable[[ModeResult], str]) -> list[str]:
        return [f(m) for m in modes]

    rows: list[Row] = [
        ("submit wall time (s)", each(lambda m: num(m.submit_s, 2))),
        ("submit rate (PubAcks/s)", each(lambda m: num(m.submit_per_s))),
        ("  x raw publish time", each(lambda m: times(m.submit_x_publish))),
        ("all routed after (s)", each(lambda m: num(m.routed_s, 1))),
        (
            "routed after its PubAck, s p50/p95/p99",
            each(lambda m: spread_text(m.route_wait_s, 1)),
        ),
        ("all terminal after (s)", each(lambda m: num(m.terminal_s, 2))),
        ("end to end (tasks/s)", each(lambda m: num(m.tasks_per_s))),
        ("  x raw spawn time", each(lambda m: times(m.terminal_x_spawn))),
        ("terminal / succeeded", each(lambda m: f"{m.terminal:,} / {m.succeeded:,}")),
        ("DB commits", each(lambda m: num(m.commits))),
        ("commits per task", each(lambda m: num(m.commits_per_task, 3))),
        ("peak commits/s (pg_stat, 1 s samples)", each(lambda m: num(m.peak_commits_per_s))),
        ("write commits (commit timestamps)", each(lambda m: num(m.write_commits))),
        (
            "most write commits in any 1 s / cap (all drivers)",
            each(lambda m: f"{num(m.peak_write_commits_1s)} / {num(m.commit_cap_per_s)}"),
        ),
        ("autovacuum/analyze commits (not counted)", each(lambda m: num(m.autovacuum_commits))),
        ("rows written (ins+upd)", each(lambda m: num(m.rows_written))),
        ("rows written per task", each(lambda m: num(m.rows_per_task, 2))),
        *(
            (f"  {kind}: rows / commits per task", each(functools.partial(_kind_text, kind=kind)))
            for kind in (SENSITIVE, NON_SENSITIVE)
        ),
        ("poller's own commits (excl.)", each(lambda m: num(m.poller_commits))),
        (
            "callbacks received / expected",
            each(lambda m: f"{m.callbacks_received:,} / {m.callbacks_expected:,}"),
        ),
        (
            "callbacks duplicated / out of order",
            each(lambda m: f"{m.callback_duplicates:,} / {m.callbacks_out_of_order:,}"),
        ),
        (
            "callbacks by state (distinct)",
            each(lambda m: " ".join(f"{s}:{n:,}" for s, n in m.callbacks_by_state.items()) or "-"),
        ),
        ("all callbacks after (s)", each(lambda m: num(m.callbacks_s, 2))),
        ("callbacks/s", each(lambda m: num(m.callbacks_per_s))),
        (
            "callback ms p50/p95/p99: sensitive",
            each(lambda m: spread_text(m.callback_latency_ms.get("sensitive"))),
        ),
        (
            "callback ms p50/p95/p99: non-sensitive",
            each(lambda m: spread_text(m.callback_latency_ms.get("non-sensitive"))),
        ),
        ("DB behind callback ms p50/p95/p99", each(lambda m: spread_text(m.db_lag_ms))),
    ]
    return rows + _usage_rows(modes)


def header_lines(report: FloodReport) -> list[str]:
    cfg, raw, host = report.config, report.ceilings, report.machine
    lines = [
        f"tidegate bench flood: {cfg.tasks:,} tasks ({' '.join(cfg.command)}) from "
        f"{cfg.clients} clients ({cfg.sensitive_share:.0%} sensitive), "
        f"{cfg.drivers} driver{'s' if cfg.drivers > 1 else ''}, {cfg.executors} "
        f"executors x {cfg.slots} slots; callback receiver answers after "
        f"{cfg.callback_latency_ms:g} ms",
    ]
    if raw is not None and raw.error:
        lines.append(f"raw ceilings: FAILED: {raw.error}")
    elif raw is not None:
        lines.append(
            f"raw ceilings (same run, alone): spawn+reap {raw.tasks:,} x {cfg.command[0]}, "
            f"{raw.in_flight} at once: {num(raw.spawn_s, 2)} s ({num(raw.spawn_per_s)}/s); "
            f"pipelined JetStream publish of {raw.tasks:,}: {num(raw.publish_s, 2)} s "
            f"({num(raw.publish_per_s)}/s)"
        )
    if host is not None:
        load = " ".join(f"{x:.2f}" for x in host.load_before)
        after = " ".join(f"{x:.2f}" for x in host.load_after)
        lines.append(
            f"machine: {host.cpus} CPUs ({host.cpu_model}), {host.memory_gb:g} GB, "
            f"{host.system}, Python {host.python}; load {load} before, {after} after"
        )
    return lines


def footer_lines(report: FloodReport) -> list[str]:
    lines: list[str] = []
    for m in report.modes.values():
        if m.error:
            lines.append(f"{m.persist}: FAILED: {m.error}")
        elif not m.completed:
            lines.append(f"{m.persist}: only {m.terminal:,} of {m.tasks:,} tasks terminal")
        elif m.callbacks_s is None and m.callbacks_expected:
            lines.append(
                f"{m.persist}: only {m.callbacks_received:,} of "
                f"{m.callbacks_expected:,} callbacks received by the deadline"
            )
    if report.commit_ratio is not None:
        lines.append(f"per-event mode committed {report.commit_ratio:,.1f}x as often as batch mode")
    return lines


def format_table(report: FloodReport) -> str:
    modes = list(report.modes.values())
    rows = table_rows(report)
    width = max(12, *(len(v) for _, vals in rows for v in vals), *(len(m.persist) for m in modes))
    label = max(len(name) for name, _ in rows)
    lines = [*header_lines(report), ""]
    lines.append(" " * label + "".join(f"  {m.persist:>{width}}" for m in modes))
    lines += [f"{name:<{label}}" + "".join(f"  {v:>{width}}" for v in vals) for name, vals in rows]
    footer = footer_lines(report)
    return "\n".join(lines + (["", *footer] if footer else []))


def format_markdown(report: FloodReport) -> str:
    """The README's form: the run's conditions, then one pipe table."""
    modes = list(report.modes.values())
    lines = [line + "  " for line in header_lines(report)]
    lines[-1] = lines[-1].rstrip()
    lines += [
        "",
        "| figure | " + " | ".join(m.persist for m in modes) + " |",
        "|---|" + "---:|" * len(modes),
    ]
    lines += [f"| {name.strip()} | " + " | ".join(vals) + " |" for name, vals in table_rows(report)]
    footer = footer_lines(report)
    return "\n".join(lines + (["", *footer] if footer else [])) + "\n"


def format_json(report: FloodReport) -> str:
    return msgspec.json.format(msgspec.json.encode(report)).decode()
