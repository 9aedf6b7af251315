"""The behaviour suite: what a Meter promises, on every backend (``make_meter``).

Times are set, never slept: ``at(clock, us)`` puts the fake clock ``us`` microseconds
after 2026-01-01T00:00:00Z, the start of a clock hour and of a calendar month.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

import meterkit
from meterkit import (
    AsyncMeter,
    AuthenticationError,
    BackendUnavailable,
    Category,
    CostTable,
    CreditPlan,
    InvalidRequestError,
    MemoryBackend,
    Meter,
    Operation,
    Policy,
    Tier,
)
from tests.conftest import FakeClock

US = 1_000_000
S = US  # one second in µs, for readability
MIN = 60 * S
HOUR = 3600 * S
DAY = 24 * HOUR
BASE_US = 1_767_225_600 * US  # the clock fixture's start: 2026-01-01T00:00:00Z
FEB = 31 * DAY  # 2026-02-01T00:00:00Z, relative to BASE_US
UTC = timezone.utc

MakeMeter = Callable[[Policy], Any]


def at(clock: FakeClock, us: int) -> None:
    """Set the clock to ``us`` µs after BASE (one rounding, so exact to the µs)."""
    clock.now = (BASE_US + us) / US


def _policy(*tiers: Tier, allowance: str = "100", shadow: bool = False) -> Policy:
    costs = CostTable(
        (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
        (Operation("items.list", "read", "0.01"), Operation("items.create", "write", "0.05")),
    )
    return Policy(tiers, costs, CreditPlan(allowance), shadow=shadow)


@dataclass(frozen=True)
class ApiKey:
    """An authenticated key as middleware hands it over: public id, org and mode."""

    id: str
    org: str
    mode: str = "live"


# -- decisions ------------------------------------------------------------------------


def test_admitted_decision_reports_charge_balance_and_tiers(make_meter: MakeMeter) -> None:
    """An admitted check is truthy, charged the table price, with each tier's state."""
    meter = make_meter(_policy(Tier("key-min", "key", "3/minute"), Tier("org-day", "org", "5/day")))
    d = meter.check("key_a", org="org_a", operation="items.create")
    assert d
    assert d.allowed
    assert d.reason is None
    assert d.status == 200
    assert d.error is None
    assert d.retry_after == 0
    assert d.charged == Decimal("0.05")
    assert d.balance == Decimal("99.95")
    assert d.charge_id
    assert not d.replayed
    assert not d.degraded
    assert d.would_deny == ()
    assert (d.key, d.org, d.operation) == ("key_a", "org_a", "items.create")
    assert d.resets_at == datetime(2026, 2, 1, tzinfo=UTC)
    assert d.tiers == (
        meterkit.TierState("key-min", 3, 2, 60.0, False, False),
        meterkit.TierState("org-day", 5, 4, 86400.0, False, False),
    )


