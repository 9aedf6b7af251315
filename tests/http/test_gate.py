"""The gate every HTTP shell calls, without a server: routing, options, one validation."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meterkit
from meterkit.errors import ConfigurationError
from meterkit.http.gate import (
    REFUSALS,
    Admission,
    Gate,
    RequestView,
    Response,
    Router,
    forwarded_https,
)
from meterkit.keys.memory import MemoryKeyStore
from tests._servers import free_port
from tests.conftest import FakeClock

ORG = "org_a"


class Setup:
    """A gate on the seed's policy, a memory meter and key store, and one key of ORG."""

    def __init__(self, policy: meterkit.Policy | None = None, **options: Any) -> None:
        self.clock = FakeClock()
        self.policy = policy or meterkit.Policy.crane_ledger()
        self.meter = meterkit.Meter(self.policy, meterkit.MemoryBackend(clock=self.clock))
        self.store = MemoryKeyStore(clock=self.clock, org_pattern=options.pop("org_pattern", None))
        plaintext, self.key = self.store.create(org=ORG, permissions=["*"])
        self.auth = f"Bearer {plaintext}"
        self.gate = Gate(self.meter, self.store, **options)

    def decide(
        self,
        method: str,
        path: str,
        *,
        scheme: str = "https",
        peer: str | None = None,
        key: bool = True,
        **headers: str,
    ) -> Response | Admission | None:
        sent = {name.replace("_", "-"): value for name, value in headers.items()}
        if key:
            sent.setdefault("authorization", self.auth)
        view = RequestView(method, path, scheme=scheme, peer=peer, headers=sent)
        return self.gate.admit_blocking(view)


def status(found: Response | Admission | None) -> int | None:
    if found is None:
        return None
    return found.status if isinstance(found, Response) else 200


def test_router_prefers_literal_segments_and_maps_head_to_get() -> None:
    """A literal segment wins over a parameter; HEAD uses the GET route; the org is taken
    from its segment and checked against the key."""
    seed = meterkit.Policy.crane_ledger()
    export = "GET /organizations/{organization_id}/invoices/export"
    routes = {**seed.routes, export: "reports.summary"}
    s = Setup(meterkit.Policy(seed.tiers, seed.costs, seed.credits, routes=routes))
    found = s.decide("GET", f"/organizations/{ORG}/invoices/export")
    assert isinstance(found, Admission)
    assert found.decision.operation == "reports.summary"
    found = s.decide("GET", f"/organizations/{ORG}/invoices/inv_9")
    assert isinstance(found, Admission)
    assert (found.decision.org, found.decision.operation) == (ORG, "invoices.get")
    found = s.decide("HEAD", f"/organizations/{ORG}/invoices")
    assert isinstance(found, Admission)
    assert found.decision.operation == "invoices.list"
    other = s.decide("GET", "/organizations/org_b/invoices")
    assert isinstance(other, Response)
    assert (other.status, b"organization_not_found" in other.body) == (401, True)


_TEMPLATE_SEGMENTS = st.lists(st.sampled_from(["a", "b", "{p}"]), min_size=1, max_size=3)


@settings(max_examples=300)
@given(
    templates=st.lists(
        st.tuples(st.sampled_from(["GET", "POST"]), _TEMPLATE_SEGMENTS), min_size=2, max_size=10
    ),
    path=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3),
    method=st.sampled_from(["GET", "POST", "HEAD"]),
)
def test_router_agrees_with_a_reference(
    templates: list[tuple[str, list[str]]], path: list[str], method: str
) -> None:
    """The trie finds, among the templates that match a path, the one with literals
    earliest (the most specific), as a brute-force search over all templates does."""
    seed = meterkit.Policy.crane_ledger()
    operations = sorted(seed.operations)
    routes: dict[str, str] = {}
    for method_, segments in templates:
        named = [f"{{p{i}}}" if seg == "{p}" else seg for i, seg in enumerate(segments)]
        template = "/".join(["/organizations/{organization_id}", *named])
        routes.setdefault(f"{method_} {template}", operations[len(routes) % len(operations)])
    router = Router(routes, meterkit.Policy(seed.tiers, seed.costs, seed.credits, routes=routes))

    def reference(wanted: str) -> str | None:
        best: tuple[tuple[bool, ...], str] | None = None
        for spec, operation in routes.items():
            spec_method, _, template = spec.partition(" ")
            segments = template.split("/")[3:]
            if spec_method != wanted or len(segments) != len(path):
                continue
            pairs = zip(segments, path, strict=True)
            if all((s.startswith("{") and p) or s == p for s, p in pairs):
                rank = tuple(not s.startswith("{") for s in segments)
                if best is None or rank > best[0]:
                    best = (rank, operation)
        return best[1] if best else None

    expected = reference(method)
    if expected is None and method == "HEAD":
        expected = reference("GET")
    found = router.match(method, ["", "organizations", "org_a", *path])
    assert (found.operation if found else None) == expected


