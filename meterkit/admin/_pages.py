"""The dashboard's HTML, written on the server: no script, no template engine, no
file fetched from anywhere but this app (its stylesheet). Every value is escaped."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from html import escape
from typing import Any

from meterkit.keys.model import ApiKey

__all__ = ["Frame", "error_page", "keys_page", "overview_page", "sign_in_page"]


CENT = Decimal("0.01")


def e(value: object) -> str:
    """``value`` as HTML text (attribute-safe too)."""
    return escape(str(value), quote=True)


def when(seconds: float | None, never: str = "—") -> str:
    if seconds is None:
        return never
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return f'<time datetime="{moment.isoformat()}">{moment:%Y-%m-%d %H:%M} UTC</time>'


def credits(value: Decimal) -> str:
    """Credits for people: thousands separators, at least two decimals, exact."""
    text = f"{value:,f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"{whole}.{fraction}"


@dataclass(frozen=True)
class Frame:
    """What every signed-in page shows around its content."""

    css: str
    home: str
    org: str
    key: ApiKey
    csrf: str
    sign_out: str
    overview: str
    keys: str
    mode: str
    modes: Sequence[tuple[str, str]]  # (mode, href) the signed-in key may switch to


def _document(title: str, css: str, content: str) -> str:
    return (
        "<!doctype html>"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="referrer" content="same-origin"><title>{e(title)} · meterkit</title>'
        f'<link rel="stylesheet" href="{e(css)}"></head><body>{content}</body></html>'
    )


def csrf_field(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(token)}">'


def _page(frame: Frame, title: str, current: str, content: str) -> str:
    nav = "".join(
        f'<a href="{e(href)}"{" aria-current=page" if name == current else ""}>{e(name)}</a>'
        for name, href in (("Overview", frame.overview), ("API keys", frame.keys))
    )
    modes = "".join(
        f'<a class="mode{" on" if mode == frame.mode else ""}" href="{e(href)}">{e(mode)}</a>'
        for mode, href in frame.modes
    )
    header = (
        '<header class="top"><div class="brand">meterkit</div>'
        f'<div class="org">Organization <code id="organization-id">{e(frame.org)}</code></div>'
        f'<nav class="tabs">{nav}</nav><div class="modes">{modes}</div>'
        f'<form class="sign-out" method="post" action="{e(frame.sign_out)}">'
        f"{csrf_field(frame.csrf)}"
        f'<span class="who">{e(frame.key.id)} (…{e(frame.key.last_four)})</span>'
        '<button type="submit">Sign out</button></form></header>'
    )
    return _document(title, frame.css, f"{header}<main><h1>{e(title)}</h1>{content}</main>")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str, empty: str) -> str:
    """A table (cells already HTML); right-aligned numeric columns are marked ``num``."""
    head = "".join(
        f"<th{' class=num' if h.endswith(('requests', 'credits', 'Requests', 'Credits')) else ''}>"
        f"{e(h)}</th>"
        for h in headers
    )
    numeric = [h.endswith(("requests", "credits", "Requests", "Credits")) for h in headers]
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if numeric[i] else ''}>{cell}</td>" for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="empty">{e(empty)}</td></tr>'
    return (
        f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def sign_in_page(*, css: str, action: str, token: str, message: str | None, ended: bool) -> str:
    notice = ""
    if message:
        notice = f'<p class="notice error" role="alert">{e(message)}</p>'
    elif ended:
        notice = '<p class="notice">Your session ended. Sign in again.</p>'
    content = (
        '<main class="sign-in"><h1>Sign in</h1>'
        "<p>Sign in with an API key of your organization that may manage keys. The key "
        "is checked once; the session keeps only its id, never the key.</p>"
        f"{notice}"
        f'<form method="post" action="{e(action)}" autocomplete="off">{csrf_field(token)}'
        '<label for="key">API key</label>'
        '<input id="key" name="key" type="password" required maxlength="256" '
        'autocomplete="off" spellcheck="false" placeholder="cl_live_…">'
        '<button type="submit">Sign in</button></form></main>'
    )
    return _document("Sign in", css, content)


def error_page(*, css: str, status: int, code: str, message: str, back: str) -> str:
    content = (
        f'<main class="error-page"><h1>{status}</h1>'
        f'<p class="notice error" role="alert"><code>{e(code)}</code> {e(message)}</p>'
        f'<p><a href="{e(back)}">Back</a></p></main>'
    )
    return _document(f"Error {status}", css, content)


def _cards(items: Sequence[tuple[str, str, str]]) -> str:
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card" id="{e(ident)}"><div class="label">{e(label)}</div>'
            f'<div class="value">{value}</div></div>'
            for ident, label, value in items
        )
        + "</div>"
    )


def overview_page(
    frame: Frame,
    *,
    usage: Any,
    names: dict[str, str],
    burn_down: str,
    summary: Any,
    history: Any,
    requests_chart: str | None,
    credits_chart: str | None,
    history_note: str,
    top_keys: int,
) -> str:
    used_pct = f"{usage.credits_used / usage.allowance:.0%}" if usage.allowance > 0 else "—"
    cards = _cards(
        [
            ("credits-used", "Credits used this month", f"{credits(usage.credits_used)}"),
            (
                "allowance",
                "Allowance",
                f"{credits(usage.allowance)} <small>({used_pct} used)</small>",
            ),
            ("credits-left", "Credits left", credits(usage.credits_left)),
            ("requests", "Requests this month", f"{usage.requests:,}"),
            ("plan", "Plan", e(usage.plan)),
        ]
    )
    period = f"{usage.period_start:%Y-%m-%d} to {usage.period_end:%Y-%m-%d} (UTC, end excluded)"
    outlook = (
        f"At this month's pace, {credits(max(summary.projected_left, Decimal(0)).quantize(CENT))}"
        " credits "
        "will be left when it ends"
        + (
            f"; they run out around {summary.runs_out:%B} {summary.runs_out.day}."
            if summary.runs_out
            else "."
        )
    )
    ops = table(
        ["Operation", "Requests", "Credits"],
        (
            [f"<code>{e(op)}</code>", f"{u.requests:,}", credits(u.credits)]
            for op, u in sorted(usage.operations.items(), key=lambda kv: -kv[1].credits)
        ),
        cls="per-operation",
        empty="No requests this month.",
    )
    ranked = sorted(usage.keys.items(), key=lambda kv: (-kv[1].credits, kv[0]))
    keys = table(
        ["Key", "Name", "Requests", "Credits"],
        (
            [f"<code>{e(k)}</code>", e(names.get(k) or ""), f"{u.requests:,}", credits(u.credits)]
            for k, u in ranked[:top_keys]
        ),
        cls="per-key",
        empty="No requests this month.",
    )
    more = (
        f'<p class="more">{len(ranked) - top_keys} more keys used credits: '
        f'<a href="{e(frame.keys)}">see every key</a>.</p>'
        if len(ranked) > top_keys
        else ""
    )
    if history is not None and requests_chart is not None and credits_chart is not None:
        hist_ops = table(
            ["Operation", "Requests", "Credits"],
            (
                [f"<code>{e(op)}</code>", f"{u.requests:,}", credits(u.credits)]
                for op, u in sorted(history.operations.items(), key=lambda kv: -kv[1].credits)
            ),
            cls="history-per-operation",
            empty="No requests in these days.",
        )
        hist_ranked = sorted(history.keys.items(), key=lambda kv: (-kv[1].credits, kv[0]))
        hist_keys = table(
            ["Key", "Name", "Requests", "Credits"],
            (
                [
                    f"<code>{e(k)}</code>",
                    e(names.get(k) or ""),
                    f"{u.requests:,}",
                    credits(u.credits),
                ]
                for k, u in hist_ranked[:top_keys]
            ),
            cls="history-per-key",
            empty="No requests in these days.",
        )
        days = (history.until - history.since).days
        history_html = (
            f'<section class="history"><h2>The last {days} days</h2>'
            f'<p class="note">{e(history_note)}</p>'
            f"<figure>{requests_chart}<figcaption>Requests per day</figcaption></figure>"
            f"<figure>{credits_chart}<figcaption>Credits per day</figcaption></figure>"
            f'<div class="columns"><section><h3>Per operation</h3>{hist_ops}</section>'
            f"<section><h3>Per key</h3>{hist_keys}</section></div></section>"
        )
    else:
        history_html = (
            '<section class="history"><h2>History</h2>'
            f'<p class="notice" id="history-unavailable">{e(history_note)}</p></section>'
        )
    content = (
        f'<p class="period">This month: {e(period)}.</p>{cards}'
        f"<section><h2>Credits left this month</h2><figure>{burn_down}"
        f"<figcaption>{e(outlook)} Dashed: an even pace that ends the month at zero; "
        "dotted: this month's pace carried to its end.</figcaption></figure></section>"
        f'<div class="columns"><section><h2>Per operation this month</h2>{ops}</section>'
        f"<section><h2>Per key this month</h2>{keys}{more}</section></div>"
        f"{history_html}"
    )
    return _page(frame, "Usage", "Overview", content)


@dataclass(frozen=True)
class KeyRow:
    record: ApiKey
    status: str
    requests: int
    credits: Decimal
    rotate: str
    revoke: str
    expiry: str


_GRACES = (("0", "at once"), ("3600", "1 hour"), ("86400", "1 day"), ("604800", "7 days"))


def _key_row(row: KeyRow, csrf: str) -> list[str]:
    r = row.record
    actions = ""
    if row.status == "active":
        graces = "".join(
            f'<option value="{v}"{" selected" if v == "86400" else ""}>{e(t)}</option>'
            for v, t in _GRACES
        )
        expires = (
            datetime.fromtimestamp(r.expires_at, tz=timezone.utc).strftime("%Y-%m-%d")
            if r.expires_at is not None
            else ""
        )
        actions = (
            f'<form class="rotate" method="post" action="{e(row.rotate)}">{csrf_field(csrf)}'
            f'<label>old key works <select name="grace">{graces}</select></label>'
            '<button type="submit">Rotate</button></form>'
            f'<form class="expiry" method="post" action="{e(row.expiry)}">{csrf_field(csrf)}'
            f'<label>expires <input type="date" name="expires_on" value="{expires}"></label>'
            '<button type="submit">Set</button></form>'
            f'<form class="revoke" method="post" action="{e(row.revoke)}">{csrf_field(csrf)}'
            '<button type="submit" class="danger">Revoke</button></form>'
        )
    permissions = " ".join(f"<code>{e(p)}</code>" for p in r.permissions) or "—"
    return [
        f'<code class="key-id">{e(r.id)}</code><br><small>…{e(r.last_four)}</small>',
        e(r.name or ""),
        e(r.mode),
        permissions,
        f'<span class="status {e(row.status)}">{e(row.status)}</span>',
        when(r.created_at),
        when(r.expires_at, "never"),
        when(r.last_used_at, "never"),
        f"{row.requests:,}",
        credits(row.credits),
        actions,
    ]


def keys_page(
    frame: Frame,
    *,
    rows: Sequence[KeyRow],
    total: int,
    page: int,
    pages: int,
    page_href: str,
    create: str,
    revealed: tuple[str, str] | None,
    reveal_missed: bool,
    notice: str | None,
) -> str:
    parts = []
    if revealed is not None:
        key_id, plaintext = revealed
        parts.append(
            '<section class="reveal" role="status"><h2>Your new key</h2>'
            f"<p>Copy it now: this is the only time <code>{e(key_id)}</code>'s secret is "
            "shown. meterkit keeps only a hash of it.</p>"
            f'<p><code id="new-secret" class="secret">{e(plaintext)}</code></p></section>'
        )
    elif reveal_missed:
        parts.append(
            '<p class="notice" id="reveal-gone">A new key\'s secret is shown once, and it '
            "was. If it was not copied, rotate or revoke that key.</p>"
        )
    if notice:
        parts.append(f'<p class="notice" role="status">{e(notice)}</p>')
    modes = "".join(
        f'<option value="{e(m)}"{" selected" if m == frame.mode else ""}>{e(m)}</option>'
        for m, _ in frame.modes
    )
    parts.append(
        '<section class="create"><h2>Create a key</h2>'
        f'<form id="create-key" method="post" action="{e(create)}">{csrf_field(frame.csrf)}'
        '<label>Name <input name="name" maxlength="200" placeholder="production server"></label>'
        f'<label>Mode <select name="mode">{modes}</select></label>'
        '<label>Permissions <input name="permissions" maxlength="2000" '
        'placeholder="invoices:read reports:*"></label>'
        '<label>Expires (UTC date, optional) <input type="date" name="expires_on"></label>'
        '<button type="submit">Create key</button></form>'
        "<p class=note>A key can only grant permissions the key you signed in with holds.</p>"
        "</section>"
    )
    headers = [
        "Key",
        "Name",
        "Mode",
        "Permissions",
        "Status",
        "Created",
        "Expires",
        "Last used",
        "Requests",
        "Credits",
        "Actions",
    ]
    listing = table(
        headers,
        (_key_row(row, frame.csrf) for row in rows),
        cls="keys",
        empty="No keys yet.",
    )
    pager = ""
    if pages > 1:
        links = []
        if page > 1:
            links.append(f'<a rel="prev" href="{e(page_href)}{page - 1}">Previous</a>')
        links.append(f"<span>Page {page} of {pages}</span>")
        if page < pages:
            links.append(f'<a rel="next" href="{e(page_href)}{page + 1}">Next</a>')
        pager = f'<nav class="pager">{"".join(links)}</nav>'
    parts.append(
        f"<section><h2>Keys <small>({total:,}; requests and credits this month)</small></h2>"
        f"{listing}{pager}</section>"
    )
    return _page(frame, "API keys", "API keys", "".join(parts))