def test_rate_limited_decision_has_the_seed_429_body(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """A rate-limited check answers 429 with the seed's body; retry_after rounds up in it."""
    meter = make_meter(_policy(Tier("key-min", "key", "2/minute")))
    at(clock, 10 * S + 250_000)
    assert meter.check("key_a", org="org_a", operation="items.list")
    assert meter.check("key_a", org="org_a", operation="items.list")
    d = meter.check("key_a", org="org_a", operation="items.list")
    assert not d
    assert d.reason == "rate_limited"
    assert d.status == 429
    assert d.retry_after == 49.75
    assert d.error == {
        "error": {
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
            "message": "API rate limit exceeded. Try again later.",
            "retry_after": 50,
            "status": 429,
        }
    }
    assert d.headers["Retry-After"] == "50"
    assert d.charged == 0
    assert d.charge_id == ""
    assert d.balance == Decimal("99.98")
    assert d.tiers[0].denied


def test_insufficient_credits_decision_has_a_402_body(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """An organization out of credits gets 402 insufficient_credits until the month ends."""
    meter = make_meter(_policy(allowance="0.05"))
    at(clock, 5 * DAY)
    assert meter.check("key_a", org="org_a", operation="items.create").balance == 0
    d = meter.check("key_a", org="org_a", operation="items.list")
    assert not d.allowed
    assert d.reason == "insufficient_credits"
    assert d.status == 402
    assert d.error == {
        "error": {
            "type": "billing_error",
            "code": "insufficient_credits",
            "message": "Insufficient credits for this operation. Credits reset at the start "
            "of the next billing period.",
            "status": 402,
        }
    }
    assert d.retry_after == (FEB - 5 * DAY) / US
    # No weeks-long Retry-After unless asked for (issue 12).
    assert "Retry-After" not in d.headers
    assert d.http_headers(credits_retry_after=True)["Retry-After"] == str((FEB - 5 * DAY) // US)
    assert d.resets_at == datetime(2026, 2, 1, tzinfo=UTC)
    assert d.charged == 0
    assert d.balance == 0


def test_insufficient_credits_wins_over_the_rate_limit(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """When both say no, the reason is credits and retry_after covers both."""
    meter = make_meter(_policy(Tier("key-day", "key", "1/day", "sliding_log"), allowance="0.01"))
    at(clock, FEB - HOUR)
    assert meter.check("key_a", org="org_a", operation="items.list")
    d = meter.check("key_a", org="org_a", operation="items.list")
    assert d.reason == "insufficient_credits"
    assert d.tiers[0].denied
    assert d.retry_after == DAY / US  # the day tier frees up after the month turns
    at(clock, FEB - HOUR + DAY - 1)
    assert meter.check("key_a", org="org_a", operation="items.list").reason == "rate_limited"
    at(clock, FEB - HOUR + DAY)
    assert meter.check("key_a", org="org_a", operation="items.list").allowed


def test_headers_follow_the_ietf_draft_and_legacy_names(make_meter: MakeMeter) -> None:
    """An admitted seed-policy check sends RateLimit-Policy, RateLimit, X-RateLimit-*, credits."""
    meter = make_meter(Policy.crane_ledger())
    d = meter.check("key_a", org="org_a", operation="invoices.list")
    assert d.headers == {
        "RateLimit-Policy": (
            '"key-hour";q=1000;w=3600, "org-hour";q=10000;w=3600, "key-burst";q=100;w=60'
        ),
        "RateLimit": '"key-hour";r=999;t=3600, "org-hour";r=9999;t=3600, "key-burst";r=99;t=60',
        "X-RateLimit-Limit": "100",
        "X-RateLimit-Remaining": "99",
        "X-RateLimit-Reset": "60",
        "X-Credits-Charged": "0.01",
        "X-Credits-Remaining": "9999.99",
    }


def test_denied_headers_report_unspent_quota_and_retry_after(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """A burst denial reports the burst tier empty, the others unspent, and Retry-After."""
    meter = make_meter(Policy.crane_ledger())
    for _ in range(100):
        assert meter.check("key_a", org="org_a", operation="invoices.list")
    at(clock, 500_000)
    d = meter.check("key_a", org="org_a", operation="invoices.list")
    assert d.reason == "rate_limited"
    assert d.retry_after == 59.5
    assert d.headers == {
        "RateLimit-Policy": (
            '"key-hour";q=1000;w=3600, "org-hour";q=10000;w=3600, "key-burst";q=100;w=60'
        ),
        "RateLimit": '"key-hour";r=900;t=3600, "org-hour";r=9900;t=3600, "key-burst";r=0;t=60',
        "X-RateLimit-Limit": "100",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "60",
        "Retry-After": "60",
        "X-Credits-Charged": "0",
        "X-Credits-Remaining": "9999",
    }
    assert [t.denied for t in d.tiers] == [False, False, True]


def test_x_ratelimit_headers_follow_the_tier_with_least_remaining(make_meter: MakeMeter) -> None:
    """The legacy X-RateLimit-* headers describe whichever tier has the fewest requests left."""
    meter = make_meter(_policy(Tier("wide", "key", "50/minute"), Tier("narrow", "org", "4/hour")))
    d = meter.check("key_a", org="org_a", operation="items.list")
    assert d.headers["X-RateLimit-Limit"] == "4"
    assert d.headers["X-RateLimit-Remaining"] == "3"
    assert d.headers["X-RateLimit-Reset"] == "3600"
    assert "Retry-After" not in d.headers


def test_gcra_headers_state_the_real_quota_and_the_next_token(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """A gcra tier of 20/minute with a burst of 5 advertises q=20;w=60 and its bucket; t
    is when the next token comes; a 429's Retry-After never points before the end of
    the window shown for the tier that denied it (draft-ietf-httpapi-ratelimit-headers)."""
    bucket = Tier("bucket", "key", "20/minute", "gcra", burst=5)
    meter = make_meter(_policy(bucket, Tier("hour", "key", "100/hour")))
    for left in range(4, -1, -1):
        d = meter.check("key_a", org="org_a", operation="items.list")
        assert d.headers["RateLimit"] == f'"bucket";r={left};t=3, "hour";r={95 + left};t=3600'
    assert d.headers["RateLimit-Policy"] == (
        '"bucket";q=20;w=60;meterkit-burst=5, "hour";q=100;w=3600'
    )
    assert d.headers["X-RateLimit-Limit"] == "20"
    at(clock, 1_000_000)
    denied = meter.check("key_a", org="org_a", operation="items.list")
    assert denied.reason == "rate_limited"
    assert denied.retry_after == 2
    assert denied.headers["Retry-After"] == "2"
    assert denied.headers["RateLimit"] == '"bucket";r=0;t=2, "hour";r=95;t=3599'
    assert (denied.headers["X-RateLimit-Remaining"], denied.headers["X-RateLimit-Reset"]) == (
        "0",
        "2",
    )
    at(clock, 3_000_000)
    again = meter.check("key_a", org="org_a", operation="items.list")
    assert again.allowed
    assert again.headers["RateLimit"].startswith('"bucket";r=0;t=3')


def test_a_denial_elsewhere_leaves_a_gcra_bucket_its_token(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """When another tier denies, a gcra tier reports the token it kept and when the next
    one comes, as if this request had not happened."""
    bucket = Tier("bucket", "key", "60/minute", "gcra", burst=10)
    meter = make_meter(_policy(bucket, Tier("two", "key", "2/hour")))
    meter.check("key_a", org="org_a", operation="items.list")
    first = meter.check("key_a", org="org_a", operation="items.list")
    assert first.headers["RateLimit"].startswith('"bucket";r=8;t=1,')
    denied = meter.check("key_a", org="org_a", operation="items.list")
    assert denied.reason == "rate_limited"
    assert denied.headers["RateLimit"] == '"bucket";r=8;t=1, "two";r=0;t=3600'


def test_raw_headers_are_the_text_headers_as_an_asgi_server_takes_them(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """raw_http_headers (what the ASGI middleware sends) says what http_headers says,
    lower-cased and as bytes, in its order: admitted, rate-limited (gcra and window
    tiers), refused for credits, a price that is not the table's, every group choice."""
    bucket = Tier("bucket", "key", "60/minute", "gcra", burst=3)
    meter = make_meter(_policy(bucket, Tier("two", "org", "5/hour"), allowance="0.12"))
    decisions = [meter.check("key_a", org="org_a", operation="items.list") for _ in range(4)]
    decisions.append(meter.check("key_b", org="org_a", operation="items.create"))
    decisions.append(meter.check("key_c", org="org_a", operation="items.list", cost="0.02"))
    at(clock, 30 * MIN)
    decisions.append(meter.check("key_d", org="org_a", operation="items.create"))
    reasons = {d.reason for d in decisions}
    assert reasons == {None, "rate_limited", "insufficient_credits"}, reasons
    for d in decisions:
        for ietf in (True, False):
            for legacy in (True, False):
                for credits in (True, False):
                    for retry in (True, False):
                        groups = {
                            "ietf": ietf,
                            "legacy": legacy,
                            "credits": credits,
                            "credits_retry_after": retry,
                        }
                        text = d.http_headers(**groups)
                        assert d.raw_http_headers(**groups) == [
                            (k.lower().encode("latin-1"), v.encode("latin-1"))
                            for k, v in text.items()
                        ]


def test_charges_and_balances_are_exact_decimals(make_meter: MakeMeter) -> None:
    """Balances are the allowance minus the exact sum of charges, as Decimals and header text."""
    meter = make_meter(_policy(allowance="1"))
    spent = Decimal(0)
    for i, (op, price) in enumerate([("items.list", "0.01"), ("items.create", "0.05")] * 6):
        d = meter.check(f"key_{i % 3}", org="org_a", operation=op)
        spent += Decimal(price)
        assert d.charged == Decimal(price)
        assert d.balance == Decimal(1) - spent
        assert Decimal(d.headers["X-Credits-Remaining"]) == Decimal(1) - spent
        assert Decimal(d.headers["X-Credits-Charged"]) == Decimal(price)
    usage = meter.usage("org_a")
    assert usage.credits_used == Decimal("0.36")
    assert usage.credits_left == Decimal("0.64")
    assert usage.allowance == Decimal(1)


# -- shadow mode ------------------------------------------------------------------------


def test_policy_shadow_computes_but_never_denies(make_meter: MakeMeter) -> None:
    """A shadow policy admits everything, reporting and counting what it would have denied."""
    meter = make_meter(_policy(Tier("t", "key", "2/minute"), allowance="0.03", shadow=True))
    decisions = [meter.check("key_a", org="org_a", operation="items.list") for _ in range(5)]
    assert all(d.allowed and d.status == 200 and d.error is None for d in decisions)
    assert [d.would_deny for d in decisions] == [(), (), ("t",), ("t", "credits"), ("t", "credits")]
    assert decisions[2].tiers[0].denied
    assert decisions[2].tiers[0].shadow
    assert [d.balance for d in decisions] == [
        Decimal(x) for x in ("0.02", "0.01", "0", "-0.01", "-0.02")
    ]
    assert meter.shadow_denials == Counter({"t": 3, "credits": 2})
    usage = meter.usage("org_a")
    assert usage.credits_used == Decimal("0.05")
    assert usage.credits_left == Decimal("-0.02")


def test_shadow_tier_reports_without_denying_or_consuming(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """A shadow tier never denies and takes nothing when it would have said no."""
    meter = make_meter(
        _policy(
            Tier("trial", "key", "2/minute", "gcra", shadow=True),
            Tier("real", "key", "10/minute"),
        )
    )
    decisions = [meter.check("key_a", org="org_a", operation="items.list") for _ in range(4)]
    assert all(d.allowed for d in decisions)
    assert [d.would_deny for d in decisions] == [(), (), ("trial",), ("trial",)]
    assert [t.shadow for t in decisions[0].tiers] == [True, False]
    assert decisions[3].tiers[1].remaining == 6
    assert meter.shadow_denials == Counter({"trial": 2})
    # Had the two shadow denials consumed, the bucket would still be over its burst here.
    at(clock, 30 * S)
    later = meter.check("key_a", org="org_a", operation="items.list")
    assert later.would_deny == ()
    assert not later.tiers[0].denied


# -- identities and modes ---------------------------------------------------------------


def test_test_mode_never_draws_on_live_counters_or_credits(make_meter: MakeMeter) -> None:
    """Test-mode checks have their own counters and credits, apart from live ones."""
    meter = make_meter(
        _policy(
            Tier("key-min", "key", "2/minute"), Tier("org-min", "org", "3/minute"), allowance="0.02"
        )
    )
    for _ in range(2):
        assert meter.check("key_a", org="org_a", operation="items.list")
    spent = meter.check("key_a", org="org_a", operation="items.list")
    assert spent.reason == "insufficient_credits"
    assert spent.tiers[0].denied
    first = meter.check("key_a", org="org_a", operation="items.list", mode="test")
    assert first.allowed
    assert first.balance == Decimal("0.01")
    assert first.tiers[0].remaining == 1
    assert first.tiers[1].remaining == 2
    meter.top_up("org_a", "1", mode="test")
    meter.set_allowance("org_a", "5", mode="test")
    assert meter.check("key_b", org="org_a", operation="items.list", mode="test")
    live = meter.usage("org_a")
    test = meter.usage("org_a", mode="test")
    assert (live.requests, live.credits_used) == (2, Decimal("0.02"))
    assert live.allowance == Decimal("0.02")
    assert (test.requests, test.credits_used, test.allowance) == (2, Decimal("0.02"), Decimal(6))
    assert meter.check("key_b", org="org_a", operation="items.list").reason == (
        "insufficient_credits"
    )


def test_api_key_object_scopes_org_and_mode(make_meter: MakeMeter) -> None:
    """An ApiKey-like object is metered by its id, in its own org and mode."""
    meter = make_meter(_policy(Tier("key-min", "key", "1/minute")))
    test_key = ApiKey("key_t", "org_a", "test")
    d = meter.check(test_key, operation="items.list")
    assert (d.allowed, d.key, d.org) == (True, "key_t", "org_a")
    assert meter.usage("org_a", mode="test").keys == {
        "key_t": meterkit.KeyUsage(1, Decimal("0.01"))
    }
    assert meter.usage("org_a").requests == 0
    assert meter.check(test_key, org="org_a", operation="items.list").reason == "rate_limited"
    live = ApiKey("key_t", "org_a")
    assert meter.check(live, operation="items.list", mode="test").allowed  # the key's mode wins
    assert meter.usage("org_a").requests == 1
    with pytest.raises(AuthenticationError) as info:
        meter.check(live, org="org_b", operation="items.list")
    assert info.value.code == "organization_not_found"
    assert info.value.body["error"]["status"] == 401


def test_keys_and_orgs_are_counted_apart(make_meter: MakeMeter) -> None:
    """Key tiers count per key and org tiers per organization."""
    meter = make_meter(
        _policy(Tier("key-min", "key", "1/minute"), Tier("org-min", "org", "2/minute"))
    )
    assert meter.check("key_a", org="org_a", operation="items.list")
    assert meter.check("key_a", org="org_a", operation="items.list").tiers[0].denied
    assert meter.check("key_b", org="org_a", operation="items.list")
    d = meter.check("key_c", org="org_a", operation="items.list")
    assert [t.denied for t in d.tiers] == [False, True]
    assert meter.check("key_d", org="org_b", operation="items.list")


def test_tier_limited_to_operations_counts_only_them(make_meter: MakeMeter) -> None:
    """A tier restricted to some operations neither counts nor blocks the others."""
    tiers = (Tier("writes", "org", "1/minute", operations=("items.create",)),)
    meter = make_meter(_policy(*tiers))
    assert meter.check("key_a", org="org_a", operation="items.list").tiers == ()
    assert meter.check("key_a", org="org_a", operation="items.create")
    assert meter.check("key_a", org="org_a", operation="items.create").reason == "rate_limited"
    assert meter.check("key_a", org="org_a", operation="items.list")


# -- usage and refunds -------------------------------------------------------------------


def test_usage_per_key_and_per_operation(make_meter: MakeMeter) -> None:
    """Usage reports an org's requests and credits per key and per operation, or one key's."""
    meter = make_meter(_policy())
    for key, op in [
        ("k1", "items.list"),
        ("k1", "items.list"),
        ("k1", "items.create"),
        ("k2", "items.create"),
    ]:
        assert meter.check(key, org="org_a", operation=op)
    assert meter.check("k3", org="org_b", operation="items.list")
    usage = meter.usage("org_a")
    assert usage.org == "org_a"
    assert usage.key is None
    assert usage.requests == 4
    assert usage.credits_used == Decimal("0.12")
    assert usage.credits_left == Decimal("99.88")
    assert usage.allowance == Decimal(100)
    assert usage.period_start == datetime(2026, 1, 1, tzinfo=UTC)
    assert usage.period_end == datetime(2026, 2, 1, tzinfo=UTC)
    assert usage.operations == {
        "items.create": meterkit.OperationUsage(2, Decimal("0.10")),
        "items.list": meterkit.OperationUsage(2, Decimal("0.02")),
    }
    assert usage.keys == {
        "k1": meterkit.KeyUsage(3, Decimal("0.07")),
        "k2": meterkit.KeyUsage(1, Decimal("0.05")),
    }
    one = meter.usage("org_a", key="k1")
    assert (one.key, one.requests, one.credits_used) == ("k1", 3, Decimal("0.07"))
    assert one.credits_left == Decimal("99.88")  # always the organization's
    assert one.operations == {
        "items.create": meterkit.OperationUsage(1, Decimal("0.05")),
        "items.list": meterkit.OperationUsage(2, Decimal("0.02")),
    }
    assert list(one.keys) == ["k1"]
    assert one.to_dict()["credits_used"] == "0.07"
    assert one.to_dict()["period_end"] == "2026-02-01T00:00:00+00:00"
    nobody = meter.usage("org_c")
    assert (nobody.requests, nobody.credits_used, nobody.keys) == (0, 0, {})


def test_refund_returns_credits_exactly_once(make_meter: MakeMeter) -> None:
    """A refund gives an admitted charge back once; later refunds of it return False."""
    meter = make_meter(_policy())
    keep = meter.check("k1", org="org_a", operation="items.list")
    d = meter.check("k1", org="org_a", operation="items.create")
    assert meter.refund(d) is True
    assert meter.refund(d) is False
    usage = meter.usage("org_a")
    assert usage.credits_used == Decimal("0.01")
    assert usage.operations["items.create"].credits == 0
    assert usage.requests == 2  # the request happened; its charge was returned
    assert meter.check("k1", org="org_a", operation="items.list").balance == Decimal("99.98")
    assert keep.charge_id != d.charge_id
    test = meter.check("k1", org="org_a", operation="items.create", mode="test")
    assert meter.refund(test) is True
    assert meter.usage("org_a", mode="test").credits_used == 0
    assert meter.usage("org_a").credits_used == Decimal("0.02")


def test_refund_of_a_denied_decision_is_refused(make_meter: MakeMeter) -> None:
    """A denied decision charged nothing, so there is nothing to refund."""
    meter = make_meter(_policy(Tier("t", "key", "1/minute")))
    assert meter.check("k1", org="org_a", operation="items.list")
    denied = meter.check("k1", org="org_a", operation="items.list")
    assert meter.refund(denied) is False
    assert meter.usage("org_a").credits_used == Decimal("0.01")


def test_refund_after_the_month_ended_is_refused(make_meter: MakeMeter, clock: FakeClock) -> None:
    """Only the current period's charges can be refunded, whether or not the org is active."""
    meter = make_meter(_policy(allowance="1"))
    at(clock, FEB - S)
    quiet = meter.check("k1", org="org_a", operation="items.create")
    busy = meter.check("k2", org="org_b", operation="items.create")
    at(clock, FEB + S)
    assert meter.check("k2", org="org_b", operation="items.list")
    assert meter.refund(busy) is False
    assert meter.refund(quiet) is False
    assert meter.usage("org_a").credits_used == 0
    assert meter.usage("org_a").credits_left == 1
    assert meter.usage("org_b").credits_used == Decimal("0.01")


# -- idempotency -------------------------------------------------------------------------


def test_idempotent_retry_replays_without_charging(make_meter: MakeMeter) -> None:
    """A retry with the same idempotency key gets the first decision back, charged once."""
    meter = make_meter(_policy(Tier("t", "key", "1/minute")))
    first = meter.check("k1", org="org_a", operation="items.create", idempotency_key="pay-1")
    again = meter.check("k1", org="org_a", operation="items.create", idempotency_key="pay-1")
    assert first.allowed
    assert not first.replayed
    assert again.allowed
    assert again.replayed
    assert again.charge_id == first.charge_id
    assert (again.charged, again.balance) == (first.charged, first.balance)
    assert again.tiers == first.tiers
    usage = meter.usage("org_a")
    assert (usage.requests, usage.credits_used) == (1, Decimal("0.05"))
    assert meter.check("k1", org="org_a", operation="items.create").reason == "rate_limited"


def test_denied_requests_are_not_remembered(make_meter: MakeMeter, clock: FakeClock) -> None:
    """A denied request's idempotency key does not pin the denial: its retry is decided anew."""
    meter = make_meter(_policy(Tier("t", "key", "1/minute")))
    assert meter.check("k1", org="org_a", operation="items.list")
    denied = meter.check("k1", org="org_a", operation="items.list", idempotency_key="r-1")
    assert denied.reason == "rate_limited"
    at(clock, MIN)
    retry = meter.check("k1", org="org_a", operation="items.list", idempotency_key="r-1")
    assert retry.allowed
    assert not retry.replayed


def test_idempotency_conflict_raises_and_charges_nothing(make_meter: MakeMeter) -> None:
    """Reusing an idempotency key for another key, operation or cost is an InvalidRequestError."""
    meter = make_meter(_policy())
    first = meter.check("k1", org="org_a", operation="items.create", idempotency_key="x")
    for kwargs in (
        {"key": "k2", "operation": "items.create"},
        {"key": "k1", "operation": "items.list"},
        {"key": "k1", "operation": "items.create", "cost": "0.07"},
    ):
        key = kwargs.pop("key")
        with pytest.raises(InvalidRequestError, match="idempotency key"):
            meter.check(key, org="org_a", idempotency_key="x", **kwargs)
    assert meter.usage("org_a").credits_used == Decimal("0.05")
    again = meter.check("k1", org="org_a", operation="items.create", idempotency_key="x")
    assert again.charge_id == first.charge_id


def test_idempotency_keys_are_scoped_per_org_and_mode(make_meter: MakeMeter) -> None:
    """The same idempotency key in another org or in test mode is a different request."""
    meter = make_meter(_policy())
    a = meter.check("k1", org="org_a", operation="items.create", idempotency_key="x")
    b = meter.check("k2", org="org_b", operation="items.list", idempotency_key="x")
    t = meter.check("k3", org="org_a", operation="items.list", idempotency_key="x", mode="test")
    assert [a.replayed, b.replayed, t.replayed] == [False, False, False]
    assert len({a.charge_id, b.charge_id, t.charge_id}) == 3
    assert meter.usage("org_b").credits_used == Decimal("0.01")


def test_idempotency_window_is_24_hours(make_meter: MakeMeter, clock: FakeClock) -> None:
    """Within 24 hours a retry replays; from 24 hours on the same key is a new request."""
    meter = make_meter(_policy())
    first = meter.check("k1", org="org_a", operation="items.create", idempotency_key="x")
    at(clock, DAY - 1)
    assert meter.check("k1", org="org_a", operation="items.create", idempotency_key="x").replayed
    at(clock, DAY)
    later = meter.check("k1", org="org_a", operation="items.create", idempotency_key="x")
    assert later.allowed
    assert not later.replayed
    assert later.charge_id != first.charge_id
    assert meter.usage("org_a").credits_used == Decimal("0.10")


def test_refunded_request_retried_with_its_key_is_new(make_meter: MakeMeter) -> None:
    """After a refund, a retry with the same idempotency key is charged as a new request."""
    meter = make_meter(_policy())
    first = meter.check("k1", org="org_a", operation="items.create", idempotency_key="x")
    assert meter.refund(first)
    retry = meter.check("k1", org="org_a", operation="items.create", idempotency_key="x")
    assert retry.allowed
    assert not retry.replayed
    assert meter.usage("org_a").credits_used == Decimal("0.05")
    assert meter.check("k1", org="org_a", operation="items.create", idempotency_key="x").replayed


def test_refund_of_an_old_request_keeps_a_newer_idempotency_record(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """Refunding a request whose idempotency key was reused after 24 h leaves the newer one's."""
    meter = make_meter(_policy())
    old = meter.check("k1", org="org_a", operation="items.create", idempotency_key="x")
    at(clock, DAY + S)
    new = meter.check("k1", org="org_a", operation="items.create", idempotency_key="x")
    assert meter.refund(old)
    again = meter.check("k1", org="org_a", operation="items.create", idempotency_key="x")
    assert again.replayed
    assert again.charge_id == new.charge_id
    assert meter.usage("org_a").credits_used == Decimal("0.05")


# -- costs, allowances, months -------------------------------------------------------------


def test_cost_override_is_charged_exactly(make_meter: MakeMeter) -> None:
    """A cost override replaces the table price, to the micro-credit; zero costs nothing."""
    meter = make_meter(_policy(allowance="2"))
    big = meter.check("k1", org="org_a", operation="items.list", cost="1.5")
    assert big.charged == Decimal("1.5")
    tiny = meter.check("k1", org="org_a", operation="items.list", cost=Decimal("0.000001"))
    assert tiny.charged == Decimal("0.000001")
    assert tiny.balance == Decimal("0.499999")
    over = meter.check("k1", org="org_a", operation="items.list", cost=1)
    assert over.reason == "insufficient_credits"
    assert meter.check("k1", org="org_a", operation="items.list", cost=0).charged == 0
    assert meter.usage("org_a").operations["items.list"] == meterkit.OperationUsage(
        3, Decimal("1.500001")
    )


def test_zero_cost_is_admitted_with_no_credits_left(make_meter: MakeMeter) -> None:
    """A free request is admitted even when the balance is exactly zero."""
    meter = make_meter(_policy(allowance="0.01"))
    assert meter.check("k1", org="org_a", operation="items.list").balance == 0
    assert meter.check("k1", org="org_a", operation="items.list", cost="0").allowed


def test_allowance_per_org_and_top_up_for_this_month_only(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """An org's own allowance lasts across months; a top-up only until the month ends."""
    meter = make_meter(_policy())
    meter.set_allowance("org_a", "0.02")
    for _ in range(2):
        assert meter.check("k1", org="org_a", operation="items.list")
    assert meter.check("k1", org="org_a", operation="items.list").reason == "insufficient_credits"
    assert meter.check("k2", org="org_b", operation="items.list").balance == Decimal("99.99")
    meter.top_up("org_a", "0.01")
    assert meter.usage("org_a").allowance == Decimal("0.03")
    assert meter.check("k1", org="org_a", operation="items.list").balance == 0
    at(clock, FEB)
    usage = meter.usage("org_a")
    assert (usage.allowance, usage.credits_used, usage.credits_left) == (
        Decimal("0.02"),
        0,
        Decimal("0.02"),
    )
    assert meter.check("k1", org="org_a", operation="items.list").balance == Decimal("0.01")
    assert meter.usage("org_a").allowance == Decimal("0.02")
    meter.set_allowance("org_a", None)
    assert meter.usage("org_a").allowance == 100


def test_month_rollover_resets_credits_without_rollover(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """On the first of the month credits start again at the allowance; nothing carries over."""
    meter = make_meter(_policy(allowance="0.03"))
    at(clock, FEB - 1)
    assert meter.check("k1", org="org_a", operation="items.list").balance == Decimal("0.02")
    at(clock, FEB)
    d = meter.check("k1", org="org_a", operation="items.list")
    assert d.balance == Decimal("0.02")
    assert d.resets_at == datetime(2026, 3, 1, tzinfo=UTC)
    for _ in range(2):
        assert meter.check("k1", org="org_a", operation="items.list")
    assert meter.check("k1", org="org_a", operation="items.list").reason == "insufficient_credits"
    usage = meter.usage("org_a")
    assert usage.period_start == datetime(2026, 2, 1, tzinfo=UTC)
    assert (usage.requests, usage.credits_used) == (3, Decimal("0.03"))


# -- retry_after ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window", "gcra", "sliding_log"])
def test_retry_after_is_never_early_and_tight(
    make_meter: MakeMeter, clock: FakeClock, algorithm: str
) -> None:
    """Waiting exactly retry_after is admitted; waiting one microsecond less is not."""
    meter = make_meter(_policy(Tier("t", "key", "3 per 10 seconds", algorithm)))  # type: ignore[arg-type]
    now = 2_500_000
    at(clock, now)
    for _ in range(3):
        assert meter.check("k1", org="org_a", operation="items.list")
    denied = meter.check("k1", org="org_a", operation="items.list")
    assert denied.reason == "rate_limited"
    wait = round(denied.retry_after * US)
    assert wait > 0
    at(clock, now + wait - 1)
    early = meter.check("k1", org="org_a", operation="items.list")
    assert early.reason == "rate_limited"
    assert early.retry_after == 1 / US
    at(clock, now + wait)
    assert meter.check("k1", org="org_a", operation="items.list").allowed


def test_retry_after_of_credits_is_the_start_of_next_month(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """Out of credits, retry_after points exactly at the next month's first microsecond."""
    meter = make_meter(_policy(allowance="0.01"))
    at(clock, 17 * DAY + 123_457)
    assert meter.check("k1", org="org_a", operation="items.list")
    denied = meter.check("k1", org="org_a", operation="items.list")
    wait = round(denied.retry_after * US)
    assert 17 * DAY + 123_457 + wait == FEB
    at(clock, FEB - 1)
    assert meter.check("k1", org="org_a", operation="items.list").reason == "insufficient_credits"
    at(clock, FEB)
    assert meter.check("k1", org="org_a", operation="items.list").allowed


# -- the memory backend and the meter shells ------------------------------------------------


def test_memory_clock_going_back_does_not_reopen_a_window(clock: FakeClock) -> None:
    """The memory backend holds time at the latest instant seen when a clock steps back."""
    meter = Meter(_policy(Tier("t", "key", "1/minute")), MemoryBackend(clock=clock))
    at(clock, MIN - 1)
    assert meter.check("k1", org="org_a", operation="items.list")
    at(clock, MIN)
    assert meter.check("k1", org="org_a", operation="items.list")
    at(clock, MIN - 10 * S)
    assert meter.check("k1", org="org_a", operation="items.list").reason == "rate_limited"


def test_memory_tiers_of_one_name_but_other_scopes_are_apart(clock: FakeClock) -> None:
    """Two policies on one backend share a tier's counters only if it counts the same thing."""
    backend = MemoryBackend(clock=clock)
    per_key = Meter(_policy(Tier("t", "key", "1/minute")), backend)
    per_org = Meter(_policy(Tier("t", "org", "1/minute")), backend)
    same = Meter(_policy(Tier("t", "key", "1/minute")), backend)
    assert per_key.check("acme", org="org_x", operation="items.list")
    assert per_org.check("key_1", org="acme", operation="items.list")
    assert same.check("acme", org="org_x", operation="items.list").reason == "rate_limited"


def test_key_scoped_tiers_count_a_key_within_its_organization(make_meter: MakeMeter) -> None:
    """One key id used in two organizations has two sets of key-scoped counters (as on Redis)."""
    meter = make_meter(_policy(Tier("t", "key", "1/minute")))
    assert meter.check("acme", org="org_x", operation="items.list")
    assert meter.check("acme", org="org_y", operation="items.list")
    assert meter.check("acme", org="org_x", operation="items.list").reason == "rate_limited"


class _Unreachable(MemoryBackend):
    """A memory backend whose store has gone away: every apply raises BackendUnavailable."""

    def apply(self, plan: meterkit.Plan) -> Any:
        raise BackendUnavailable("the store is down")


def test_fail_open_admits_degraded_decisions_when_the_backend_is_down() -> None:
    """With fail_open, an unavailable backend admits flagged, uncharged, counted decisions."""
    policy = _policy(Tier("t", "key", "1/minute"))
    with pytest.raises(BackendUnavailable):
        Meter(policy, _Unreachable()).check("k1", org="org_a", operation="items.list")
    meter = Meter(policy, _Unreachable(), fail_open=True)
    decisions = [meter.check("k1", org="org_a", operation="items.list") for _ in range(3)]
    assert all(d.allowed and d.degraded for d in decisions)
    assert decisions[0].charged == 0
    assert decisions[0].tiers[0].remaining == 1
    assert meter.degraded == 3
    assert meter.refund(decisions[0]) is False


def test_meter_refuses_an_asynchronous_backend() -> None:
    """A synchronous Meter over a backend with a coroutine apply points to AsyncMeter."""

    class _AsyncStore:
        """A store whose apply is a coroutine, as an asyncio backend's is."""

        async def apply(self, plan: meterkit.Plan) -> Any:
            raise AssertionError("never called")

    with pytest.raises(InvalidRequestError, match="AsyncMeter"):
        Meter(_policy(), _AsyncStore())  # type: ignore[arg-type]


async def test_async_meter_over_memory_behaves_like_meter(clock: FakeClock) -> None:
    """AsyncMeter gives the same decisions, refunds, usage and allowances as Meter."""
    async with AsyncMeter(_policy(Tier("t", "key", "2/minute")), MemoryBackend(clock=clock)) as m:
        first = await m.check("k1", org="org_a", operation="items.create", idempotency_key="i")
        assert first.allowed
        assert (
            await m.check("k1", org="org_a", operation="items.create", idempotency_key="i")
        ).replayed
        assert await m.check("k1", org="org_a", operation="items.list")
        assert (await m.check("k1", org="org_a", operation="items.list")).reason == "rate_limited"
        assert await m.refund(first) is True
        assert await m.refund(first) is False
        await m.set_allowance("org_a", "1")
        await m.top_up("org_a", "0.5")
        usage = await m.usage("org_a")
        assert (usage.allowance, usage.credits_used) == (Decimal("1.5"), Decimal("0.01"))
        with pytest.raises(InvalidRequestError):
            await m.top_up("org_a", "1", mode="prod")  # type: ignore[arg-type]