def test_paths_outside_the_route_table() -> None:
    """Under the API, an unknown path is 401 to an anonymous caller, then 404 (405 with
    Allow when only the method is wrong); paths outside it are 404 at once."""
    s = Setup()
    for path in (f"/organizations/{ORG}/invoices/", f"/organizations/{ORG}/invoices/i/pdf/x"):
        assert status(s.decide("GET", path, key=False)) == 401
        assert status(s.decide("GET", path)) == 404
    wrong = s.decide("PATCH", f"/organizations/{ORG}/invoices")
    assert isinstance(wrong, Response)
    assert (wrong.status, dict(wrong.headers)["Allow"]) == (405, "GET, HEAD, POST")
    for path in ("/", "/organizations", "/organizations/", "/v1/organizations/org_a/invoices"):
        assert status(s.decide("GET", path, key=False)) == 404


def test_routes_without_an_organization_take_the_keys() -> None:
    """A table whose routes name no organization meters each key in its own organization;
    unknown paths under it are authenticated, then 404."""
    seed = meterkit.Policy.crane_ledger()
    routes = {"GET /v1/items": "invoices.list", "POST /v1/items/{item_id}/pdf": "invoices.pdf"}
    s = Setup(meterkit.Policy(seed.tiers, seed.costs, seed.credits, routes=routes))
    found = s.decide("POST", "/v1/items/it_1/pdf")
    assert isinstance(found, Admission)
    assert (found.decision.org, found.decision.charged) == (ORG, meterkit.from_micro(250_000))
    assert status(s.decide("GET", "/v1/nothing", key=False)) == 401
    assert status(s.decide("GET", "/v1/nothing")) == 404
    assert status(s.decide("GET", "/elsewhere", key=False)) == 404


def test_org_from_a_path_parameter_of_any_shape() -> None:
    """org='path:project_id' reads the project from the path; the key store checks it
    against the key (its own id rule: proj_…)."""
    seed = meterkit.Policy.crane_ledger()
    routes = {"GET /v1/projects/{project_id}/items": "invoices.list"}
    policy = meterkit.Policy(seed.tiers, seed.costs, seed.credits, routes=routes)
    s = Setup(policy, org="path:project_id", org_pattern=r"(org|proj)_[a-z0-9]+")
    mine, _ = s.store.create(org="proj_abc", permissions=["invoices:read"])
    found = s.decide("GET", "/v1/projects/proj_abc/items", authorization=f"Bearer {mine}")
    assert isinstance(found, Admission)
    assert found.decision.org == "proj_abc"
    other = s.decide("GET", "/v1/projects/proj_xyz/items", authorization=f"Bearer {mine}")
    assert status(other) == 401


def test_org_from_a_header_and_a_missing_one() -> None:
    """org='header:X-Org' reads the organization from a header; without it the request
    is 400 organization_required, and nothing is charged."""
    seed = meterkit.Policy.crane_ledger()
    policy = meterkit.Policy(
        seed.tiers, seed.costs, seed.credits, routes={"GET /v1/items": "invoices.list"}
    )
    s = Setup(policy, org="header:X-Org")
    found = s.decide("GET", "/v1/items", x_org=ORG)
    assert isinstance(found, Admission)
    missing = s.decide("GET", "/v1/items")
    assert isinstance(missing, Response)
    assert (missing.status, b"organization_required" in missing.body) == (400, True)
    assert s.meter.usage(ORG).requests == 1


