"""The dashboard in a real browser: Debian's chromium, driven by Playwright.

The test signs in with a key, finds the charts drawn, creates a key and sees it
listed with its secret shown once (and no secret after a reload), rotates it, and looks
at the pages on a 390 px wide screen. Screenshots go to ``METERKIT_SCREENSHOTS`` when
it names a folder (the docs' images: ``METERKIT_SCREENSHOTS=docs/img``).

Nothing is downloaded: the browser is the system's ``/usr/bin/chromium`` (``.ci/run``
installs it). Without it the test skips, unless ``METERKIT_REQUIRE_BROWSER=1`` (set by
``.ci/run``), which makes that a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meterkit
from meterkit.admin import Admin
from meterkit.ledger import Drain, SqliteStore
from tests.admin._demo import populate
from tests.conftest import FakeClock
from tests.http._serve import serve_asgi

CHROMIUM = os.environ.get("METERKIT_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEYS = re.compile(r"\b[a-z][a-z0-9]{0,15}_(?:live|test)_[0-9A-Za-z]{50}\b")
ORG = "org_crane_ledger"


def _no_browser(why: str) -> None:
    if os.environ.get("METERKIT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{why}, and METERKIT_REQUIRE_BROWSER=1")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium under Playwright (never a downloaded browser)."""
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        _no_browser(f"no chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("playwright is not installed")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Any]]:
    """The dashboard of a demonstration organization with 90 days of traffic in its
    ledger: (base URL, admin key, key store)."""
    clock = FakeClock(1_768_867_200.0 + 15 * 3600)  # 2026-01-20 15:00 UTC
    policy = meterkit.Policy.crane_ledger()
    backend = meterkit.MemoryBackend(clock=clock, ledger=True)
    ledger = SqliteStore(str(tmp_path_factory.mktemp("ledger") / "ledger.db"))
    store = meterkit.AsyncMemoryKeyStore(clock=clock)
    admin_key = populate(ORG, store.sync, meterkit.Meter(policy, backend), clock, days=90)
    with Drain(backend, ledger) as drain:
        while drain.run_once():
            pass
    admin = Admin(
        meterkit.AsyncMeter(policy, backend, ledger=ledger),
        store,
        session_secret=os.urandom(32),
        trusted_proxies=["127.0.0.1"],
    )
    with serve_asgi(admin) as url:
        yield url, admin_key, store.sync
    ledger.close()


def secrets_in(html: str) -> list[str]:
    return KEYS.findall(html)


def shoot(page: Any, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("METERKIT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"dashboard-{name}.png"), full_page=True)


def test_sign_in_charts_create_rotate_in_chromium(
    browser: Any, demo: tuple[str, str, Any], tmp_path: Path
) -> None:
    """A person signs in with a key, sees the charts drawn, creates a key (its secret
    shown once, gone after a reload, no other secret ever in a page), and rotates it."""
    url, admin_key, store = demo
    context = browser.new_context(
        viewport={"width": 1280, "height": 900},
        extra_http_headers={"X-Forwarded-Proto": "https"},  # as behind a TLS proxy
    )
    page = context.new_page()
    try:
        page.goto(f"{url}/dashboard")
        shoot(page, "sign-in", tmp_path)
        page.fill("#key", admin_key)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/dashboard/organizations/{ORG}")
        assert page.inner_text("#organization-id") == ORG
        assert secrets_in(page.content()) == []

        # The burn-down is drawn: a line across the days so far, a point per day.
        line = page.locator("svg.chart-burndown polyline.actual")
        box = line.bounding_box()
        assert box is not None
        assert box["width"] > 100
        assert page.locator("svg.chart-burndown circle.point").count() >= 1
        assert page.locator("table.per-operation tbody tr").count() >= 8
        assert page.locator("table.per-key tbody tr").count() == 4
        # The last 90 days, from the ledger: a bar per day, requests and credits.
        for chart in ("requests", "credits"):
            bars = page.locator(f"svg.chart-{chart} rect.bar")
            assert bars.count() == 90
            first = bars.first.bounding_box()
            assert first is not None
            assert first["height"] > 0
        assert page.locator("table.history-per-key tbody tr").count() == 4
        shoot(page, "overview", tmp_path)

        page.click("nav.tabs a:has-text('API keys')")
        page.wait_for_selector("table.keys")
        page.fill("#create-key input[name=name]", "browser test")
        page.fill("#create-key input[name=permissions]", "invoices:read reports:*")
        page.click("#create-key button[type=submit]")
        page.wait_for_selector("#new-secret")
        secret = page.inner_text("#new-secret")
        assert secret.startswith("cl_live_")
        assert secrets_in(page.content()) == [secret]
        created = store.authenticate(f"Bearer {secret}", org=ORG)
        row = page.locator("table.keys tbody tr", has_text=created.id)
        assert row.count() == 1
        assert "browser test" in row.inner_text()
        shoot(page, "keys-created", tmp_path)

        page.reload()
        page.wait_for_selector("#reveal-gone")
        assert secrets_in(page.content()) == []
        assert page.locator("table.keys tbody tr", has_text=created.id).count() == 1

        row = page.locator("table.keys tbody tr", has_text=created.id)
        row.locator("form.rotate select").select_option("3600")
        row.locator("form.rotate button").click()
        page.wait_for_selector("#new-secret")
        replacement = page.inner_text("#new-secret")
        assert replacement != secret
        assert secrets_in(page.content()) == [replacement]
        new = store.authenticate(f"Bearer {replacement}", org=ORG)
        assert (new.name, new.permissions) == ("browser test", ("invoices:read", "reports:*"))
        assert store.get(created.id).expires_at is not None
        assert page.locator("table.keys tbody tr", has_text=new.id).count() == 1
        page.reload()
        assert secrets_in(page.content()) == []
        shoot(page, "keys", tmp_path)
    finally:
        context.close()


def test_the_pages_fit_a_390_px_screen(
    browser: Any, demo: tuple[str, str, Any], tmp_path: Path
) -> None:
    """On a phone-sized viewport the pages do not scroll sideways (wide tables scroll
    inside their own box) and the charts scale to the screen."""
    url, admin_key, _ = demo
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        extra_http_headers={"X-Forwarded-Proto": "https"},
    )
    page = context.new_page()
    try:
        page.goto(f"{url}/dashboard")
        page.fill("#key", admin_key)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/dashboard/organizations/{ORG}")
        for name in ("overview", "keys"):
            if name == "keys":
                page.goto(f"{url}/dashboard/organizations/{ORG}/keys")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, (name, width)
            box = page.locator("svg.chart-burndown").bounding_box() if name == "overview" else None
            if box is not None:
                assert box["width"] <= 390
                assert box["width"] > 300
        page.goto(f"{url}/dashboard/organizations/{ORG}")
        shoot(page, "mobile", tmp_path)
    finally:
        context.close()


def test_a_missing_browser_fails_where_one_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without chromium the browser tests skip, unless METERKIT_REQUIRE_BROWSER=1 (CI),
    which makes that a failure."""
    monkeypatch.setenv("METERKIT_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="METERKIT_REQUIRE_BROWSER"):
        _no_browser("no chromium")
    monkeypatch.delenv("METERKIT_REQUIRE_BROWSER")
    with pytest.raises(pytest.skip.Exception):
        _no_browser("no chromium")
