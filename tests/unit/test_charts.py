"""Server-side SVG charts: valid XML, points inside the plot, empty series, escaped labels."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from tidegate.console.charts import DEFAULT_FRAME, format_number, line_chart, nice_ceiling

SVG = "{http://www.w3.org/2000/svg}"
F = DEFAULT_FRAME
T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC: a whole hour, so the axis labels are plain


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def polyline_points(root: ET.Element) -> list[tuple[float, float]]:
    line = root.find(f"{SVG}polyline")
    assert line is not None
    return [(float(x), float(y)) for x, y in (p.split(",") for p in line.attrib["points"].split())]


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_points_are_scaled_into_the_plot_area() -> None:
    points = [(T0, 0.0), (T0 + 1800, 50.0), (T0 + 3600, 100.0)]
    root = parse(line_chart(points, title="Accepted", unit="/s", start=T0, end=T0 + 3600))
    xy = polyline_points(root)
    assert len(xy) == 3
    left, right = F.left, F.width - F.right
    top, bottom = F.top, F.top + F.plot_h
    for x, y in xy:
        assert left <= x <= right and top <= y <= bottom
    # Start and end of the span are the plot's edges; 0 is its floor, the top value its top.
    assert xy[0] == (pytest.approx(left), pytest.approx(bottom))
    assert xy[2] == (pytest.approx(right), pytest.approx(top))
    assert xy[1] == (pytest.approx((left + right) / 2), pytest.approx((top + bottom) / 2))


def test_the_axis_shows_a_round_top_and_clock_times() -> None:
    root = parse(line_chart([(T0, 3.0), (T0 + 60, 7.0)], title="x", start=T0, end=T0 + 3600))
    labels = texts(root)
    assert "10" in labels and "5" in labels and "0" in labels  # top = nice_ceiling(7) = 10
    assert "08:00" in labels and "08:30" in labels and "09:00" in labels  # UTC


def test_points_outside_the_span_and_non_finite_values_are_dropped() -> None:
    points = [(T0 - 10, 5.0), (T0 + 10, 1.0), (T0 + 20, math.nan), (T0 + 30, 2.0), (T0 + 99, 9.0)]
    root = parse(line_chart(points, title="x", start=T0, end=T0 + 60))
    assert len(polyline_points(root)) == 2


def test_an_empty_series_still_draws_axes_and_says_so() -> None:
    root = parse(line_chart([], title="Finished", unit="/s", start=T0, end=T0 + 3600))
    assert root.find(f"{SVG}polyline") is None
    assert "no data yet" in texts(root)
    assert len(root.findall(f"{SVG}line")) == 3  # the grid still shows


def test_a_single_point_is_a_dot() -> None:
    root = parse(line_chart([(T0 + 5, 1.0)], title="x", start=T0, end=T0 + 10))
    assert root.find(f"{SVG}polyline") is None
    assert root.find(f"{SVG}circle") is not None


def test_labels_are_escaped() -> None:
    title = "<script>alert(\"x\")</script> & 'co'"
    svg = line_chart([], title=title, unit="<u>", start=T0, end=T0 + 60)
    assert "<script>" not in svg
    root = parse(svg)
    label = f"{title} (<u>)"
    title_el = root.find(f"{SVG}title")
    assert title_el is not None and title_el.text == label
    assert root.attrib["aria-label"] == label
    assert label in texts(root)


def test_all_zero_values_sit_on_the_floor() -> None:
    root = parse(line_chart([(T0, 0.0), (T0 + 60, 0.0)], title="x", start=T0, end=T0 + 60))
    assert [y for _, y in polyline_points(root)] == pytest.approx([F.top + F.plot_h] * 2)


@pytest.mark.parametrize(
    ("value", "top"),
    [(0, 1), (0.3, 1), (1, 1), (1.5, 2), (3, 5), (7, 10), (10, 10), (11, 20), (4200, 5000)],
)
def test_nice_ceiling(value: float, top: float) -> None:
    assert nice_ceiling(value) == top


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0"), (2.5, "2.5"), (12.4, "12"), (1500, "1.5k"), (2_500_000, "2.5M")],
)
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text