def test_a_route_that_cannot_serve_the_org_option_is_refused() -> None:
    """org='path:project_id' on a table with a route lacking {project_id} is refused when
    the gate is made, naming the operation."""
    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    with pytest.raises(ConfigurationError, match="project_id"):
        Gate(meter, MemoryKeyStore(), org="path:project_id")


def test_caller_by_ip_behind_trusted_proxies() -> None:
    """caller='ip' meters the client's address: the peer's, or behind a trusted proxy the
    last X-Forwarded-For hop that is not a proxy; no key store is asked."""
    seed = meterkit.Policy.crane_ledger()
    tier = meterkit.Tier("per-ip", "key", "2/minute", "sliding_log")
    policy = meterkit.Policy(
        [tier], seed.costs, seed.credits, routes={"POST /v1/login": "usage.get"}
    )
    meter = meterkit.Meter(policy, meterkit.MemoryBackend(clock=FakeClock()))
    gate = Gate(meter, caller="ip", trusted_proxies=["10.0.0.0/8"])

    def login(peer: str, forwarded: str | None = None) -> Response | Admission | None:
        headers = {"x-forwarded-for": forwarded} if forwarded else {}
        return gate.admit_blocking(RequestView("POST", "/v1/login", peer=peer, headers=headers))

    first = login("203.0.113.9")
    assert isinstance(first, Admission)
    assert first.key is None
    assert (first.decision.key, first.decision.org) == ("ip:203.0.113.9", "ip:203.0.113.9")
    assert status(login("10.0.0.2", "198.51.100.1, 203.0.113.9, 10.0.0.7")) == 200
    assert status(login("10.1.1.1", "203.0.113.9")) == 429
    # a client's own X-Forwarded-For, not through a trusted proxy, is not believed
    assert status(login("198.51.100.7", "203.0.113.9")) == 200


def test_per_operation_callers_and_a_fixed_cost() -> None:
    """caller and cost may be given per operation: login by address at no cost, the rest
    by key."""
    seed = meterkit.Policy.crane_ledger()
    routes = {"POST /v1/login": "usage.get", "GET /v1/items": "invoices.list"}
    s = Setup(
        meterkit.Policy(seed.tiers, seed.costs, seed.credits, routes=routes),
        caller={"usage.get": "ip"},
        cost={"usage.get": 0},
    )
    login = s.decide("POST", "/v1/login", peer="192.0.2.1", key=False)
    assert isinstance(login, Admission)
    assert (login.decision.key, login.decision.charged) == ("ip:192.0.2.1", 0)
    items = s.decide("GET", "/v1/items")
    assert isinstance(items, Admission)
    assert items.decision.key == s.key.id
    assert status(s.decide("GET", "/v1/items", key=False)) == 401


