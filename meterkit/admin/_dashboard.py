"""The dashboard's handlers: sign-in, the usage overview, the keys and their forms.

Sessions, CSRF tokens and the one-time reveal of a new key are :mod:`._session`'s;
the HTML is :mod:`._pages`'s; the charts :mod:`._charts`'s. Every change a form makes
goes through the same checks as the API's (:class:`~meterkit.admin.Admin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import urllib.parse
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

from meterkit.admin import _charts as charts
from meterkit.admin import _pages as pages
from meterkit.admin._http import Refusal, Reply, Request, Route, invalid, settle
from meterkit.errors import AuthenticationError
from meterkit.keys.model import ApiKey

if TYPE_CHECKING:
    from meterkit.admin._app import Admin
    from meterkit.admin._session import Session

__all__ = ["Dashboard", "Redirect", "dashboard_routes"]

SESSION: Final = "mk_session"
SIGN_IN: Final = "mk_sign_in"
REVEAL: Final = "mk_reveal"
PAGE_SIZE: Final = 100
TOP_KEYS: Final = 25
_REVEAL_SECONDS: Final = 300
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_GRACES: Final = frozenset({"0", "3600", "86400", "604800"})
_CSP: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def dashboard_routes(prefix: str) -> list[Route]:
    org = f"{prefix}/organizations/{{organization_id}}"
    return [
        Route("GET", prefix, "page_home"),
        Route("POST", f"{prefix}/sign-in", "page_sign_in"),
        Route("POST", f"{prefix}/sign-out", "page_sign_out"),
        Route("GET", f"{prefix}/dashboard.css", "page_css"),
        Route("GET", org, "page_overview"),
        Route("GET", f"{org}/keys", "page_keys"),
        Route("POST", f"{org}/keys", "page_create"),
        Route("POST", f"{org}/keys/{{key_id}}/rotate", "page_rotate"),
        Route("POST", f"{org}/keys/{{key_id}}/revoke", "page_revoke"),
        Route("POST", f"{org}/keys/{{key_id}}/expiry", "page_expiry"),
    ]


def _css() -> bytes:
    return resources.files("meterkit.admin").joinpath("dashboard.css").read_bytes()


def html(status: int, text: str, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(
        status,
        [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Security-Policy", _CSP),
            *(headers or []),
        ],
        text.encode("utf-8"),
    )


def redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(303, [("Location", location), *(headers or [])], b"")


class Dashboard:
    """The pages of one :class:`~meterkit.admin.Admin` app, under ``prefix``."""

    def __init__(self, admin: Admin, prefix: str) -> None:
        self.admin = admin
        self.prefix = prefix
        self._stylesheet = _css()

    # -- paths and cookies ----------------------------------------------------------------

    def base(self, request: Request) -> str:
        return request.root + self.prefix

    def org_path(self, request: Request, org: str, tail: str = "") -> str:
        return f"{self.base(request)}/organizations/{urllib.parse.quote(org, safe='')}{tail}"

    def cookie(
        self, request: Request, name: str, value: str, max_age: int, path: str | None = None
    ) -> tuple[str, str]:
        """A Set-Cookie header: HttpOnly, SameSite=Strict, and Secure whenever the
        request came over HTTPS (always, unless ``require_https=False``)."""
        secure = "; Secure" if request.scheme == "https" or self.admin.require_https else ""
        where = path or self.base(request)
        return (
            "Set-Cookie",
            f"{name}={value}; Path={where}; Max-Age={max_age}; HttpOnly{secure}; SameSite=Strict",
        )

    def forget(self, request: Request, name: str) -> tuple[str, str]:
        return self.cookie(request, name, "", 0)

    # -- who is signed in -----------------------------------------------------------------

    def same_origin(self, request: Request) -> None:
        """Refuse a form posted from another site, before its token is even read: the
        browser's Sec-Fetch-Site says so, or else an Origin naming another host."""
        site = request.headers.get("sec-fetch-site")
        origin = request.headers.get("origin")
        if site is not None:
            fine = site in ("same-origin", "none")
        elif origin is not None:
            fine = urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")
        else:
            fine = True  # not a browser: the CSRF token alone decides
        if not fine:
            raise Refusal(
                403,
                "invalid_request_error",
                "cross_site_request",
                "This form was sent from another site.",
            )

    async def signed_in(self, request: Request, *, form: bool = False) -> tuple[Session, ApiKey]:
        """The session and its key, still active, of the path's organization, holding
        the admin permission; a redirect to the sign-in page otherwise."""
        admin = self.admin
        session = admin.signer.session(request.cookie(SESSION), admin.now())
        if session is None:
            raise Redirect(self.base(request))
        record: ApiKey | None = await settle(admin.keystore.get(session.key_id))
        if (
            record is None
            or record.org != session.org
            or record.status(admin.now()) != "active"
            or not record.grants(admin.admin_permission)
        ):
            raise Redirect(f"{self.base(request)}?ended=1", [self.forget(request, SESSION)])
        if request.params.get("organization_id", session.org) != session.org:
            raise admin.refuse("organization_not_found")
        if form:
            self.same_origin(request)
        return session, record

    async def checked_form(self, request: Request) -> tuple[Session, ApiKey, dict[str, str]]:
        session, key = await self.signed_in(request, form=True)
        fields = await request.form()
        if not self.admin.signer.csrf_ok(session, fields.get("csrf")):
            raise Refusal(
                403,
                "invalid_request_error",
                "csrf_token_invalid",
                "This form has expired or did not come from this dashboard. Reload and retry.",
            )
        return session, key, fields

    def mode_of(self, request: Request, key: ApiKey) -> str:
        mode = request.query.get("mode", key.mode)
        if mode not in ("live", "test"):
            raise invalid("mode is 'live' or 'test'.")
        if key.mode == "test" and mode != "test":
            raise self.admin.refuse(
                "insufficient_permissions", "A test-mode key sees test-mode usage only."
            )
        return mode

    def frame(
        self, request: Request, session: Session, key: ApiKey, mode: str, here: str
    ) -> pages.Frame:
        org = session.org
        switch = ("live", "test") if key.mode == "live" else ("test",)
        return pages.Frame(
            css=f"{self.base(request)}/dashboard.css",
            home=self.base(request),
            org=org,
            key=key,
            csrf=self.admin.signer.csrf_token(session),
            sign_out=f"{self.base(request)}/sign-out",
            overview=self.org_path(request, org) + f"?mode={mode}",
            keys=self.org_path(request, org, "/keys") + f"?mode={mode}",
            mode=mode,
            modes=[(m, f"{here}?mode={m}") for m in switch],
        )

    # -- the pages ------------------------------------------------------------------------

    async def page_css(self, request: Request) -> Reply:
        return Reply(200, [("Content-Type", "text/css; charset=utf-8")], self._stylesheet)

    async def page_home(self, request: Request) -> Reply:
        try:
            session, _ = await self.signed_in(request)
        except Redirect:
            return self.sign_in_form(request, None, 200)
        return redirect(self.org_path(request, session.org))

    def sign_in_form(self, request: Request, message: str | None, status: int) -> Reply:
        nonce = secrets.token_urlsafe(16)
        text = pages.sign_in_page(
            css=f"{self.base(request)}/dashboard.css",
            action=f"{self.base(request)}/sign-in",
            token=self.admin.signer.sign_in_token(nonce),
            message=message,
            ended=request.query.get("ended") == "1",
        )
        return html(status, text, [self.cookie(request, SIGN_IN, nonce, 3600)])

    async def page_sign_in(self, request: Request) -> Reply:
        admin = self.admin
        self.same_origin(request)
        fields = await request.form()
        if not admin.signer.sign_in_ok(request.cookie(SIGN_IN), fields.get("csrf")):
            return self.sign_in_form(request, "The sign-in form expired. Try again.", 403)
        presented = fields.get("key", "").strip()
        try:
            key: ApiKey = await settle(
                admin.keystore.authenticate(f"Bearer {presented}", org=None, permission=None)
            )
            if not key.grants(admin.admin_permission):
                raise admin.refuse("insufficient_permissions")
        except AuthenticationError as exc:
            # The seed's message, and never the key that was typed.
            return self.sign_in_form(request, exc.message, exc.status)
        cookie, _ = admin.signer.session_cookie(key.id, key.org, admin.now())
        max_age = int(admin.signer.max_age)
        return redirect(
            self.org_path(request, key.org),
            [self.cookie(request, SESSION, cookie, max_age), self.forget(request, SIGN_IN)],
        )

    async def page_sign_out(self, request: Request) -> Reply:
        with contextlib.suppress(Redirect):  # (already signed out)
            await self.checked_form(request)
        return redirect(self.base(request), [self.forget(request, SESSION)])

    async def page_overview(self, request: Request) -> Reply:
        admin = self.admin
        admin.only(request, "mode")
        session, key = await self.signed_in(request)
        mode = self.mode_of(request, key)
        org = session.org
        today = admin.today()
        # Three stores, asked at once: the counters, the keys, the ledger.
        usage, records, history = await asyncio.gather(
            settle(admin.meter.usage(org, None, mode)),
            settle(admin.keystore.list(org)),
            self.history(org, mode, today),
        )
        names = {r.id: r.name or "" for r in records}
        start = usage.period_start.date()
        end = usage.period_end.date()
        used_by_day: list[tuple[date, Decimal]] = []
        requests_chart = credits_chart = None
        if history is not None:
            used_by_day = [(d.day, d.credits) for d in history.days]
            requests_chart = charts.daily_bars(
                "requests",
                values=[(d.day, float(d.requests)) for d in history.days],
                since=history.since,
                until=history.until,
                label="requests",
                unit="requests",
            )
            credits_chart = charts.daily_bars(
                "credits",
                values=[(d.day, float(d.credits)) for d in history.days],
                since=history.since,
                until=history.until,
                label="credits",
                unit="credits",
            )
            note = (
                "From the ledger: what its drain has moved so far (the figures above "
                "are the counters', in real time)."
            )
        else:
            note = (
                "Daily history comes from the ledger, and this server's meter has none: "
                "only this month's totals are shown (see the ledger docs)."
            )
        burn_down, summary = charts.burn_down(
            allowance=usage.allowance,
            used_now=usage.credits_used,
            start=start,
            end=end,
            today=today,
            used_by_day=used_by_day,
        )
        text = pages.overview_page(
            self.frame(request, session, key, mode, self.org_path(request, org)),
            usage=usage,
            names=names,
            burn_down=burn_down,
            summary=summary,
            history=history,
            requests_chart=requests_chart,
            credits_chart=credits_chart,
            history_note=note,
            top_keys=TOP_KEYS,
        )
        return html(200, text)

    async def history(self, org: str, mode: str, today: date) -> Any:
        """The last ``history_days`` days of usage from the meter's ledger, or None."""
        admin = self.admin
        if getattr(admin.meter, "ledger", None) is None:
            return None
        since = today - timedelta(days=admin.history_days - 1)
        return await settle(
            admin.meter.usage(org, None, mode, since=since, until=today + timedelta(days=1))
        )

    async def page_keys(self, request: Request) -> Reply:
        admin = self.admin
        admin.only(request, "mode", "page", "reveal", "created", "done")
        session, key = await self.signed_in(request)
        mode = self.mode_of(request, key)
        org = session.org
        page_text = request.query.get("page", "1")
        if not page_text.isdigit() or int(page_text) < 1 or len(page_text) > 6:
            raise invalid("page is a page number, from 1.")
        records, usage = await asyncio.gather(
            settle(admin.keystore.list(org)), settle(admin.meter.usage(org, None, mode))
        )
        count = len(records)
        pages_total = max((count + PAGE_SIZE - 1) // PAGE_SIZE, 1)
        page = min(int(page_text), pages_total)
        # Newest first: the key just made is at the top of the first page.
        shown = records[::-1][(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        now = admin.now()
        rows = []
        for record in shown:
            used = usage.keys.get(record.id)
            tail = f"/keys/{record.id}"
            rows.append(
                pages.KeyRow(
                    record=record,
                    status=record.status(now),
                    requests=used.requests if used else 0,
                    credits=used.credits if used else Decimal(0),
                    rotate=self.org_path(request, org, f"{tail}/rotate"),
                    revoke=self.org_path(request, org, f"{tail}/revoke"),
                    expiry=self.org_path(request, org, f"{tail}/expiry"),
                )
            )
        extra: list[tuple[str, str]] = []
        revealed = None
        missed = False
        if "reveal" in request.query:
            extra.append(self.forget(request, REVEAL))
            plaintext = admin.signer.revealed(
                request.cookie(REVEAL), request.query["reveal"], session
            )
            created = request.query.get("created")
            fmt = admin.rules.format
            if (
                plaintext is not None
                and fmt.is_well_formed(plaintext)
                and fmt.key_id(plaintext) == created
                and any(r.id == created for r in records)
            ):
                revealed = (created, plaintext)
            else:
                missed = True
        done = request.query.get("done")
        notice = {
            "revoked": "Key revoked: it no longer authenticates.",
            "expiry": "Expiry changed.",
        }.get(done or "")
        keys_path = self.org_path(request, org, "/keys")
        text = pages.keys_page(
            self.frame(request, session, key, mode, keys_path),
            rows=rows,
            total=count,
            page=page,
            pages=pages_total,
            page_href=f"{keys_path}?mode={mode}&page=",
            create=keys_path,
            revealed=revealed,
            reveal_missed=missed,
            notice=notice,
        )
        return html(200, text, extra)

    def revealing(self, request: Request, session: Session, plaintext: str, key_id: str) -> Reply:
        """Redirect to the keys page, which shows ``plaintext`` once (see _session)."""
        cookie, share = self.admin.signer.reveal_shares(plaintext, session)
        mode = "test" if plaintext.split("_", 2)[1] == "test" else "live"
        query = urllib.parse.urlencode({"mode": mode, "created": key_id, "reveal": share})
        return redirect(
            f"{self.org_path(request, session.org, '/keys')}?{query}",
            [self.cookie(request, REVEAL, cookie, _REVEAL_SECONDS)],
        )

    async def page_create(self, request: Request) -> Reply:
        admin = self.admin
        admin.only(request)
        session, key, fields = await self.checked_form(request)
        mode = fields.get("mode", key.mode)
        if mode not in ("live", "test"):
            raise invalid("mode is 'live' or 'test'.")
        permissions = fields.get("permissions", "").replace(",", " ").split()
        if len(permissions) > 64 or any(len(p) > 129 for p in permissions):
            raise invalid("permissions: at most 64, each like 'invoices:read'.")
        name = fields.get("name", "").strip() or None
        if name is not None and len(name) > 200:
            raise invalid("name: at most 200 characters.")
        expires = _day(fields.get("expires_on", ""))
        admin.may_act_on(key, mode, permissions)
        plaintext, record = await settle(
            admin.keystore.create(
                org=session.org, mode=mode, permissions=permissions, expires_at=expires, name=name
            )
        )
        return self.revealing(request, session, str(plaintext), record.id)

    async def target(self, request: Request, session: Session) -> ApiKey:
        """The organization's key the form's path names (404 for any other)."""
        return await self.admin.key_of(session.org, request.params["key_id"])

    async def page_rotate(self, request: Request) -> Reply:
        admin = self.admin
        admin.only(request)
        session, key, fields = await self.checked_form(request)
        grace = fields.get("grace", "86400")
        if grace not in _GRACES:
            raise invalid("grace is one of the offered periods.")
        record = await self.target(request, session)
        admin.may_act_on(key, record.mode, record.permissions)
        admin.active(record)
        plaintext, new = await settle(admin.keystore.rotate(record.id, grace=int(grace)))
        return self.revealing(request, session, str(plaintext), new.id)

    async def page_revoke(self, request: Request) -> Reply:
        admin = self.admin
        admin.only(request)
        session, key, _ = await self.checked_form(request)
        record = await self.target(request, session)
        admin.may_act_on(key, record.mode, ())
        await settle(admin.keystore.revoke(record.id))
        query = urllib.parse.urlencode({"mode": record.mode, "done": "revoked"})
        return redirect(f"{self.org_path(request, session.org, '/keys')}?{query}")

    async def page_expiry(self, request: Request) -> Reply:
        admin = self.admin
        admin.only(request)
        session, key, fields = await self.checked_form(request)
        expires = _day(fields.get("expires_on", ""))
        record = await self.target(request, session)
        admin.may_act_on(key, record.mode, ())
        admin.active(record)
        await settle(admin.keystore.set_expiry(record.id, expires))
        query = urllib.parse.urlencode({"mode": record.mode, "done": "expiry"})
        return redirect(f"{self.org_path(request, session.org, '/keys')}?{query}")

    def refusal(self, request: Request | None, refused: Refusal) -> Reply:
        """A refusal as a page (the API's bodies are JSON; people get HTML)."""
        base = (request.root if request is not None else "") + self.prefix
        text = pages.error_page(
            css=f"{base}/dashboard.css",
            status=refused.status,
            code=refused.code,
            message=refused.message,
            back=base,
        )
        return html(refused.status, text, refused.headers)


class Redirect(Exception):
    """Not signed in (any more): go to the sign-in page."""

    def __init__(self, location: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(location)
        self.reply = redirect(location, headers)


def _day(text: str) -> datetime | None:
    """An ``<input type=date>`` value as 00:00 UTC of that day; '' for none."""
    text = text.strip()
    if not text:
        return None
    if not _DATE.fullmatch(text):
        raise invalid("Dates are YYYY-MM-DD.")
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise invalid("Dates are YYYY-MM-DD.") from None
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
