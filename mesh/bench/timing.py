"""What `tidegate bench console` is asked to do and what it reports: the config and result
structs, the per-page summary (min, median, p95, max) and the table and JSON forms.

Pure: no servers, unit-tested. Percentiles are nearest-rank (the p-th percentile is a time
that was measured, the ⌈p·n⌉-th smallest), so a p95 of 50 requests is the third slowest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import msgspec

TARGET_MS: Final = 300.0


class ConsoleConfig(msgspec.Struct, frozen=True, kw_only=True):
    rows: int
    clients: int
    days: int
    requests: int  # timed GETs of each page
    warmup: int  # untimed GETs of each page first
    deep_page: int  # the deep page of the task list: this many pages in
    target_ms: float


class DataFacts(msgspec.Struct, kw_only=True):
    """The filled table, as PostgreSQL counts it after the fill."""

    rows: int
    partitions: int
    table_mb: float  # partitions with their indexes
    fill_s: float
    vacuum_s: float


class PageResult(msgspec.Struct, kw_only=True):
    name: str
    url: str  # what was asked for, path and query
    requests: int
    min_ms: float | None
    median_ms: float | None
    p95_ms: float | None
    max_ms: float | None
    statuses: dict[str, int]  # HTTP status → answers
    failures: int  # answers that were not a 200 showing what the page should
    problem: str | None  # the first failure, in words
    under_target: bool  # p95 under the target, every answer good


class ConsoleReport(msgspec.Struct, kw_only=True):
    benchmark: str
    config: ConsoleConfig
    data: DataFacts | None
    pages: list[PageResult]
    cpus: int
    load_before: list[float]  # 1, 5, 15 min load averages when the timing began
    load_after: list[float]  # … and when it ended: other work on the machine shows here
    ok: bool  # the run completed and every page answered 200 with its content
    under_target: bool  # … and every p95 is under the target
    error: str | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, 0 < q ≤ 100."""
    if not values:
        raise ValueError("no values")
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], not {q}")
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def summarize(
    name: str,
    url: str,
    times_ms: Sequence[float],
    statuses: Sequence[int],
    problems: Sequence[str | None],
    target_ms: float,
) -> PageResult:
    """One page's figures from its timed requests (a time, a status, a problem each)."""
    counts: dict[str, int] = {}
    for status in statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    failed = [p for p in problems if p is not None]

    def r(x: float) -> float:
        return round(x, 1)

    p95 = r(percentile(times_ms, 95)) if times_ms else None
    return PageResult(
        name=name,
        url=url,
        requests=len(times_ms),
        min_ms=r(min(times_ms)) if times_ms else None,
        median_ms=r(percentile(times_ms, 50)) if times_ms else None,
        p95_ms=p95,
        max_ms=r(max(times_ms)) if times_ms else None,
        statuses=counts,
        failures=len(failed),
        problem=failed[0] if failed else None,
        under_target=p95 is not None and p95 < target_ms and not failed,
    )


def short_url(url: str, width: int = 44) -> str:
    """A URL for the table: a long query (the deep page's cursor) cut with an ellipsis."""
    return url if len(url) <= width else url[: width - 1] + "…"


def format_table(report: ConsoleReport) -> str:
    cfg, data = report.config, report.data

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}"

    def load(values: Sequence[float]) -> str:
        return " ".join(f"{v:.2f}" for v in values) or "?"

    rows_text = f"{data.rows:,} rows" if data else f"{cfg.rows:,} rows (not filled)"
    lines = [
        f"tidegate bench console: {rows_text} in tasks, {cfg.clients} clients, {cfg.days} days",
    ]
    if data:
        lines.append(
            f"  {data.partitions} partitions, {data.table_mb:,.0f} MB with indexes; "
            f"filled in {data.fill_s:,.1f} s, vacuumed and analysed in {data.vacuum_s:,.1f} s"
        )
    lines += [
        f"  {cfg.requests} timed GETs per page over HTTP, one at a time, after {cfg.warmup} "
        f"untimed; {report.cpus} CPUs, load average {load(report.load_before)} before, "
        f"{load(report.load_after)} after",
        "",
    ]
    names = [p.name for p in report.pages]
    urls = [short_url(p.url) for p in report.pages]
    nw = max([4, *(len(n) for n in names)])
    uw = max([3, *(len(u) for u in urls)])
    target = f"p95 < {cfg.target_ms:,.0f} ms"
    header = (
        f"{'page':<{nw}}  {'url':<{uw}}  {'min':>7}  {'median':>7}  {'p95':>7}  {'max':>7}"
        f"  {target}"
    )
    lines += [header + "   (ms)", "-" * (len(header) + 7)]
    for p, url in zip(report.pages, urls, strict=True):
        verdict = "yes" if p.under_target else "NO"
        if p.failures:
            verdict += f"  ({p.failures} bad answers: {p.problem})"
        lines.append(
            f"{p.name:<{nw}}  {url:<{uw}}  {ms(p.min_ms):>7}  {ms(p.median_ms):>7}  "
            f"{ms(p.p95_ms):>7}  {ms(p.max_ms):>7}  {verdict}"
        )
    if report.error:
        lines.append(f"\nFAILED: {report.error}")
    elif report.pages:
        met = "every page's p95 is" if report.under_target else "NOT every page's p95 is"
        lines.append(f"\n{met} under {cfg.target_ms:,.0f} ms")
    return "\n".join(lines)


def format_json(report: ConsoleReport) -> str:
    return msgspec.json.format(msgspec.json.encode(report)).decode()
