"""The seed's key-management and usage API, over HTTP, on memory and on Redis: every
route, its bodies, and what it refuses (in the seed's error shape, changing nothing)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from meterkit.errors import AuthenticationError
from tests.admin.conftest import Stack, new_org

ORG_NOT_FOUND = {
    "error": {
        "type": "authentication_error",
        "code": "organization_not_found",
        "message": "The organization does not exist or is not accessible",
        "status": 401,
    }
}
INVALID_KEY = {
    "error": {
        "type": "authentication_error",
        "code": "invalid_api_key",
        "message": "The provided API key is invalid or expired",
        "status": 401,
    }
}
KEY_NOT_FOUND = {
    "error": {
        "type": "invalid_request_error",
        "code": "api_key_not_found",
        "message": "No API key with this id.",
        "status": 404,
    }
}


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def admitted(stack: Stack, plaintext: str, org: str) -> bool:
    try:
        stack.keys.authenticate(f"Bearer {plaintext}", org=org)
    except AuthenticationError:
        return False
    return True


# -- create --------------------------------------------------------------------------


def test_create_returns_the_plaintext_once_and_the_key_works(stack: Stack) -> None:
    """POST api_keys answers 201 with the key and its secret; the secret authenticates,
    and the key's record never shows it again."""
    org = new_org()
    root, _ = stack.key(org)
    expires = stack.clock() + 86_400
    with stack.client(root) as client:
        made = client.post(
            f"/organizations/{org}/api_keys",
            json={
                "name": "ci",
                "permissions": ["reports:*", "invoices:read"],
                "expires_at": iso(expires),
            },
        )
        assert made.status_code == 201, made.text
        body = made.json()
        assert body["organization_id"] == org
        assert body["mode"] == "live"
        assert body["permissions"] == ["invoices:read", "reports:*"]
        assert body["status"] == "active"
        assert body["expires_at"] == iso(expires)
        assert body["secret"].startswith("cl_live_")
        assert body["secret"].endswith(body["last_four"])
        assert admitted(stack, body["secret"], org)
        shown = client.get(f"/organizations/{org}/api_keys/{body['id']}")
    assert shown.status_code == 200
    assert "secret" not in shown.json()
    assert body["secret"] not in shown.text
    assert {k: v for k, v in body.items() if k != "secret"} == shown.json() | {"last_used_at": None}


def test_create_defaults_to_the_callers_mode_and_refuses_to_grant_more(stack: Stack) -> None:
    """A key's mode defaults to the caller's; a key cannot grant a permission it lacks,
    and a test-mode key cannot make live keys: nothing is created."""
    org = new_org()
    limited, _ = stack.key(org, ["api_keys:manage", "invoices:read"], mode="test")
    before = stack.state(org)
    with stack.client(limited) as client:
        made = client.post(
            f"/organizations/{org}/api_keys", json={"permissions": ["invoices:read"]}
        )
        assert made.status_code == 201
        assert made.json()["mode"] == "test"
        after_one = stack.state(org)
        for body in (
            {"permissions": ["invoices:write"]},
            {"permissions": ["invoices:*"]},
            {"permissions": ["*"]},
            {"mode": "live"},
        ):
            refused = client.post(f"/organizations/{org}/api_keys", json=body)
            assert refused.status_code == 401, body
            assert code(refused) == "insufficient_permissions"
    assert len(after_one[0]) == len(before[0]) + 1
    assert stack.state(org) == after_one


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b'{"name": 7}', "application/json", 400),
        (b'{"nmae": "typo"}', "application/json", 400),
        (b'{"permissions": "invoices:read"}', "application/json", 400),
        (b'{"permissions": ["Invoices Read"]}', "application/json", 400),
        (b'{"mode": "prod"}', "application/json", 400),
        (b'{"expires_at": "2030-01-01T00:00:00"}', "application/json", 400),
        (b'{"expires_at": "2001-01-01T00:00:00Z"}', "application/json", 400),
        (b'{"name": "' + b"x" * 10_240 + b'"}', "application/json", 400),
        (b'{"permissions": ["a:' + b"b" * 10_240 + b'"]}', "application/json", 400),
        (b'{"name": "cl_live_0123456789abcdefghij"}', "application/json", 400),
        (b'{"name": "' + b"x" * 100_000 + b'"}', "application/json", 413),
        (b'{"name": "form"}', "text/plain", 415),
        (b"\xff\xfe", "application/json", 400),
    ],
    ids=lambda v: v if isinstance(v, int | str) else None,
)
def test_create_refuses_bad_bodies_and_changes_nothing(
    stack: Stack, body: bytes, content_type: str, status: int
) -> None:
    """Malformed, mistyped, unknown, naive-dated, past, 10 KB and 100 KB fields get the
    seed's error body, no value echoed back, and no key is made."""
    org = new_org()
    root, _ = stack.key(org)
    before = stack.state(org)
    with stack.client(root) as client:
        refused = client.post(
            f"/organizations/{org}/api_keys", content=body, headers={"Content-Type": content_type}
        )
    assert refused.status_code == status, refused.text
    assert refused.json()["error"]["status"] == status
    assert len(refused.content) < 400  # a 10 KB field is not echoed back
    assert stack.state(org) == before