def test_a_size_priced_operation() -> None:
    """cost= a callable of the request prices by size: 0.001 credit per KB of body."""
    s = Setup(cost=lambda r: int(r.header("content-length") or 0) // 1000 * 0.001 + 0.03)
    found = s.decide("POST", f"/organizations/{ORG}/invoices", content_length="52000")
    assert isinstance(found, Admission)
    assert str(found.decision.charged) == "0.082"


def test_an_operation_callable_names_what_the_table_does_not() -> None:
    """operation= names the operation of paths the table does not route; None passes
    the request through unmetered."""
    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    store = MemoryKeyStore()
    plaintext, _ = store.create(org=ORG, permissions=["*"])

    def operation(req: RequestView) -> str | None:
        return "reports.summary" if req.path.startswith("/graphql") else None

    gate = Gate(meter, store, routes={}, operation=operation)
    view = RequestView("POST", "/graphql", headers={"authorization": f"Bearer {plaintext}"})
    found = gate.admit_blocking(view)
    assert isinstance(found, Admission)
    assert found.decision.operation == "reports.summary"
    assert gate.admit_blocking(RequestView("GET", "/static/app.js")) is None


def test_a_renderer_shapes_every_refusal() -> None:
    """render= turns each refusal into the app's own body; meterkit's headers stay."""
    seen: list[tuple[Any, ...]] = []

    def render(status: int, code: str, message: str, retry: Any, decision: Any) -> Any:
        seen.append((status, code, retry, decision is not None))
        return status, {"Content-Type": "application/problem+json"}, {"title": code}

    s = Setup(meterkit.Policy.crane_ledger(), render=render)
    refused = s.decide("GET", f"/organizations/{ORG}/invoices", key=False)
    assert isinstance(refused, Response)
    assert refused.body == b'{"title":"invalid_api_key"}'
    headers = dict(refused.headers)
    assert headers["Content-Type"] == "application/problem+json"
    assert headers["WWW-Authenticate"] == "Bearer"
    assert "application/json" not in headers.values()
    s.meter.set_allowance(ORG, 0)
    poor = s.decide("GET", f"/organizations/{ORG}/invoices")
    assert isinstance(poor, Response)
    assert poor.status == 402
    assert seen[-1] == (402, "insufficient_credits", None, True)
    assert "RateLimit" in dict(poor.headers)


def test_header_groups_can_be_turned_off_and_billing_off_sends_no_credits() -> None:
    """headers= picks the groups; a policy that prices nothing sends no X-Credits-*."""
    s = Setup(headers=["x-ratelimit"])
    found = s.decide("GET", f"/organizations/{ORG}/invoices")
    assert isinstance(found, Admission)
    sent = s.gate.finish_blocking(found, 200)
    assert sorted(sent) == ["X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"]
    free = meterkit.Policy.from_toml(
        """
        [credits]
        allowance = "0"
        [[tiers]]
        name = "minute"
        scope = "key"
        rate = "10/minute"
        [categories.free]
        min = "0"
        max = "0"
        [operations.request]
        category = "free"
        price = "0"
        [routes]
        "GET /v1/items" = "request"
        """
    )
    s = Setup(free)
    found = s.decide("GET", "/v1/items")
    assert isinstance(found, Admission)
    sent = s.gate.finish_blocking(found, 200)
    assert "RateLimit" in sent
    assert not any(name.startswith("X-Credits") for name in sent)


@pytest.mark.parametrize(
    ("routes", "where"),
    [
        ({"get /organizations/{organization_id}/x": "invoices.list"}, "capitals"),
        ({"GET organizations/{organization_id}": "invoices.list"}, "starts with"),
        ({"GET /organizations/{organization_id}/{a}/{a}": "invoices.list"}, "twice"),
        ({"GET /organizations/{organization_id}/x{y}": "invoices.list"}, "whole segment"),
        ({"GET /organizations/{organization_id}//x": "invoices.list"}, "empty segment"),
        ({"GET /x": "nope"}, "unknown operation"),
        (
            {
                "GET /organizations/{organization_id}/x": "invoices.list",
                "GET /organizations/{org}/x": "invoices.get",
            },
            "routed twice",
        ),
    ],
)
def test_bad_route_tables_are_configuration_errors(routes: dict[str, str], where: str) -> None:
    """Every malformed route template is refused when the policy is made, saying why, and
    the same by the gate's router (issue 12, one validation)."""
    seed = meterkit.Policy.crane_ledger()
    with pytest.raises(ConfigurationError, match=where):
        meterkit.Policy(seed.tiers, seed.costs, seed.credits, routes=routes)
    with pytest.raises(ConfigurationError, match=where):
        Router(routes, seed)


_SEGMENTS = st.sampled_from(
    ["organizations", "{organization_id}", "x", "{a}", "{b}", "", "X{y}", "{1}", "v1"]
)
_ROUTES = st.dictionaries(
    st.builds(
        lambda method, segments: f"{method} /" + "/".join(segments),
        st.sampled_from(["GET", "POST", "get", "PUT"]),
        st.lists(_SEGMENTS, min_size=1, max_size=4),
    ),
    st.sampled_from(["invoices.list", "invoices.get", "nope"]),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(routes=_ROUTES)
def test_a_table_is_accepted_by_the_gate_exactly_when_the_policy_takes_it(
    routes: dict[str, str],
) -> None:
    """Any route table, both ways: if the Policy takes it, a gate is built on it (routing
    every entry); if the Policy refuses it, so does the gate's router, with the same
    message."""
    seed = meterkit.Policy.crane_ledger()
    refused = ""
    try:
        policy = meterkit.Policy(seed.tiers, seed.costs, seed.credits, routes=routes)
    except ConfigurationError as exc:
        refused = str(exc)
    if refused:
        with pytest.raises(ConfigurationError) as also:
            Gate(meterkit.Meter(seed, meterkit.MemoryBackend()), MemoryKeyStore(), routes=routes)
        assert str(also.value) == refused
        return
    gate = Gate(meterkit.Meter(policy, meterkit.MemoryBackend()), MemoryKeyStore())
    assert len(gate.router.routes if gate.router else ()) == len(routes)


@pytest.mark.parametrize(
    "options",
    [
        {"trusted_proxies": ["not-an-ip"]},
        {"trusted_proxies": [10]},
        {"exclude": ["health"]},
        {"require_https": "yes"},
        {"refund_statuses": 500},
        {"exclude": 5},
        {"trusted_proxies": None},
        {"org": "organization"},
        {"org": "path:"},
        {"caller": "header:bad name"},
        {"caller": {"nope": "ip"}},
        {"cost": "-1"},
        {"headers": ["ietf", "x-nope"]},
        {"render": "json"},
        {"routes": ["GET /x"]},
        {"idempotency_methods": "POST"},
        {"idempotency_methods": ["POST", 1]},
        {"idempotency_statuses": 200},
        {"idempotency_max_body": -1},
        {"idempotency_max_body": 1.5},
        {"idempotency_lock": 0},
        {"idempotency_lock": True},
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    """Malformed options are refused when the gate is built."""
    with pytest.raises(ConfigurationError):
        Setup(**options)


def test_a_bearer_caller_needs_a_key_store() -> None:
    """A gate whose routes are metered by key, built without a key store, says so."""
    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    with pytest.raises(ConfigurationError, match="keystore"):
        Gate(meter)
    with pytest.raises(ConfigurationError, match="keystore"):
        Gate(meter, routes={}).target("invoices.list")


@pytest.mark.parametrize(
    ("scheme", "peer", "proto", "trusted", "secure"),
    [
        ("https", None, None, [], True),
        ("http", "127.0.0.1", "https", [], False),
        ("http", "127.0.0.1", "https", ["127.0.0.1"], True),
        ("http", "10.1.2.3", "HTTPS", ["10.0.0.0/8"], True),
        ("http", "::1", "https", ["0:0:0:0:0:0:0:1"], True),
        ("http", "10.1.2.3", "https,https", ["*"], True),
        ("http", "10.1.2.3", "https, http", ["*"], False),
        ("http", None, "https", ["*"], False),
        ("http", "unix-socket", "https", ["10.0.0.0/8"], False),
    ],
)
def test_https_decision(
    scheme: str, peer: str | None, proto: str | None, trusted: list[str], secure: bool
) -> None:
    """The scheme counts; X-Forwarded-Proto counts only from a trusted peer, and only when
    every hop says https."""
    s = Setup(trusted_proxies=trusted)
    headers = {"x_forwarded_proto": proto} if proto else {}
    found = s.decide("GET", f"/organizations/{ORG}/invoices", scheme=scheme, peer=peer, **headers)
    assert (status(found) != 403) is secure


def test_forwarded_https_parsing() -> None:
    """X-Forwarded-Proto is https only when every listed hop is."""
    assert forwarded_https("https")
    assert forwarded_https(" HTTPS , https ")
    assert [forwarded_https(v) for v in ("http", "", "https,", "https, http")] == [False] * 4


def test_excluded_prefixes_and_require_https_off() -> None:
    """Excluded paths (exact or prefix*) pass untouched; require_https=False admits plain HTTP."""
    s = Setup(exclude=["/health", "/docs*"])
    assert s.decide("GET", "/health", scheme="http") is None
    assert s.decide("GET", "/docs/oauth2", scheme="http") is None
    assert status(s.decide("GET", "/healthz", scheme="http")) == 403
    relaxed = Setup(require_https=False)
    assert status(relaxed.decide("GET", f"/organizations/{ORG}/invoices", scheme="http")) == 200


def test_finish_refunds_once_and_says_so() -> None:
    """An app status in refund_statuses returns the credits once; the headers then say
    nothing was charged."""
    s = Setup()
    found = s.decide("POST", f"/organizations/{ORG}/currency/convert")
    assert isinstance(found, Admission)
    first = s.gate.finish_blocking(found, 503)
    again = s.gate.finish_blocking(found, 500)
    assert first["X-Credits-Charged"] == again["X-Credits-Charged"] == "0"
    assert first["X-Credits-Remaining"] == "10000"
    assert s.meter.usage(ORG).credits_used == 0


def test_the_blocking_twins_decide_as_the_coroutines_do() -> None:
    """admit_blocking and finish_blocking (made from admit and finish) give a blocking
    server the answers an asyncio server gets, request for request."""
    import asyncio

    s = Setup()
    plaintext, _ = s.store.create(org=ORG, permissions=["invoices:read"])
    # The same key store; each gate its own meter, on the same clock.
    twin_gate = s.gate
    meter = meterkit.Meter(s.policy, meterkit.MemoryBackend(clock=s.clock))
    coroutine_gate = Gate(meter, s.store)
    paths = [
        ("GET", f"/organizations/{ORG}/invoices"),
        ("POST", f"/organizations/{ORG}/invoices"),
        ("GET", f"/organizations/{ORG}/nope"),
        ("DELETE", f"/organizations/{ORG}/usage"),
        ("GET", "/favicon.ico"),
    ]
    for method, path in paths * 2:
        headers = {"authorization": f"Bearer {plaintext}"}
        blocking = twin_gate.admit_blocking(RequestView(method, path, headers=headers))
        awaited = asyncio.run(coroutine_gate.admit(RequestView(method, path, headers=headers)))
        assert status(blocking) == status(awaited), (method, path)
        if isinstance(blocking, Admission) and isinstance(awaited, Admission):
            sent = twin_gate.finish_blocking(blocking, 500)
            assert sent == asyncio.run(coroutine_gate.finish(awaited, 500))
            assert sent["X-Credits-Charged"] == "0"


def test_a_402_says_when_credits_reset_only_when_asked() -> None:
    """A 402 carries no Retry-After by default (the month may have weeks to run);
    credits_retry_after=True adds it, and the renderer then receives it too."""
    for asked in (False, True):
        s = Setup(credits_retry_after=asked)
        s.meter.set_allowance(ORG, 0)
        refused = s.decide("GET", f"/organizations/{ORG}/invoices")
        assert isinstance(refused, Response)
        assert refused.status == 402
        headers = dict(refused.headers)
        assert ("Retry-After" in headers) is asked
        if asked:
            assert int(headers["Retry-After"]) == 31 * 24 * 3600  # the clock is at 1 January


def test_an_anonymous_caller_cannot_pick_the_organization_charged() -> None:
    """A caller that is not a key, on a route naming {organization_id}, is metered in its
    own organization by default, not in the one its path names."""
    seed = meterkit.Policy.crane_ledger()
    routes = {"POST /organizations/{organization_id}/login": "usage.get"}
    policy = meterkit.Policy(seed.tiers, seed.costs, seed.credits, routes=routes)
    meter = meterkit.Meter(policy, meterkit.MemoryBackend())
    gate = Gate(meter, caller="ip")
    view = RequestView("POST", f"/organizations/{ORG}/login", peer="192.0.2.9")
    found = gate.admit_blocking(view)
    assert isinstance(found, Admission)
    assert found.decision.org == "ip:192.0.2.9"
    assert meter.usage(ORG).requests == 0


# -- Idempotency-Key ----------------------------------------------------------------------


def keyed(
    s: Setup, idem: str, body: bytes, request: str = "POST /invoices"
) -> Response | Admission | None:
    """A request (a create of an invoice) under Idempotency-Key ``idem`` with ``body``."""
    method, path = request.split(" ")
    headers = {"authorization": s.auth, "idempotency-key": idem}
    view = RequestView(method, f"/organizations/{ORG}{path}", headers=headers, body=body)
    return s.gate.admit_blocking(view)


def answer(s: Setup, found: Any, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    """What a blocking shell does with the app's answer."""
    assert isinstance(found, Admission)
    assert found.keeping is not None
    extra = s.gate.finish_blocking(found, status)
    found.keeping.start(status, headers, extra)
    found.keeping.add(body, last=True)
    s.gate.keep_blocking(found)


def test_a_replay_keeps_no_hop_by_hop_header_and_no_cookie() -> None:
    """The kept response drops Connection and what it names, Keep-Alive,
    Transfer-Encoding, Upgrade and Set-Cookie; the rest (meterkit's headers too) is
    replayed as sent, and Idempotent-Replayed is added only to the replay."""
    s = Setup()
    first = keyed(s, "i-1", b"{}")
    sent = [
        ("Content-Type", "application/json"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "one hop"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "session=1"),
        ("X-App", "kept"),
    ]
    answer(s, first, 201, sent, b'{"id": 1}')
    replay = keyed(s, "i-1", b"{}")
    assert isinstance(replay, Response)
    assert (replay.status, replay.body) == (201, b'{"id": 1}')
    names = [name for name, _ in replay.headers]
    assert names[:2] == ["Content-Type", "X-App"]
    assert "X-Credits-Charged" in names
    assert names[-1] == "Idempotent-Replayed"
    assert not {"Connection", "X-Hop", "Keep-Alive", "Transfer-Encoding", "Set-Cookie"} & set(names)


def test_idempotency_refusals_go_through_the_renderer() -> None:
    """409 idempotency_key_in_use (with Retry-After), 422 idempotency_key_reused and
    409 idempotency_response_too_large are rendered like every refusal, and listed in
    the gate's table of refusals."""
    seen: list[tuple[int, str, Any]] = []

    def render(status: int, code: str, message: str, retry: Any, decision: Any) -> Any:
        seen.append((status, code, retry))
        return status, {"Content-Type": "application/problem+json"}, {"title": code}

    s = Setup(render=render, idempotency_max_body=4)
    running = keyed(s, "i-1", b"{}")
    busy = keyed(s, "i-1", b"{}")
    assert isinstance(busy, Response)
    assert ("Retry-After", "1") in busy.headers
    assert keyed(s, "i-1", b"{}") is busy  # (built once)
    answer(s, running, 201, [], b"12345")
    assert status(keyed(s, "i-1", b"{}")) == 409
    assert status(keyed(s, "i-1", b"[]")) == 422
    codes = {(status_, code, retry) for status_, code, retry in seen}
    assert codes >= {
        (409, "idempotency_key_in_use", 1),
        (409, "idempotency_response_too_large", None),
        (422, "idempotency_key_reused", None),
    }
    table = s.gate.refusals
    for code in ("idempotency_key_in_use", "idempotency_response_too_large"):
        assert table[code].status == 409
    assert table["idempotency_key_reused"].status == 422
    assert {spec[2] for spec in REFUSALS} >= set(table)


def test_ignored_methods_and_a_backend_that_cannot_keep_responses() -> None:
    """Methods outside idempotency_methods ignore the header (not even checked); a
    backend without claim_response/keep_response is refused unless the header is
    ignored everywhere."""
    s = Setup(idempotency_methods=["put"])
    posted = keyed(s, "x" * 300, b"{}")  # (too long, but ignored)
    assert isinstance(posted, Admission)
    assert posted.keeping is None
    assert status(keyed(s, "x" * 300, b"{}", "PUT /invoices/inv_1")) == 400
    assert status(keyed(s, "x" * 255, b"{}", "PUT /invoices/inv_1")) == 200

    class Bare:
        def __init__(self) -> None:
            self.memory = meterkit.MemoryBackend()

        def apply(self, plan: Any) -> Any:
            return self.memory.apply(plan)

        def refund(self, plan: Any, outcome: Any) -> bool:
            return self.memory.refund(plan, outcome)

    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), Bare())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"idempotency_methods=\(\)"):
        Gate(meter, s.store)
    Gate(meter, s.store, idempotency_methods=())


def test_a_degraded_admission_keeps_nothing() -> None:
    """A request admitted without the backend (fail_open while Redis is down) keeps no
    response: there is nowhere to keep it, and no charge to keep it with."""
    s = Setup()
    backend = meterkit.backend_from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    gate = Gate(meterkit.Meter(s.policy, backend, fail_open=True), s.store)
    headers = {"authorization": s.auth, "idempotency-key": "i-1"}
    view = RequestView("POST", f"/organizations/{ORG}/invoices", headers=headers, body=b"{}")
    found = gate.admit_blocking(view)
    assert isinstance(found, Admission)
    assert found.decision.degraded
    assert found.keeping is None
