"""The Overview page, the console's landing page: backlog per stage, rates and the last hour.

GET / renders the page; GET /overview/live renders the fragment htmx swaps in every few
seconds (figures and charts). Both render whatever they could read: a server that is down
shows as a notice and "unknown" figures, never as an error page.
"""

from __future__ import annotations

from typing import Any

from litestar import get
from litestar.datastructures import State
from litestar.response import Template
from litestar.types import ControllerRouterHandler

from tidegate.console.charts import line_chart
from tidegate.console.figures import Overview, collect
from tidegate.console.link import BusLink
from tidegate.console.sources import StatsHistory
from tidegate.store.store import Store

POLL_EVERY_S = 3  # htmx refresh of the live fragment; samples arrive every few seconds
# Where this app keeps its stats cache, beside `store` and `link` in the app's state.
HISTORY_KEY = "overview_history"
NO_STORE = {"Cache-Control": "no-store"}


def history_of(state: State) -> StatsHistory:
    """The app's stats cache, made on first use (the app's lifespan belongs to app.py)."""
    history = state.get(HISTORY_KEY)
    if not isinstance(history, StatsHistory):
        history = StatsHistory()
        state[HISTORY_KEY] = history
    return history


def render_context(overview: Overview) -> dict[str, Any]:
    """What both templates need: the snapshot, its charts as SVG, and the poll period."""
    charts = [
        {
            "key": chart.key,
            "title": chart.title,
            "svg": line_chart(
                chart.points,
                title=chart.title,
                unit=chart.unit,
                start=overview.chart_start,
                end=overview.chart_end,
            ),
        }
        for chart in overview.charts
    ]
    return {"nav": "overview", "o": overview, "charts": charts, "poll_every_s": POLL_EVERY_S}


async def overview_context(state: State) -> dict[str, Any]:
    store: Store | None = state.get("store")
    link: BusLink | None = state.get("link")
    js = link.js if link is not None else None
    return render_context(await collect(store, js, history_of(state)))


@get("/", name="overview")
async def overview_page(state: State) -> Template:
    return Template("overview.html", context=await overview_context(state), headers=NO_STORE)


@get("/overview/live", name="overview_live")
async def overview_live(state: State) -> Template:
    return Template("overview_live.html", context=await overview_context(state), headers=NO_STORE)


ROUTES: list[ControllerRouterHandler] = [overview_page, overview_live]