# -- list and show -------------------------------------------------------------------


def test_list_pages_through_the_organizations_keys_oldest_first(stack: Stack) -> None:
    """limit and after page through every key (revoked ones too), oldest first."""
    org = new_org()
    root, first = stack.key(org)
    made = [first.id]
    for _ in range(4):
        stack.clock.advance(1)
        made.append(stack.key(org, ["invoices:read"])[1].id)
    stack.keys.revoke(made[2])
    stack.key(new_org())  # another organization's key is never listed
    with stack.client(root) as client:
        seen: list[str] = []
        after = None
        while True:
            query = {"limit": "2"} | ({"after": after} if after else {})
            page = client.get(f"/organizations/{org}/api_keys", params=query).json()
            seen += [k["id"] for k in page["data"]]
            assert page["has_more"] == (page["next_after"] is not None)
            if not page["has_more"]:
                break
            after = page["next_after"]
        everything = client.get(f"/organizations/{org}/api_keys").json()
        for bad in (
            {"limit": "0"},
            {"limit": "1001"},
            {"limit": "x"},
            {"after": "key_nope"},
            {"sort": "id"},
        ):
            assert client.get(f"/organizations/{org}/api_keys", params=bad).status_code == 400
    assert seen == made
    assert [k["id"] for k in everything["data"]] == made
    assert not everything["has_more"]
    assert [k["status"] for k in everything["data"]].count("revoked") == 1


def test_another_organizations_key_is_not_found_like_an_unknown_one(stack: Stack) -> None:
    """Key ids of another organization, unknown, malformed or 10 KB long all answer the
    same 404 on every key route, and change nothing anywhere."""
    org, other = new_org(), new_org()
    root, _ = stack.key(org)
    _, theirs = stack.key(other)
    before = stack.state(org), stack.state(other)
    ids = [theirs.id, "key_000000000000", "key_!", "k" * 10_240]
    with stack.client(root) as client:
        for key_id in ids:
            base = f"/organizations/{org}/api_keys/{key_id}"
            answers = [
                client.get(base),
                client.patch(base, json={"expires_at": None}),
                client.post(f"{base}/rotate", json={}),
                client.post(f"{base}/revoke"),
                client.get(f"/organizations/{org}/usage", params={"key": key_id[:200]}),
            ]
            for answer in answers:
                assert answer.status_code == 404, (key_id[:20], answer.text)
                assert answer.json() == KEY_NOT_FOUND
    assert (stack.state(org), stack.state(other)) == before


# -- expiry, rotation, revocation ----------------------------------------------------


def test_patch_sets_and_clears_an_active_keys_expiry(stack: Stack) -> None:
    """PATCH expires_at moves when a key stops working; null means never; a revoked
    key answers 409, a past time 400."""
    org = new_org()
    root, _ = stack.key(org)
    plaintext, target = stack.key(org, ["invoices:read"])
    base = f"/organizations/{org}/api_keys/{target.id}"
    with stack.client(root) as client:
        soon = stack.clock() + 60
        assert client.patch(base, json={"expires_at": iso(soon)}).json()["expires_at"] == iso(soon)
        assert stack.keys.get(target.id).expires_at == soon
        assert client.patch(base, json={"expires_at": None}).json()["expires_at"] is None
        before = stack.state(org)
        for bad in ({}, {"expires_at": "soon"}, {"expires_at": iso(stack.clock() - 1)}, {"x": 1}):
            assert client.patch(base, json=bad).status_code == 400, bad
        assert stack.state(org) == before
        stack.keys.revoke(target.id)
        gone = client.patch(base, json={"expires_at": None})
    assert gone.status_code == 409
    assert code(gone) == "api_key_not_active"
    assert not admitted(stack, plaintext, org)


