"""The dashboard's SVG charts, drawn from numbers alone."""

from __future__ import annotations

import re
from datetime import date, timedelta
from decimal import Decimal

import pytest

from meterkit.admin._charts import burn_down, daily_bars, nice_ceiling

JAN = date(2026, 1, 1)
FEB = date(2026, 2, 1)


@pytest.mark.parametrize(
    ("value", "ceiling"),
    [
        (0, 1),
        (0.3, 0.5),
        (1, 1),
        (7, 10),
        (10_000, 10_000),
        (12_000, 20_000),
        (180, 200),
        (230, 250),
    ],
)
def test_axes_end_on_round_numbers(value: float, ceiling: float) -> None:
    """An axis tops out at the smallest of 1, 2, 2.5, 5 x 10^n that holds the value."""
    assert nice_ceiling(value) == pytest.approx(ceiling)


def points(svg: str) -> list[tuple[float, float]]:
    found = re.search(r'<polyline class="actual" points="([^"]+)"', svg)
    assert found is not None
    return [tuple(map(float, p.split(","))) for p in found.group(1).split()]  # type: ignore[misc]


def test_the_burn_down_has_a_point_per_day_and_ends_at_the_counters_figure() -> None:
    """With daily usage, one point per past day plus today's, from the counters; the
    line falls by each day's usage; the outlook says where the pace leads."""
    used = [(JAN + timedelta(days=i), Decimal(10)) for i in range(4)]
    svg, summary = burn_down(
        allowance=Decimal(100),
        used_now=Decimal(50),
        start=JAN,
        end=FEB,
        today=date(2026, 1, 5),
        used_by_day=used,
    )
    line = points(svg)
    assert len(line) == 6  # the month's start, Jan 1-4, today
    heights = [y for _, y in line]
    assert heights == sorted(heights)  # credits left only fall (y grows downwards)
    assert svg.count('class="point"') == 5
    assert summary.left == Decimal(50)
    assert summary.runs_out == date(2026, 1, 11)  # 10 credits a day: 100 last 10 days
    assert "running out around Jan 11" in svg


def test_without_daily_figures_the_line_is_straight_to_today() -> None:
    """No ledger: two points, the month's start and today's figure; no run-out date
    while the pace stays under the allowance."""
    svg, summary = burn_down(
        allowance=Decimal(10_000),
        used_now=Decimal("93.23"),
        start=JAN,
        end=FEB,
        today=date(2026, 1, 20),
    )
    assert len(points(svg)) == 2
    assert summary.runs_out is None
    assert summary.projected_left > 0


def test_daily_bars_draw_one_bar_per_day_with_usage() -> None:
    """A bar for each day of the span with a value (missing and zero days have none,
    days outside the span are left out); the busiest day fills the plot's height."""
    since = date(2025, 10, 23)
    until = since + timedelta(days=90)
    values = [(since, 4.0), (since + timedelta(days=1), 0.0), (until - timedelta(days=1), 8.0)]
    values.append((until, 99.0))  # outside: until is excluded
    svg = daily_bars(
        "requests", values=values, since=since, until=until, label="requests", unit="<b>"
    )
    heights = [float(h) for h in re.findall(r'class="bar"[^>]*height="([0-9.]+)"', svg)]
    assert len(heights) == 2
    assert heights[1] == pytest.approx(2 * heights[0], rel=0.01)
    assert "&lt;b&gt;" in svg
    assert "<b>" not in svg
