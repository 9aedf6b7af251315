"""The HTTP gate's refusals reach the meter's observers, once each; and a real server
answers in its time whatever its observers do."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

import meterkit
from meterkit import BackendUnavailable
from meterkit.asgi import MeterMiddleware
from meterkit.http.gate import Admission, Gate, RequestView, Response
from meterkit.keys.memory import MemoryKeyStore
from meterkit.observe import Background, Event
from tests.conftest import FakeClock
from tests.http._serve import serve_asgi

ORG = "org_a"
INVOICES = f"/organizations/{ORG}/invoices"


class Setup:
    """A gate on the seed's policy over an observed memory meter, and one key of ORG with
    the invoice permissions only."""

    def __init__(self, store: Any = None, **options: Any) -> None:
        self.clock = FakeClock()
        self.events: list[Event] = []
        self.meter = meterkit.Meter(
            meterkit.Policy.crane_ledger(),
            meterkit.MemoryBackend(clock=self.clock),
            on_decision=self.events.append,
        )
        self.store = store or MemoryKeyStore(clock=self.clock)
        plaintext, self.key = MemoryKeyStore.create(self.store, org=ORG, permissions=["invoices:*"])
        self.auth = f"Bearer {plaintext}"
        self.gate = Gate(self.meter, self.store, **options)

    def decide(
        self, method: str, path: str, *, scheme: str = "https", body: bytes = b"", **headers: str
    ) -> Any:
        sent = {name.replace("_", "-"): value for name, value in headers.items()}
        sent.setdefault("authorization", self.auth)
        view = RequestView(method, path, scheme=scheme, headers=sent, body=body)
        return self.gate.admit_blocking(view)


def summary(event: Event) -> tuple[Any, ...]:
    return (event.outcome, event.status, event.reason, event.operation, event.org, event.key)


def test_each_refusal_of_the_gate_is_one_event() -> None:
    """403 (HTTPS), 401 (a bad key, a missing permission), 404, 405, 400, and the
    Idempotency-Key's 409 and 422: one event each, saying what the error body says,
    with the operation, organization and key where known."""
    s = Setup()
    key = s.key.id
    answers = [
        s.decide("GET", INVOICES, scheme="http"),
        s.decide("GET", INVOICES, authorization="Bearer nonsense"),
        s.decide("GET", f"/organizations/{ORG}/reports/summary"),
        s.decide("GET", f"/organizations/{ORG}/nothing-here"),
        s.decide("DELETE", INVOICES),
        s.decide("POST", INVOICES, idempotency_key="a,b"),
        s.decide("POST", INVOICES, idempotency_key="k1", body=b"{}"),
        # the first is still running: 409
        s.decide("POST", INVOICES, idempotency_key="k1", body=b"{}"),
    ]
    first = answers[6]
    assert isinstance(first, Admission)
    assert first.keeping is not None
    first.keeping.start(201, [("Content-Type", "application/json")], {})
    first.keeping.add(b'{"id": "inv_1"}', last=True)
    s.gate.keep_blocking(first)
    # kept: the same body is answered the first response; another is refused 422
    replay = s.decide("POST", INVOICES, idempotency_key="k1", body=b"{}")
    assert isinstance(replay, Response)
    assert (replay.status, replay.body) == (201, b'{"id": "inv_1"}')
    answers.append(s.decide("POST", INVOICES, idempotency_key="k1", body=b'{"other": 1}'))
    assert [a.status if isinstance(a, Response) else 200 for a in answers] == [
        403,
        401,
        401,
        404,
        405,
        400,
        200,
        409,
        422,
    ]
    create = ("invoices.create", ORG, key)
    assert [summary(e) for e in s.events] == [
        ("refused", 403, "https_required", None, None, None),
        ("refused", 401, "invalid_api_key", "invoices.list", ORG, None),
        ("refused", 401, "insufficient_permissions", "reports.generate", ORG, None),
        ("refused", 404, "not_found", None, ORG, None),
        ("refused", 405, "method_not_allowed", None, ORG, None),
        ("refused", 400, "invalid_idempotency_key", *create),
        ("allowed", 200, None, *create),
        # each retry: the meter's replayed charge, then the gate's refusal
        ("allowed", 200, None, *create),
        ("refused", 409, "idempotency_key_in_use", *create),
        ("allowed", 200, None, *create),  # the replay of the kept response
        ("allowed", 200, None, *create),
        ("refused", 422, "idempotency_key_reused", *create),
    ]
    assert [e.replayed for e in s.events[6:]] == [False, True, False, True, True, False]


def test_a_key_reused_for_another_operation_is_reported_once() -> None:
    """An Idempotency-Key first used for another operation is the meter's refusal: one
    event (422), none from the gate."""
    s = Setup()
    assert not isinstance(s.decide("POST", INVOICES, idempotency_key="k2"), Response)
    found = s.decide("PUT", f"{INVOICES}/inv_1", idempotency_key="k2")
    assert isinstance(found, Response)
    assert found.status == 422
    assert [summary(e)[:3] for e in s.events] == [
        ("allowed", 200, None),
        ("refused", 422, "idempotency_key_reused"),
    ]


def test_a_denial_is_reported_once_by_the_meter() -> None:
    """A 429 is the meter's denied event, and the gate adds none of its own."""
    s = Setup()
    for _ in range(101):  # the seed's burst: 100 a minute per key
        found = s.decide("GET", INVOICES)
    assert isinstance(found, Response)
    assert found.status == 429
    assert [e.outcome for e in s.events].count("denied") == 1
    assert len(s.events) == 101
    assert s.events[-1].tier == "key-burst"