def test_rotate_gives_a_new_key_and_keeps_the_old_one_for_the_grace(stack: Stack) -> None:
    """POST rotate answers 201 with the new key's secret and the old key, which works
    until the grace period ends (a day by default)."""
    org = new_org()
    root, _ = stack.key(org)
    old_plain, old = stack.key(org, ["invoices:read"], name="server")
    with stack.client(root) as client:
        rotated = client.post(
            f"/organizations/{org}/api_keys/{old.id}/rotate", json={"grace_period": 600}
        )
        assert rotated.status_code == 201
        body = rotated.json()
        default = client.post(f"/organizations/{org}/api_keys/{body['id']}/rotate")
    assert body["name"] == "server"
    assert body["permissions"] == ["invoices:read"]
    assert body["previous"]["id"] == old.id
    assert body["previous"]["expires_at"] == iso(stack.clock() + 600)
    assert admitted(stack, body["secret"], org)
    assert admitted(stack, old_plain, org)
    assert default.status_code == 201
    assert default.json()["previous"]["expires_at"] == iso(stack.clock() + 86_400)
    stack.clock.advance(600)
    assert not admitted(stack, old_plain, org)


def test_rotate_refuses_stopped_keys_long_graces_and_escalation(stack: Stack) -> None:
    """A revoked key (409), a grace over 30 days or negative (400), and a key whose
    permissions the caller lacks (it would get their secret) are not rotated."""
    org = new_org()
    limited, _ = stack.key(org, ["api_keys:manage"])
    _, mighty = stack.key(org, ["*"])
    _, plain = stack.key(org, [])
    _, revoked = stack.key(org, [])
    stack.keys.revoke(revoked.id)
    before = stack.state(org)
    with stack.client(limited) as client:
        rotate = f"/organizations/{org}/api_keys/{{}}/rotate"
        assert code(client.post(rotate.format(mighty.id))) == "insufficient_permissions"
        assert client.post(rotate.format(revoked.id)).status_code == 409
        for grace in (30 * 86_400 + 1, -1, "1h", 1.5):
            answer = client.post(rotate.format(plain.id), json={"grace_period": grace})
            assert answer.status_code == 400, grace
    assert stack.state(org) == before


def test_revoke_stops_a_key_at_once_and_is_idempotent(stack: Stack) -> None:
    """POST revoke answers the revoked key; the key stops authenticating; a second
    revoke keeps the first time."""
    org = new_org()
    root, _ = stack.key(org)
    plaintext, target = stack.key(org, ["invoices:read"])
    with stack.client(root) as client:
        first = client.post(f"/organizations/{org}/api_keys/{target.id}/revoke")
        stack.clock.advance(5)
        second = client.post(f"/organizations/{org}/api_keys/{target.id}/revoke", json={})
        bad = client.post(f"/organizations/{org}/api_keys/{target.id}/revoke", json={"now": True})
    assert first.status_code == 200
    assert first.json()["status"] == "revoked"
    assert second.json()["revoked_at"] == first.json()["revoked_at"]
    assert bad.status_code == 400
    assert not admitted(stack, plaintext, org)


# -- usage ---------------------------------------------------------------------------


def test_usage_reports_this_period_per_key_and_operation(stack: Stack) -> None:
    """GET usage is the counters' figures for the organization, or one of its keys."""
    org = new_org()
    root, _ = stack.key(org, ["usage:read"])
    _, one = stack.key(org, ["invoices:*"])
    _, two = stack.key(org, ["invoices:*"])
    for key, operation, times in ((one, "invoices.list", 3), (two, "invoices.create", 2)):
        for _ in range(times):
            assert stack.meter.check(key.id, org=org, operation=operation).allowed
    with stack.client(root) as client:
        everything = client.get(f"/organizations/{org}/usage").json()
        mine = client.get(f"/organizations/{org}/usage", params={"key": one.id}).json()
        test = client.get(f"/organizations/{org}/usage", params={"mode": "test"}).json()
    assert everything["requests"] == 5
    assert everything["credits_used"] == "0.13"
    assert everything["operations"]["invoices.create"] == {"requests": 2, "credits": "0.1"}
    assert set(everything["keys"]) == {one.id, two.id}
    assert everything["mode"] == "live"
    assert everything["period_start"].startswith("2026-01-01")
    assert mine["key"] == one.id
    assert mine["requests"] == 3
    assert list(mine["keys"]) == [one.id]
    assert test["requests"] == 0
    assert test["mode"] == "test"


def test_a_test_key_sees_test_usage_only(stack: Stack) -> None:
    """A test-mode key reads test usage by default and is refused live usage."""
    org = new_org()
    tester, _ = stack.key(org, ["usage:read"], mode="test")
    with stack.client(tester) as client:
        assert client.get(f"/organizations/{org}/usage").json()["mode"] == "test"
        live = client.get(f"/organizations/{org}/usage", params={"mode": "live"})
        bad = client.get(f"/organizations/{org}/usage", params={"mode": "both"})
    assert code(live) == "insufficient_permissions"
    assert bad.status_code == 400


