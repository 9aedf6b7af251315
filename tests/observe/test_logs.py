"""LogObserver: one structured line per refusal and backend failure, at tunable levels."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from meterkit import ConfigurationError, MemoryBackend, Meter
from meterkit.observe import Event, LogObserver
from tests.conftest import FakeClock
from tests.observe._script import run_script, script_policy
from tests.observe.conftest import Scripted


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "meterkit"]


def test_a_line_per_refusal_and_backend_failure(
    scripted: Scripted, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The scripted sequence logs its denials, its reused key, its outage and its degraded
    admission, each with the event's fields; admissions and refunds are not logged."""
    meter, outage = scripted(LogObserver())
    with caplog.at_level(logging.DEBUG, logger="meterkit"):
        run_script(meter, clock, outage)
    found = lines(caplog)
    # (latency varies: cut it off)
    assert [(level, line.split(" latency_ms=")[0]) for level, line in found] == [
        (
            logging.INFO,
            "meterkit denied operation=items.list org=org_a key=key_1 mode=live "
            "reason=rate_limited tier=key-burst status=429",
        ),
        (
            logging.INFO,
            "meterkit denied operation=items.create org=org_b key=key_2 mode=live "
            "reason=insufficient_credits tier=credits status=402",
        ),
        (
            logging.INFO,
            "meterkit refused operation=items.create org=org_a key=key_4 mode=live "
            "reason=idempotency_key_reused status=422",
        ),
        (
            logging.WARNING,
            "meterkit error operation=items.list org=org_a key=key_5 mode=live "
            "reason=backend_unavailable status=503",
        ),
        (
            logging.WARNING,
            "meterkit degraded operation=items.list org=org_a key=key_5 mode=live "
            "reason=backend_unavailable status=200",
        ),
    ]
    assert all(" latency_ms=" in line for _, line in found)


def test_the_record_carries_the_fields_for_a_json_formatter(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """record.meterkit is the event as a dict."""
    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=LogObserver())
    with caplog.at_level(logging.INFO, logger="meterkit"):
        for _ in range(3):
            meter.check("k", org="org_a", operation="items.list")
    (record,) = caplog.records
    data: dict[str, Any] = record.meterkit  # type: ignore[attr-defined]
    assert {k: data[k] for k in ("outcome", "operation", "org", "key", "reason", "tier")} == {
        "outcome": "denied",
        "operation": "items.list",
        "org": "org_a",
        "key": "k",
        "reason": "rate_limited",
        "tier": "key-burst",
    }
    assert data["charged"] == "0"


def test_levels_can_be_tuned(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """levels= logs admissions too, at the level asked, and silences denials with None;
    a logger may be given by name."""
    observer = LogObserver("app.metering", levels={"allowed": logging.DEBUG, "denied": None})
    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=observer)
    with caplog.at_level(logging.DEBUG, logger="app.metering"):
        for _ in range(3):
            meter.check("k", org="org_a", operation="items.list")
    found = [(r.name, r.levelno, r.getMessage().split()[1]) for r in caplog.records]
    assert found == [("app.metering", logging.DEBUG, "allowed")] * 2


def test_nothing_is_formatted_below_the_loggers_level(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """With the logger above INFO, denials write nothing."""
    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=LogObserver())
    with caplog.at_level(logging.WARNING, logger="meterkit"):
        for _ in range(3):
            meter.check("k", org="org_a", operation="items.list")
    assert caplog.records == []


def test_values_are_quoted_and_secrets_withheld(caplog: pytest.LogCaptureFixture) -> None:
    """A value with spaces or quotes is quoted; anything shaped like a key's plaintext is
    withheld from the line."""
    observer = LogObserver()
    event = Event(
        "refused",
        'items "x" list',
        "org with space",
        "cl_live_abcdefgh12345678secret",
        None,
        "not_found",
        None,
        404,
        None,
    )
    with caplog.at_level(logging.INFO, logger="meterkit"):
        observer(event)
    (line,) = [r.getMessage() for r in caplog.records]
    assert 'operation="items \\"x\\" list"' in line
    assert 'org="org with space"' in line
    assert "cl_live_abcdefgh" not in line
    assert "<secret key withheld>" in line


@pytest.mark.parametrize(
    "levels", [{"nope": logging.INFO}, {"denied": "INFO"}, {"denied": -1}], ids=str
)
def test_bad_levels_are_refused(levels: dict[str, Any]) -> None:
    """An unknown outcome or a level that is not an int is refused."""
    with pytest.raises(ConfigurationError):
        LogObserver(levels=levels)
