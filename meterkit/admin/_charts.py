"""The dashboard's charts, drawn on the server as inline SVG: no script, nothing fetched.

Each function takes plain numbers and dates and returns one ``<svg>`` element as text.
Every value a person may want to read is also in a ``<title>`` (a tooltip) and in the
chart's ``<desc>``, and the pages print the same figures in tables. Colours come from
classes the dashboard's stylesheet defines, so the page's Content-Security-Policy
needs no inline style.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from html import escape

__all__ = ["BurnDown", "burn_down", "daily_bars", "nice_ceiling"]

_W = 640
_H = 240
_LEFT = 64
_RIGHT = 16
_TOP = 16
_BOTTOM = 34
_PLOT_W = _W - _LEFT - _RIGHT
_PLOT_H = _H - _TOP - _BOTTOM


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``value``
    (so that axis labels are round); 1 for nothing to show."""
    if value <= 0:
        return 1.0
    power = 1.0
    while power * 10 <= value:
        power *= 10
    while power > value:
        power /= 10
    for step in (1, 2, 2.5, 5, 10):
        if power * step >= value:
            return power * step
    return power * 10  # pragma: no cover - the loop above always returns


def _number(value: float) -> str:
    """An axis label: whole numbers with thousands separators, else two decimals."""
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.2f}"


def _fmt(value: float) -> str:
    """A coordinate, to a tenth of a unit (shorter markup than full floats)."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _frame(kind: str, title: str, desc: str, body: list[str]) -> str:
    ident = f"chart-{kind}"
    return (
        f'<svg class="chart chart-{kind}" viewBox="0 0 {_W} {_H}" role="img" '
        f'aria-labelledby="{ident}-title {ident}-desc" preserveAspectRatio="xMidYMid meet">'
        f'<title id="{ident}-title">{escape(title)}</title>'
        f'<desc id="{ident}-desc">{escape(desc)}</desc>' + "".join(body) + "</svg>"
    )


def _y_axis(top: float, label: str) -> list[str]:
    """Horizontal grid lines at 0, 1/4, ..., ``top``, labelled on the left."""
    parts = []
    for i in range(5):
        value = top * i / 4
        y = _TOP + _PLOT_H - _PLOT_H * i / 4
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_fmt(y)}" y2="{_fmt(y)}"/>'
            f'<text class="tick" x="{_LEFT - 6}" y="{_fmt(y + 4)}" text-anchor="end">'
            f"{_number(value)}</text>"
        )
    parts.append(
        f'<text class="axis-label" x="{_LEFT}" y="{_TOP - 4}" text-anchor="start">'
        f"{escape(label)}</text>"
    )
    return parts


def _x_label(x: float, day: date) -> str:
    return (
        f'<text class="tick" x="{_fmt(x)}" y="{_H - _BOTTOM + 16}" text-anchor="middle">'
        f"{day:%b} {day.day}</text>"
    )


@dataclass(frozen=True)
class BurnDown:
    """What the burn-down chart says in words: where the credits stand and where,
    at this month's pace so far, they will be at its end."""

    allowance: Decimal
    left: Decimal
    projected_left: Decimal
    runs_out: date | None