def test_history_without_a_ledger_says_so(stack: Stack) -> None:
    """usage/history answers 501 history_unavailable when the meter keeps no ledger."""
    org = new_org()
    root, _ = stack.key(org, ["usage:read"])
    with stack.client(root) as client:
        answer = client.get(f"/organizations/{org}/usage/history", params={"period": "2026-01"})
    assert answer.status_code == 501
    assert code(answer) == "history_unavailable"


# -- who may call --------------------------------------------------------------------

ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/api_keys", None),
    ("POST", "/api_keys", {"name": "x"}),
    ("GET", "/api_keys/{key}", None),
    ("PATCH", "/api_keys/{key}", {"expires_at": None}),
    ("POST", "/api_keys/{key}/rotate", {}),
    ("POST", "/api_keys/{key}/revoke", {}),
    ("GET", "/usage", None),
    ("GET", "/usage/history", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_refuses_keys_that_may_not_call_it(
    stack: Stack, method: str, path: str, body: Any
) -> None:
    """No key, a made-up key, a 10 KB one, another organization's admin key, an expired
    key and a key without the route's permission get the seed's bodies, and nothing
    changes."""
    org, other = new_org(), new_org()
    _, target = stack.key(org, [])
    outsider, _ = stack.key(other)
    expired, _ = stack.key(org, expires_at=stack.clock() + 1)
    reader, _ = stack.key(org, ["invoices:read"])
    stack.clock.advance(1)
    made_up = stack.keys.key_format.generate("live")
    url = f"/organizations/{org}{path.format(key=target.id)}"
    before = stack.state(org)
    answers = {}
    for name, plaintext in (
        ("none", None),
        ("made-up", made_up),
        ("outsider", outsider),
        ("expired", expired),
        ("reader", reader),
        ("10 KB", "x" * 10_240),
    ):
        with stack.client(plaintext) as client:
            answers[name] = client.request(method, url, json=body)
    assert answers["none"].json() == INVALID_KEY
    assert answers["none"].headers["www-authenticate"] == "Bearer"
    assert answers["made-up"].json() == INVALID_KEY
    assert answers["10 KB"].json() == INVALID_KEY
    assert answers["outsider"].json() == ORG_NOT_FOUND
    assert code(answers["expired"]) == "expired_api_key"
    assert code(answers["reader"]) == "insufficient_permissions"
    assert stack.state(org) == before


def test_plain_http_unknown_paths_and_methods_are_refused(stack: Stack) -> None:
    """Plain HTTP gets 403 https_required; unknown paths 404; other methods 405 + Allow."""
    org = new_org()
    root, _ = stack.key(org)
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {root}"}) as plain:
        refused = plain.post(f"/organizations/{org}/api_keys", json={})
    assert refused.status_code == 403
    assert code(refused) == "https_required"
    with stack.client(root) as client:
        assert code(client.get(f"/organizations/{org}/invoices")) == "not_found"
        wrong = client.put(f"/organizations/{org}/api_keys")
        head = client.head(f"/organizations/{org}/api_keys")
        twice = client.get(f"/organizations/{org}/api_keys?limit=1&limit=2")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET, HEAD, POST"
    assert head.status_code == 200
    assert head.content == b""
    assert twice.status_code == 400
    assert len(stack.keys.list(org)) == 1


def test_every_answer_is_uncacheable(stack: Stack) -> None:
    """Answers carry Cache-Control: no-store (a create's body holds a secret)."""
    org = new_org()
    root, _ = stack.key(org)
    with stack.client(root) as client:
        made = client.post(f"/organizations/{org}/api_keys", json={})
        refused = client.post(f"/organizations/{org}/api_keys", json={"x": 1})
    for answer in (made, refused):
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_the_tests_saw_every_route_answer(stack: Stack) -> None:
    """Every API route answered at least one success and one refusal in this module
    (on this backend), each with its documented body and a status its OpenAPI schema
    lists."""
    success = {(t, m) for t, m, s in stack.seen if s < 300}
    refused = {(t, m) for t, m, s in stack.seen if s >= 400}
    routes = {
        (r.template, r.method)
        for r in stack.admin.router.routes
        if not r.handler.startswith(("page_", "openapi"))
    }
    history = ("/organizations/{organization_id}/usage/history", "GET")
    assert routes - success == {history}  # no ledger here: test_history covers it
    assert routes <= refused
    document = stack.admin.openapi()
    for template, method, status in stack.seen:
        answers = document["paths"][template][method.lower()]["responses"]
        assert str(status) in answers, (template, method, status)
