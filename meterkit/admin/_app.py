"""The admin app: the seed's key-management and usage API, and the dashboard, on ASGI."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from typing import Any, Final

from meterkit.admin import _bodies as bodies
from meterkit.admin._dashboard import Dashboard, Redirect, dashboard_routes
from meterkit.admin._http import (
    Message,
    Receive,
    Refusal,
    Reply,
    Request,
    Route,
    Router,
    Scope,
    Send,
    invalid,
    not_found,
    settle,
)
from meterkit.admin._session import Signer
from meterkit.errors import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    InvalidIdentifierError,
    InvalidRequestError,
    MeterkitError,
    UnknownKeyError,
)
from meterkit.http.proxies import Proxies, forwarded_https
from meterkit.http.refusals import HTTPS_REQUIRED
from meterkit.keys.model import INSUFFICIENT, ApiKey, _required_wildcard, check_key_id
from meterkit.keys.rules import KeyRules

__all__ = ["Admin", "AdminMiddleware"]

ORG: Final = "/organizations/{organization_id}"
API_ROUTES: Final = (
    Route("GET", f"{ORG}/api_keys", "list_keys"),
    Route("POST", f"{ORG}/api_keys", "create_key"),
    Route("GET", f"{ORG}/api_keys/{{key_id}}", "get_key"),
    Route("PATCH", f"{ORG}/api_keys/{{key_id}}", "update_key"),
    Route("POST", f"{ORG}/api_keys/{{key_id}}/rotate", "rotate_key"),
    Route("POST", f"{ORG}/api_keys/{{key_id}}/revoke", "revoke_key"),
    Route("GET", f"{ORG}/usage", "usage"),
    Route("GET", f"{ORG}/usage/history", "usage_history"),
)
_MAX_PAGE: Final = 1000
_MAX_HISTORY_DAYS: Final = 366


def _unavailable() -> Refusal:
    return Refusal(
        503,
        "api_error",
        "service_unavailable",
        "The API is temporarily unavailable. Try again shortly.",
        [("Retry-After", "1")],
    )


def refusal_of(exc: MeterkitError) -> Refusal:
    """The seed-shaped answer to an error a store or the meter raised."""
    if isinstance(exc, AuthenticationError):
        extra = [("WWW-Authenticate", "Bearer")] if exc.status == 401 else []
        return Refusal(exc.status, "authentication_error", exc.code, exc.message, extra)
    if isinstance(exc, UnknownKeyError):
        return not_found()
    if isinstance(exc, InvalidRequestError):
        return invalid(str(exc))
    if isinstance(exc, BackendError):
        return _unavailable()
    return Refusal(500, "api_error", "internal_error", "The request could not be completed.")


class Admin:
    """The seed's key-management API and usage dashboard, as one ASGI app.

    ``meter`` is a :class:`~meterkit.Meter` or :class:`~meterkit.AsyncMeter` (its
    usage, and its ledger's history when it has one); ``keystore`` any meterkit key
    store (asynchronous ones are awaited, synchronous ones called inline: give network
    stores in their async form). Routes, relative to where the app is served:

    - ``/organizations/{organization_id}/api_keys`` (``GET`` list, ``POST`` create),
      ``…/api_keys/{key_id}`` (``GET``, ``PATCH`` expiry), ``…/{key_id}/rotate`` and
      ``…/{key_id}/revoke`` (``POST``): for bearer keys holding ``admin_permission``;
    - ``/organizations/{organization_id}/usage`` (this period, from the counters) and
      ``…/usage/history`` (from the ledger): for keys holding ``usage_permission`` or
      ``admin_permission``;
    - ``dashboard`` (``"/dashboard"``; None for none): the pages, for people signed
      in with a key holding ``admin_permission``;
    - ``openapi_path`` (``"/openapi.json"``; None for none): this API's OpenAPI schema.

    Each organization sees only its own keys and usage; a key grants only the
    permissions it holds, and a test-mode key acts on test-mode keys and usage only.
    ``session_secret`` (32 bytes or more) signs the dashboard's cookies: give the same
    one to every process serving the dashboard (None: a random one per process, so
    sessions end when it restarts). Plain HTTP is refused (403 ``https_required``)
    unless ``X-Forwarded-Proto: https`` comes from one of ``trusted_proxies``, or
    ``require_https=False`` (local development only).

    :class:`AdminMiddleware` serves the same app in front of another one.
    """

    def __init__(
        self,
        meter: Any,
        keystore: Any,
        *,
        admin_permission: str = "api_keys:manage",
        usage_permission: str = "usage:read",
        session_secret: bytes | str | None = None,
        session_max_age: float = 8 * 3600,
        dashboard: str | None = "/dashboard",
        openapi_path: str | None = "/openapi.json",
        trusted_proxies: Iterable[str] = (),
        require_https: bool = True,
        history_days: int = 90,
    ) -> None:
        if not callable(getattr(meter, "usage", None)) or getattr(meter, "policy", None) is None:
            raise ConfigurationError("is a meterkit.Meter or AsyncMeter", "meter")
        rules = getattr(keystore, "rules", None)
        if not isinstance(rules, KeyRules) or not callable(getattr(keystore, "set_expiry", None)):
            raise ConfigurationError(
                "is a meterkit key store (memory, Redis or cached)", "keystore"
            )
        for name, permission in (
            ("admin_permission", admin_permission),
            ("usage_permission", usage_permission),
        ):
            try:
                _required_wildcard(permission)
            except InvalidRequestError as exc:
                raise ConfigurationError(str(exc), name) from None
        if not isinstance(require_https, bool):
            raise ConfigurationError("is true or false", "require_https")
        if isinstance(history_days, bool) or not isinstance(history_days, int):
            raise ConfigurationError("is a number of days, 1 to 366", "history_days")
        if not 1 <= history_days <= _MAX_HISTORY_DAYS:
            raise ConfigurationError("is a number of days, 1 to 366", "history_days")
        routes = list(API_ROUTES)
        for what, path in (("dashboard", dashboard), ("openapi_path", openapi_path)):
            if path is not None and (
                not isinstance(path, str) or not path.startswith("/") or path.endswith("/")
            ):
                raise ConfigurationError("is a path such as '/dashboard', or None", what)
        if openapi_path is not None:
            routes.append(Route("GET", openapi_path, "openapi_schema"))
        if dashboard is not None:
            routes.extend(dashboard_routes(dashboard))
        self.meter = meter
        self.keystore = keystore
        self.rules: KeyRules = rules
        self.admin_permission = admin_permission
        self.usage_permission = usage_permission
        self.require_https = require_https
        self.history_days = history_days
        self.dashboard_path = dashboard
        self.openapi_path = openapi_path
        self.signer = Signer(session_secret, session_max_age)
        self._proxies = Proxies(trusted_proxies)
        self.router = Router(routes)
        self.pages = Dashboard(self, dashboard) if dashboard is not None else None
        self._schema: bytes | None = None

    def __repr__(self) -> str:
        return f"Admin(keystore={self.keystore!r}, dashboard={self.dashboard_path!r})"

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handle(scope, receive, send, None)

    async def handle(self, scope: Scope, receive: Receive, send: Send, fallback: Any) -> None:
        """Answer a request for one of this app's routes; pass any other to ``fallback``
        (a 404 without one)."""
        kind = scope["type"]
        if kind != "http":
            if fallback is not None:
                await fallback(scope, receive, send)
            elif kind == "lifespan":
                await _lifespan(receive, send)
            return
        path: str = scope["path"]
        root = scope.get("root_path")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        routes, params = self.router.match(path)
        if not routes:
            if fallback is not None:
                await fallback(scope, receive, send)
                return
            await Reply.refusal(not_found("path")).send(send)
            return
        method: str = scope["method"]
        wanted = "GET" if method == "HEAD" else method
        route = next((r for r in routes if r.method == wanted), None)
        pages = self.pages if routes[0].handler.startswith("page_") else None
        request: Request | None = None
        try:
            if route is None:
                methods = {r.method for r in routes}
                allowed = sorted(methods | {"HEAD"} if "GET" in methods else methods)
                raise Refusal(
                    405,
                    "invalid_request_error",
                    "method_not_allowed",
                    "This API endpoint does not accept this HTTP method.",
                    [("Allow", ", ".join(allowed))],
                )
            request = Request(scope, receive, path, params)
            if not self._secure(request):
                raise Refusal(*HTTPS_REQUIRED)
            reply: Reply = await getattr(pages or self, route.handler)(request)
        except Redirect as going:
            reply = going.reply
        except (Refusal, MeterkitError) as exc:
            refused = exc if isinstance(exc, Refusal) else refusal_of(exc)
            reply = pages.refusal(request, refused) if pages else Reply.refusal(refused)
        await reply.send(send, head_only=method == "HEAD")

    def _secure(self, request: Request) -> bool:
        if request.scheme == "https" or not self.require_https:
            return True
        proto = request.headers.get("x-forwarded-proto")
        return proto is not None and request.peer in self._proxies and forwarded_https(proto)

    # -- who is calling -------------------------------------------------------------------

    def now(self) -> float:
        """The key store's clock: what decides expiry decides what pages call today."""
        return self.rules.clock()

    def today(self) -> date:
        from datetime import datetime, timezone

        return datetime.fromtimestamp(self.now(), tz=timezone.utc).date()

    def refuse(self, code: str, message: str | None = None) -> AuthenticationError:
        """A refusal with the key store's status for ``code``."""
        return AuthenticationError(code, message, status=self.rules.statuses[code])

    async def caller(self, request: Request, *permissions: str) -> ApiKey:
        """The bearer key, authenticated for the path's organization, holding one of
        ``permissions``."""
        header = request.headers.get("authorization")
        org = request.params["organization_id"]
        key: ApiKey = await settle(self.keystore.authenticate(header, org=org, permission=None))
        if not any(key.grants(p) for p in permissions):
            raise self.refuse(INSUFFICIENT)
        return key

    def may_act_on(self, caller: ApiKey, target_mode: str, permissions: Iterable[str]) -> None:
        """Refuse a change a key may not make: a test-mode key acting on live keys, or a
        key handing out (by create or rotate) a permission it does not hold."""
        if caller.mode == "test" and target_mode != "test":
            raise self.refuse(INSUFFICIENT, "A test-mode key manages test-mode keys only.")
        for permission in permissions:
            if not caller.grants(permission):
                raise self.refuse(
                    INSUFFICIENT, f"A key can only grant permissions it holds: {permission}."
                )

    async def key_of(self, org: str, key_id: str) -> ApiKey:
        """The organization's key ``key_id``: 404 for an unknown id, a malformed one or
        another organization's (which are told apart from nothing)."""
        try:
            check_key_id(key_id)
        except InvalidIdentifierError:
            raise not_found() from None
        record: ApiKey | None = await settle(self.keystore.get(key_id))
        if record is None or record.org != org:
            raise not_found()
        return record

    def active(self, record: ApiKey) -> None:
        state = record.status(self.now())
        if state != "active":
            raise Refusal(
                409,
                "invalid_request_error",
                "api_key_not_active",
                f"This API key is {state}; create a new key instead.",
            )

    @staticmethod
    def only(request: Request, *names: str) -> None:
        unknown = sorted(set(request.query) - set(names))
        if unknown:
            raise invalid(f"Unknown query parameter {unknown[0][:40]!r}.")

    # -- keys -----------------------------------------------------------------------------

    async def list_keys(self, request: Request) -> Reply:
        self.only(request, "limit", "after")
        await self.caller(request, self.admin_permission)
        limit_text = request.query.get("limit", "100")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= _MAX_PAGE:
            raise invalid(f"limit is a whole number from 1 to {_MAX_PAGE}.")
        limit = int(limit_text)
        org = request.params["organization_id"]
        records: list[ApiKey] = await settle(self.keystore.list(org))
        start = 0
        after = request.query.get("after")
        if after is not None:
            start = next((i + 1 for i, r in enumerate(records) if r.id == after), -1)
            if start < 0:
                raise invalid("after is not the id of a key of this organization.")
        page = records[start : start + limit]
        more = start + limit < len(records)
        now = self.now()
        return Reply.json(
            200,
            {
                "data": [bodies.key_body(r, now) for r in page],
                "has_more": more,
                "next_after": page[-1].id if more and page else None,
            },
        )

    async def create_key(self, request: Request) -> Reply:
        self.only(request)
        caller = await self.caller(request, self.admin_permission)
        body: bodies.CreateKeyRequest = await request.json(bodies.CreateKeyRequest)
        mode = body.mode or caller.mode
        self.may_act_on(caller, mode, body.permissions)
        plaintext, record = await settle(
            self.keystore.create(
                org=request.params["organization_id"],
                mode=mode,
                permissions=body.permissions,
                expires_at=body.expires_at,
                name=body.name,
            )
        )
        return Reply.json(201, {**bodies.key_body(record, self.now()), "secret": str(plaintext)})

    async def get_key(self, request: Request) -> Reply:
        self.only(request)
        await self.caller(request, self.admin_permission)
        record = await self.key_of(request.params["organization_id"], request.params["key_id"])
        return Reply.json(200, bodies.key_body(record, self.now()))

    async def update_key(self, request: Request) -> Reply:
        self.only(request)
        caller = await self.caller(request, self.admin_permission)
        body: bodies.UpdateKeyRequest = await request.json(bodies.UpdateKeyRequest)
        record = await self.key_of(request.params["organization_id"], request.params["key_id"])
        self.may_act_on(caller, record.mode, ())
        self.active(record)
        changed = await settle(self.keystore.set_expiry(record.id, body.expires_at))
        return Reply.json(200, bodies.key_body(changed, self.now()))

    async def rotate_key(self, request: Request) -> Reply:
        self.only(request)
        caller = await self.caller(request, self.admin_permission)
        body: bodies.RotateKeyRequest = await request.json(bodies.RotateKeyRequest)
        record = await self.key_of(request.params["organization_id"], request.params["key_id"])
        self.may_act_on(caller, record.mode, record.permissions)
        self.active(record)
        plaintext, new = await settle(self.keystore.rotate(record.id, grace=body.grace_period))
        previous = await self.key_of(record.org, record.id)
        now = self.now()
        return Reply.json(
            201,
            {
                **bodies.key_body(new, now),
                "secret": str(plaintext),
                "previous": bodies.key_body(previous, now),
            },
        )

    async def revoke_key(self, request: Request) -> Reply:
        self.only(request)
        caller = await self.caller(request, self.admin_permission)
        await request.json(bodies.RevokeKeyRequest)
        record = await self.key_of(request.params["organization_id"], request.params["key_id"])
        self.may_act_on(caller, record.mode, ())
        revoked = await settle(self.keystore.revoke(record.id))
        return Reply.json(200, bodies.key_body(revoked, self.now()))

    # -- usage ----------------------------------------------------------------------------

    async def usage_scope(self, request: Request, caller: ApiKey) -> tuple[str | None, str]:
        """The ``key`` and ``mode`` a usage request asks about (the caller's mode by
        default; a test-mode key sees test usage only)."""
        org = request.params["organization_id"]
        mode = request.query.get("mode", caller.mode)
        if mode not in ("live", "test"):
            raise invalid("mode is 'live' or 'test'.")
        if caller.mode == "test" and mode != "test":
            raise self.refuse(INSUFFICIENT, "A test-mode key sees test-mode usage only.")
        key_id = request.query.get("key")
        if key_id is not None:
            key_id = (await self.key_of(org, key_id)).id
        return key_id, mode

    async def usage(self, request: Request) -> Reply:
        self.only(request, "key", "mode")
        caller = await self.caller(request, self.usage_permission, self.admin_permission)
        key_id, mode = await self.usage_scope(request, caller)
        found = await settle(self.meter.usage(request.params["organization_id"], key_id, mode))
        return Reply.json(200, {**found.to_dict(), "mode": mode})

    async def usage_history(self, request: Request) -> Reply:
        self.only(request, "key", "mode", "period", "since", "until")
        caller = await self.caller(request, self.usage_permission, self.admin_permission)
        key_id, mode = await self.usage_scope(request, caller)
        if getattr(self.meter, "ledger", None) is None:
            raise Refusal(
                501,
                "api_error",
                "history_unavailable",
                "This server keeps no usage history: its meter has no ledger.",
            )
        period = request.query.get("period")
        since, until = request.query.get("since"), request.query.get("until")
        if period is None:
            _history_span(since, until)
        elif since is not None or until is not None:
            raise invalid("Give a period, or since and until, not both.")
        found = await settle(
            self.meter.usage(
                request.params["organization_id"],
                key_id,
                mode,
                period=period,
                since=since,
                until=until,
            )
        )
        return Reply.json(200, found.to_dict())

    # -- the schema -----------------------------------------------------------------------

    def openapi(self) -> dict[str, Any]:
        """This app's OpenAPI 3.1 schema (the API's routes; the dashboard's pages are
        not an API and are left out)."""
        from meterkit.admin._openapi import document

        return document(self)

    async def openapi_schema(self, request: Request) -> Reply:
        self.only(request)
        if self._schema is None:
            self._schema = Reply.json(200, self.openapi()).body
        return Reply(200, [("Content-Type", "application/json")], self._schema)


def _history_span(since: str | None, until: str | None) -> None:
    """Refuse a date range that is missing, malformed or longer than 366 days (the
    ledger reads any span; a page of this API stays bounded)."""
    if since is None or until is None:
        raise invalid("Give a period ('2026-11'), or since and until ('YYYY-MM-DD').")
    try:
        first, end = date.fromisoformat(since), date.fromisoformat(until)
    except ValueError:
        raise invalid("since and until are dates, 'YYYY-MM-DD'.") from None
    if not 0 < (end - first).days <= _MAX_HISTORY_DAYS:
        raise invalid(f"until is 1 to {_MAX_HISTORY_DAYS} days after since.")


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop: answer the server's lifespan messages."""
    while True:
        message: Message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class AdminMiddleware:
    """An :class:`Admin` app in front of another ASGI app: the admin routes go to the
    admin app, everything else (and the lifespan) to ``app``. Starlette and FastAPI:
    ``app.add_middleware(AdminMiddleware, admin=admin)``, added after any
    :class:`~meterkit.asgi.MeterMiddleware`, so that it runs first and the admin
    routes are not metered."""

    def __init__(self, app: Any, admin: Admin) -> None:
        if not isinstance(admin, Admin):
            raise ConfigurationError("is a meterkit.admin.Admin", "admin")
        self.app = app
        self.admin = admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.admin.handle(scope, receive, send, self.app)