def burn_down(
    *,
    allowance: Decimal,
    used_now: Decimal,
    start: date,
    end: date,
    today: date,
    used_by_day: Sequence[tuple[date, Decimal]] = (),
) -> tuple[str, BurnDown]:
    """The month's credits left, day by day, against the allowance.

    ``start``/``end`` bound the month (``end`` excluded); ``used_by_day`` is what each
    past day of it used (from the ledger; days without usage may be left out);
    ``used_now`` is the month's total so far (from the counters, in real time), which
    gives today's point. Without ``used_by_day`` the line goes straight from the
    month's start to today. A dashed line is the even pace that ends the month at
    zero; a dotted one carries this month's pace to its end.
    """
    days = max((end - start).days, 1)
    elapsed = min(max((today - start).days, 0), days - 1)
    cap = float(max(allowance, Decimal(0)))
    top = nice_ceiling(cap)

    def x_of(day_index: float) -> float:
        return _LEFT + _PLOT_W * day_index / days

    def y_of(credits: float) -> float:
        clamped = min(max(credits, 0.0), top)
        return _TOP + _PLOT_H - _PLOT_H * clamped / top

    used = {d: u for d, u in used_by_day if start <= d < today}
    points: list[tuple[float, Decimal]] = [(0.0, allowance)]
    if used_by_day:
        total = Decimal(0)
        for i in range(elapsed):
            total += used.get(start + timedelta(days=i), Decimal(0))
            points.append((i + 1.0, allowance - total))
    # Today's point is the counters' figure, at today's end so far.
    points.append((elapsed + 1.0, allowance - used_now))
    left = allowance - used_now
    pace = used_now / (elapsed + 1)
    projected = allowance - pace * days
    runs_out = None
    if pace > 0 and projected < 0:
        runs_out = start + timedelta(days=int(allowance / pace))
    body = _y_axis(top, "credits left")
    for i in range(0, days, 7):
        body.append(_x_label(x_of(i), start + timedelta(days=i)))
    body.append(
        f'<line class="ideal" x1="{_fmt(x_of(0))}" y1="{_fmt(y_of(cap))}" '
        f'x2="{_fmt(x_of(days))}" y2="{_fmt(y_of(0))}"/>'
    )
    last_x, last_left = points[-1]
    body.append(
        f'<line class="projection" x1="{_fmt(x_of(last_x))}" y1="{_fmt(y_of(float(last_left)))}" '
        f'x2="{_fmt(x_of(days))}" y2="{_fmt(y_of(float(projected)))}"/>'
    )
    line = " ".join(f"{_fmt(x_of(x))},{_fmt(y_of(float(v)))}" for x, v in points)
    body.append(f'<polyline class="actual" points="{line}"/>')
    for x, value in points[1:]:
        day = start + timedelta(days=int(x) - 1)
        body.append(
            f'<circle class="point" cx="{_fmt(x_of(x))}" cy="{_fmt(y_of(float(value)))}" r="2.5">'
            f"<title>{day:%b} {day.day}: {value} credits left</title></circle>"
        )
    desc = (
        f"Allowance {allowance} credits; {left} left on {today:%b} {today.day}; "
        f"at this pace {max(projected, Decimal(0)):.2f} left at the end of the month"
        + (f", running out around {runs_out:%b} {runs_out.day}." if runs_out else ".")
    )
    summary = BurnDown(allowance, left, projected, runs_out)
    return _frame("burndown", "Credits left this month", desc, body), summary


def daily_bars(
    kind: str,
    *,
    values: Sequence[tuple[date, float]],
    since: date,
    until: date,
    label: str,
    unit: str,
) -> str:
    """One bar per day of [since, until) (a day missing from ``values`` is zero)."""
    days = max((until - since).days, 1)
    by_day = {d: v for d, v in values if since <= d < until}
    top = nice_ceiling(max(by_day.values(), default=0.0))
    slot = _PLOT_W / days
    width = max(slot * 0.8, 0.5)
    body = _y_axis(top, label)
    step = 15 if days > 45 else 7 if days > 10 else 1
    for i in range(0, days, step):
        body.append(_x_label(_LEFT + slot * (i + 0.5), since + timedelta(days=i)))
    total = 0.0
    for i in range(days):
        day = since + timedelta(days=i)
        value = by_day.get(day)
        if not value:
            continue
        total += value
        height = _PLOT_H * min(value, top) / top
        x = _LEFT + slot * i + (slot - width) / 2
        body.append(
            f'<rect class="bar" x="{_fmt(x)}" y="{_fmt(_TOP + _PLOT_H - height)}" '
            f'width="{_fmt(width)}" height="{_fmt(max(height, 0.5))}">'
            f"<title>{day:%b} {day.day}: {_number(value)} {escape(unit)}</title></rect>"
        )
    desc = (
        f"{_number(total)} {unit} over {days} days, {since:%b} {since.day} to "
        f"{until - timedelta(days=1):%b} {(until - timedelta(days=1)).day}; "
        f"the busiest day {_number(max(by_day.values(), default=0.0))}."
    )
    return _frame(kind, f"{label.capitalize()} per day", desc, body)
