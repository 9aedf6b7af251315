"""The dashboard over HTTP, on memory and on Redis: signing in with a key, the session
cookie, CSRF, the forms (create, rotate, revoke, expiry), and the one-time reveal of a
new key's plaintext. The browser drives the same pages in test_browser.py."""

from __future__ import annotations

import re
from contextlib import closing
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from meterkit.admin._session import Signer
from tests.admin.conftest import SECRET, Stack, new_org

KEYS = re.compile(r"\b[a-z][a-z0-9]{0,15}_(?:live|test)_[0-9A-Za-z]{50}\b")


def secrets_in(text: str) -> list[str]:
    """Every API key plaintext in a page."""
    return KEYS.findall(text)


def token(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text[:500]
    return found.group(1)


def sign_in(stack: Stack, plaintext: str) -> tuple[httpx.Client, httpx.Response]:
    """A browser-like client signed in with ``plaintext``: (client, the sign-in answer)."""
    client = stack.client()
    form = client.get("/dashboard")
    answer = client.post("/dashboard/sign-in", data={"csrf": token(form), "key": plaintext})
    return client, answer


def page(client: httpx.Client, url: str) -> httpx.Response:
    answer = client.get(url)
    assert answer.status_code == 200, (url, answer.status_code, answer.text[:300])
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert "script" not in answer.headers["content-security-policy"]
    return answer


def test_signing_in_keeps_the_key_id_in_a_strict_cookie_never_the_key(stack: Stack) -> None:
    """A good key gets a signed, HttpOnly, Secure, SameSite=Strict session cookie that
    holds the key's id and not its plaintext, and lands on its organization's page."""
    org = new_org()
    root, record = stack.key(org, ["api_keys:manage"])
    client, answer = sign_in(stack, root)
    with closing(client):
        assert answer.status_code == 303
        assert answer.headers["location"] == f"/dashboard/organizations/{org}"
        [session] = [
            c for c in answer.headers.get_list("set-cookie") if c.startswith("mk_session=")
        ]
        assert "HttpOnly" in session
        assert "Secure" in session
        assert "SameSite=Strict" in session
        assert "Path=/dashboard" in session
        value = session.split(";")[0].split("=", 1)[1]
        assert root not in session
        assert record.id.encode() in __import__("base64").urlsafe_b64decode(
            value.split(".")[0] + "=="
        )
        overview = page(client, answer.headers["location"])
        assert org in overview.text
        assert secrets_in(overview.text) == []


@pytest.mark.parametrize("who", ["made-up", "reader", "revoked", "blank", "10 KB"])
def test_keys_that_may_not_sign_in_are_refused_and_not_echoed(stack: Stack, who: str) -> None:
    """An unknown, revoked or non-admin key gets the seed's message on the sign-in page,
    no session, and the page never repeats what was typed."""
    org = new_org()
    reader, _ = stack.key(org, ["invoices:read"])
    revoked, record = stack.key(org)
    stack.keys.revoke(record.id)
    typed = {
        "made-up": stack.keys.key_format.generate("live"),
        "reader": reader,
        "revoked": revoked,
        "blank": "",
        "10 KB": "x" * 10_240,
    }[who]
    client, answer = sign_in(stack, typed)
    with closing(client):
        assert answer.status_code == 401
        assert "mk_session=" not in " ".join(answer.headers.get_list("set-cookie"))
        assert secrets_in(answer.text) == []
        assert typed[:40] not in answer.text or not typed
        expected = "lacks permission" if who == "reader" else "invalid or expired"
        assert expected in answer.text


def test_a_sign_in_form_from_elsewhere_is_refused(stack: Stack) -> None:
    """Sign-in without the form's token, with another form's, or from another site is
    refused before the key is looked at."""
    org = new_org()
    root, _ = stack.key(org)
    with stack.client() as client:
        form = client.get("/dashboard")
        good = token(form)
        assert client.post("/dashboard/sign-in", data={"key": root}).status_code == 403
        client.cookies.clear()
        assert (
            client.post("/dashboard/sign-in", data={"csrf": good, "key": root}).status_code == 403
        )
        client.get("/dashboard")
        foreign = client.post(
            "/dashboard/sign-in",
            data={"csrf": token(client.get("/dashboard")), "key": root},
            headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        )
        assert foreign.status_code == 403
        assert "mk_session" not in client.cookies


def test_pages_without_a_good_session_go_to_sign_in(stack: Stack) -> None:
    """No cookie, a forged or tampered one, or one past its age: every page redirects to
    the sign-in page, and every form is refused."""
    org = new_org()
    root, record = stack.key(org)
    signer = Signer(SECRET, 8 * 3600)
    forged_elsewhere, _ = Signer(b"another secret of at least 32 bytes!!", 60).session_cookie(
        record.id, org, stack.clock()
    )
    old, _ = signer.session_cookie(record.id, org, stack.clock() - 8 * 3600)
    good, _ = signer.session_cookie(record.id, org, stack.clock())
    tampered = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    for cookie in (None, forged_elsewhere, old, tampered, "garbage", "a.b"):
        with stack.client() as client:
            if cookie is not None:
                client.cookies.set("mk_session", cookie, path="/dashboard")
            for url in (f"/dashboard/organizations/{org}", f"/dashboard/organizations/{org}/keys"):
                answer = client.get(url)
                assert answer.status_code == 303
                assert answer.headers["location"] == "/dashboard"
            posted = client.post(f"/dashboard/organizations/{org}/keys", data={"name": "x"})
            assert posted.status_code == 303
    assert [k.id for k in stack.keys.list(org)] == [record.id]
    with stack.client() as client:
        client.cookies.set("mk_session", good, path="/dashboard")
        assert client.get(f"/dashboard/organizations/{org}").status_code == 200
        _ = root


def create(client: httpx.Client, org: str, **fields: str) -> httpx.Response:
    keys = page(client, f"/dashboard/organizations/{org}/keys")
    return client.post(f"/dashboard/organizations/{org}/keys", data={"csrf": token(keys), **fields})


def test_a_created_keys_plaintext_is_shown_once(stack: Stack) -> None:
    """Create redirects to the keys page, which shows the new key's plaintext (and no
    other secret); the same URL again shows none, and the key authenticates."""
    org = new_org()
    root, _ = stack.key(org)
    client, _ = sign_in(stack, root)
    with closing(client):
        made = create(client, org, name="ci", permissions="invoices:read, reports:*", mode="test")
        assert made.status_code == 303
        location = made.headers["location"]
        query = parse_qs(urlsplit(location).query)
        first = page(client, location)
        [shown] = secrets_in(first.text)
        assert shown.startswith("cl_test_")
        assert shown not in location
        assert not any(shown in c for c in made.headers.get_list("set-cookie"))
        again = page(client, location)
        assert secrets_in(again.text) == []
        assert "reveal-gone" in again.text
    record = stack.keys.authenticate(f"Bearer {shown}", org=org)
    assert record.id == query["created"][0]
    assert (record.name, record.mode, record.permissions) == (
        "ci",
        "test",
        ("invoices:read", "reports:*"),
    )


def test_the_reveal_needs_both_shares_of_the_same_session(stack: Stack) -> None:
    """The URL's share alone (another browser, a shared link) or with another session's
    cookie shows nothing."""
    org = new_org()
    root, _ = stack.key(org)
    client, _ = sign_in(stack, root)
    other, _ = sign_in(stack, root)
    with closing(client), closing(other):
        location = create(client, org).headers["location"]
        assert secrets_in(page(other, location).text) == []
        assert "reveal-gone" in page(other, location).text
        assert len(secrets_in(page(client, location).text)) == 1


def test_rotate_revoke_and_expiry_forms_change_the_key(stack: Stack) -> None:
    """Rotate reveals the replacement once and keeps the old key for the chosen grace;
    expiry sets (and clears) the date; revoke stops the key."""
    org = new_org()
    root, _ = stack.key(org)
    old_plain, old = stack.key(org, ["invoices:read"], name="server")
    client, _ = sign_in(stack, root)
    with closing(client):
        keys = page(client, f"/dashboard/organizations/{org}/keys")
        csrf = token(keys)
        base = f"/dashboard/organizations/{org}/keys/{old.id}"
        rotated = client.post(f"{base}/rotate", data={"csrf": csrf, "grace": "3600"})
        assert rotated.status_code == 303
        [new_plain] = secrets_in(page(client, rotated.headers["location"]).text)
        assert stack.keys.get(old.id).expires_at == stack.clock() + 3600
        new_id = stack.keys.authenticate(f"Bearer {new_plain}", org=org).id
        assert stack.keys.authenticate(f"Bearer {old_plain}", org=org).id == old.id
        new_base = f"/dashboard/organizations/{org}/keys/{new_id}"
        dated = client.post(f"{new_base}/expiry", data={"csrf": csrf, "expires_on": "2027-03-01"})
        assert dated.status_code == 303
        assert stack.keys.get(new_id).expires_at == 1_803_859_200.0  # 2027-03-01T00:00Z
        client.post(f"{new_base}/expiry", data={"csrf": csrf, "expires_on": ""})
        assert stack.keys.get(new_id).expires_at is None
        revoked = client.post(f"{new_base}/revoke", data={"csrf": csrf})
        assert revoked.status_code == 303
        assert "revoked" in page(client, revoked.headers["location"]).text
        assert stack.keys.get(new_id).revoked_at is not None


BAD_FORMS: list[tuple[str, dict[str, str | None], int]] = [
    ("create", {"csrf": "wrong"}, 403),
    ("create", {"csrf": None, "name": "no token"}, 403),
    ("create", {"permissions": "Invoices Read"}, 400),
    ("create", {"permissions": "billing:*"}, 401),
    ("create", {"name": "x" * 10_240}, 400),
    ("create", {"mode": "prod"}, 400),
    ("create", {"expires_on": "2001-01-01"}, 400),
    ("create", {"expires_on": "tomorrow"}, 400),
    ("rotate", {"grace": "99999999"}, 400),
    ("rotate-theirs", {}, 404),
    ("revoke-theirs", {}, 404),
    ("expiry", {"expires_on": "2001-01-01"}, 400),
    ("expiry-theirs", {"expires_on": ""}, 404),
]


@pytest.mark.parametrize(("action", "fields", "status"), BAD_FORMS)
def test_bad_forms_are_refused_and_change_nothing(
    stack: Stack, action: str, fields: dict[str, str | None], status: int
) -> None:
    """A wrong or missing CSRF token, malformed or 10 KB fields, a permission the
    signed-in key lacks and another organization's key ids get an error page in the
    seed's words, and nothing changes."""
    org, other = new_org(), new_org()
    limited, _ = stack.key(org, ["api_keys:manage", "invoices:*"])
    _, mine = stack.key(org, ["invoices:read"])
    _, theirs = stack.key(other, [])
    client, _ = sign_in(stack, limited)
    before = stack.state(org), stack.state(other)
    with closing(client):
        csrf = token(page(client, f"/dashboard/organizations/{org}/keys"))
        data = {
            name: value for name, value in {"csrf": csrf, **fields}.items() if value is not None
        }
        target = theirs.id if action.endswith("-theirs") else mine.id
        verb = action.removesuffix("-theirs")
        url = (
            f"/dashboard/organizations/{org}/keys"
            if verb == "create"
            else f"/dashboard/organizations/{org}/keys/{target}/{verb}"
        )
        answer = client.post(url, data=data)
    assert answer.status_code == status, answer.text[:300]
    assert answer.headers["content-type"].startswith("text/html")
    assert len(answer.content) < 4000  # the 10 KB name is not echoed back
    assert (stack.state(org), stack.state(other)) == before


def test_a_session_is_for_its_own_organization_and_a_cross_site_form_fails(stack: Stack) -> None:
    """Another organization's pages answer organization_not_found; a form posted from
    another site is refused even with a valid token."""
    org, other = new_org(), new_org()
    root, _ = stack.key(org)
    stack.key(other)
    client, _ = sign_in(stack, root)
    with closing(client):
        elsewhere = client.get(f"/dashboard/organizations/{other}/keys")
        assert elsewhere.status_code == 401
        assert "organization_not_found" in elsewhere.text
        csrf = token(page(client, f"/dashboard/organizations/{org}/keys"))
        foreign = client.post(
            f"/dashboard/organizations/{org}/keys",
            data={"csrf": csrf},
            headers={"Origin": "https://evil.example"},
        )
        assert foreign.status_code == 403
    assert len(stack.keys.list(org)) == 1


def test_revoking_the_signed_in_key_ends_its_session(stack: Stack) -> None:
    """A session lasts as long as its key: revoked (or rotated out, or expired), the
    next page is the sign-in page, saying the session ended."""
    org = new_org()
    root, record = stack.key(org)
    client, _ = sign_in(stack, root)
    with closing(client):
        csrf = token(page(client, f"/dashboard/organizations/{org}/keys"))
        client.post(f"/dashboard/organizations/{org}/keys/{record.id}/revoke", data={"csrf": csrf})
        ended = client.get(f"/dashboard/organizations/{org}")
        assert ended.headers["location"] == "/dashboard?ended=1"
        assert "ended" in client.get("/dashboard?ended=1").text


def test_sign_out_forgets_the_session(stack: Stack) -> None:
    """Signing out clears the cookie; the home page then offers the sign-in form."""
    org = new_org()
    root, _ = stack.key(org)
    client, _ = sign_in(stack, root)
    with closing(client):
        home = client.get("/dashboard")
        assert home.status_code == 303
        csrf = token(page(client, home.headers["location"]))
        out = client.post("/dashboard/sign-out", data={"csrf": csrf})
        assert out.status_code == 303
        assert "mk_session=;" in " ".join(out.headers.get_list("set-cookie"))
        client.cookies.clear()
        assert "Sign in" in page(client, "/dashboard").text


def test_the_overview_shows_this_month_and_says_history_needs_a_ledger(stack: Stack) -> None:
    """The overview draws the burn-down of this month from the counters, lists usage
    per key and per operation, and, without a ledger, says there is no daily history."""
    org = new_org()
    root, _ = stack.key(org)
    _, worker = stack.key(org, ["invoices:*"], name="worker")
    for operation in ("invoices.list", "invoices.list", "invoices.create"):
        stack.meter.check(worker.id, org=org, operation=operation)
    client, _ = sign_in(stack, root)
    with closing(client):
        overview = page(client, f"/dashboard/organizations/{org}")
        keys = page(client, f"/dashboard/organizations/{org}/keys")
        css = client.get("/dashboard/dashboard.css")
    text = overview.text
    assert '<svg class="chart chart-burndown"' in text
    assert "<polyline" in text
    assert re.search(r'id="credits-used".*?0\.07', text, re.S)
    assert "invoices.create" in text
    assert worker.id in text
    assert "history-unavailable" in text
    assert worker.id in keys.text
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert secrets_in(text + keys.text) == []


def test_the_keys_page_is_paged_newest_first(stack: Stack) -> None:
    """Past 100 keys the list has pages, newest first; a bad page number is refused."""
    org = new_org()
    root, _ = stack.key(org)
    made = []
    for _ in range(104):
        stack.clock.advance(0.001)
        made.append(stack.key(org, [])[1].id)
    client, _ = sign_in(stack, root)
    with closing(client):
        first = page(client, f"/dashboard/organizations/{org}/keys").text
        second = page(client, f"/dashboard/organizations/{org}/keys?page=2").text
        bad = client.get(f"/dashboard/organizations/{org}/keys?page=zero")
    assert made[-1] in first
    assert made[0] not in first
    assert made[0] in second
    assert 'rel="prev"' in second
    assert "Page 1 of 2" in first
    assert bad.status_code == 400