class DownStore(MemoryKeyStore):
    """A key store whose backend is unreachable."""

    def authenticate(self, *args: Any, **kwargs: Any) -> Any:
        raise BackendUnavailable("key store down")


def test_a_key_store_failure_is_an_error_event() -> None:
    """The key store's outage answers 503 and is reported as an error of its kind."""
    s = Setup(store=DownStore(clock=FakeClock()))
    found = s.decide("GET", INVOICES)
    assert isinstance(found, Response)
    assert found.status == 503
    assert [summary(e) for e in s.events] == [
        ("error", 503, "backend_unavailable", "invoices.list", ORG, None)
    ]


def test_a_meter_failure_is_reported_once() -> None:
    """The meter's backend failing (503) is the meter's error event alone."""
    s = Setup()

    def down(plan: Any) -> Any:
        raise BackendUnavailable("redis down")

    s.meter._apply = down
    found = s.decide("GET", INVOICES)
    assert isinstance(found, Response)
    assert found.status == 503
    assert [summary(e) for e in s.events] == [
        ("error", 503, "backend_unavailable", "invoices.list", ORG, s.key.id)
    ]


def test_without_observers_the_gate_reports_nothing_and_answers_alike() -> None:
    """A gate over a meter without observers answers every refusal the same way."""
    s = Setup()
    plain = Gate(
        meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend(clock=s.clock)),
        s.store,
    )
    for method, path, scheme in (
        ("GET", INVOICES, "http"),
        ("GET", f"/organizations/{ORG}/nothing-here", "https"),
        ("DELETE", INVOICES, "https"),
    ):
        view = RequestView(method, path, scheme=scheme, headers={"authorization": s.auth})
        ours, theirs = s.gate.admit_blocking(view), plain.admit_blocking(view)
        assert isinstance(ours, Response)
        assert isinstance(theirs, Response)
        assert (ours.status, ours.headers, ours.body) == (
            theirs.status,
            theirs.headers,
            theirs.body,
        )


async def test_the_asgi_gate_reports_through_the_same_hook() -> None:
    """The coroutine flow (ASGI shells) reports as the blocking one does."""
    s = Setup()
    found = await s.gate.admit(RequestView("GET", INVOICES, headers={"authorization": "Bearer x"}))
    assert isinstance(found, Response)
    assert found.status == 401
    found = await s.gate.admit(RequestView("GET", INVOICES, headers={"authorization": s.auth}))
    assert isinstance(found, Admission)
    assert [(e.outcome, e.status) for e in s.events] == [("refused", 401), ("allowed", 200)]


def _app_with(observers: Any) -> tuple[Any, str]:
    store = MemoryKeyStore()
    plaintext, _ = store.create(org=ORG, permissions=["*"])
    meter = meterkit.Meter(
        meterkit.Policy.crane_ledger(), meterkit.MemoryBackend(), on_decision=observers
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return MeterMiddleware(app, meter=meter, keystore=store), plaintext


def test_a_real_server_answers_in_its_time_whatever_the_observers_do() -> None:
    """Under uvicorn, with an observer that raises and a blocked one behind Background,
    requests are answered at once, admitted and refused as without observers."""
    release = threading.Event()
    seen: list[str] = []

    def raises(event: Event) -> None:
        raise RuntimeError("observer bug")

    def blocked(event: Event) -> None:
        release.wait(30)
        seen.append(event.outcome)

    background = Background(blocked)
    app, plaintext = _app_with([raises, background])
    headers = {"Authorization": f"Bearer {plaintext}", "X-Forwarded-Proto": "https"}
    try:
        with serve_asgi(app) as url, httpx.Client(base_url=url, timeout=5) as client:
            started = time.monotonic()
            statuses = [client.get(INVOICES, headers=headers).status_code for _ in range(5)]
            statuses.append(client.get("/organizations/org_a/nope", headers=headers).status_code)
            statuses.append(
                client.get(INVOICES, headers={"X-Forwarded-Proto": "https"}).status_code
            )
            took = time.monotonic() - started
        assert statuses == [200] * 5 + [404, 401]
        assert took < 5, f"7 requests took {took:.1f} s with a blocked observer"
    finally:
        release.set()
        assert background.flush(10)
        background.close(5)
    assert seen == ["allowed"] * 5 + ["refused", "refused"]


@pytest.mark.parametrize("observed", [False, True])
def test_statuses_and_headers_are_the_same_with_or_without_observers(observed: bool) -> None:
    """An observer changes no answer of a real server: statuses and meterkit's headers."""
    events: list[Event] = []
    app, plaintext = _app_with(events.append if observed else None)
    headers = {"Authorization": f"Bearer {plaintext}", "X-Forwarded-Proto": "https"}
    with serve_asgi(app) as url, httpx.Client(base_url=url, timeout=5) as client:
        response = client.get(INVOICES, headers=headers)
    assert response.status_code == 200
    assert response.headers["X-Credits-Charged"] == "0.01"
    assert response.headers["RateLimit"].startswith('"key-hour";r=999')
    assert len(events) == (1 if observed else 0)
