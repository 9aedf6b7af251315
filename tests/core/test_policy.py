"""Policies: the seed's rules, tiers compiled to integers, TOML loading and plans."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import limits
import pytest

from meterkit import Category, CostTable, CreditPlan, Operation, Policy, Tier
from meterkit.core.policy import ALGORITHMS

SEED_TOML = Path(__file__).resolve().parents[2] / "meterkit" / "policies" / "crane_ledger.toml"

# The seed's credit table: category -> (min, max) credits per call.
SEED_CATEGORIES = {
    "read": ("0.01", "0.01"),
    "write": ("0.03", "0.15"),
    "complex": ("0.08", "0.25"),
    "report": ("0.10", "0.15"),
}


def test_crane_ledger_tiers_are_the_seeds_rate_limits() -> None:
    """The seed policy limits 1000/hour per key, 10000/hour per org and 100/minute per key."""
    policy = Policy.crane_ledger()
    tiers = {t.name: t for t in policy.tiers}
    assert list(tiers) == ["key-hour", "org-hour", "key-burst"]
    hour, org, burst = tiers["key-hour"], tiers["org-hour"], tiers["key-burst"]
    assert (hour.scope, hour.limit, hour.window, hour.algorithm) == (
        "key",
        1000,
        3600,
        "fixed_window",
    )
    assert (org.scope, org.limit, org.window, org.algorithm) == ("org", 10000, 3600, "fixed_window")
    assert (burst.scope, burst.limit, burst.window, burst.algorithm) == (
        "key",
        100,
        60,
        "sliding_log",
    )
    assert not any(t.shadow for t in policy.tiers)
    assert not policy.shadow
    assert policy.name == "crane-ledger"


def test_crane_ledger_prices_sit_in_the_seeds_categories() -> None:
    """Every seed operation is priced inside its category's range from the seed's table."""
    policy = Policy.crane_ledger()
    cats = {c.name: (c.min_micro, c.max_micro) for c in policy.costs.categories}
    assert cats == {
        name: (int(Decimal(lo) * 1_000_000), int(Decimal(hi) * 1_000_000))
        for name, (lo, hi) in SEED_CATEGORIES.items()
    }
    for op in policy.costs.operations:
        lo, hi = cats[op.category]
        assert lo <= op.price_micro <= hi, op.name
        assert op.permission
    assert policy.price("invoices.list") == Decimal("0.01")
    assert policy.price("invoices.pdf") == Decimal("0.25")
    assert policy.credits.allowance_micro == 10_000 * 1_000_000
    assert policy.credits.period == "month"


def test_crane_ledger_routes_name_priced_operations() -> None:
    """Every route of the seed policy maps a METHOD and path template to a priced operation."""
    policy = Policy.crane_ledger()
    assert policy.routes["GET /organizations/{organization_id}/invoices"] == "invoices.list"
    for route, op in policy.routes.items():
        method, path = route.split(" ", 1)
        assert method in {"GET", "POST", "PUT", "DELETE"}
        assert path.startswith("/organizations/{organization_id}")
        assert op in policy.operations


def test_crane_ledger_equals_its_toml_file_loaded_by_path() -> None:
    """Loading the packaged TOML by str path, Path or bytes gives the same policy."""
    expected = Policy.crane_ledger().to_dict()
    assert Policy.from_toml(str(SEED_TOML)).to_dict() == expected
    assert Policy.from_toml(SEED_TOML).to_dict() == expected
    assert Policy.from_toml(SEED_TOML.read_bytes()).to_dict() == expected
    assert Policy.from_toml(SEED_TOML.read_text("utf-8")).to_dict() == expected


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_tier_precomputes_integer_microseconds(algorithm: str) -> None:
    """A tier compiles its rate to a limit, a window in µs and a rounded-up emission interval."""
    tier = Tier("t", "key", "7 per 10 seconds", algorithm)  # type: ignore[arg-type]
    assert tier.limit == 7
    assert tier.window == 10
    assert tier.window_us == 10_000_000
    assert tier.interval_us == 1_428_572  # ceil(10 s / 7)
    assert tier.code == ALGORITHMS[algorithm]
    assert tier.capacity == 7
    assert isinstance(tier.rate, limits.RateLimitItem)


def test_gcra_burst_sets_the_capacity() -> None:
    """A gcra tier's burst is its capacity; without one it defaults to the rate's amount."""
    assert Tier("g", "org", "60/minute", "gcra", burst=5).capacity == 5
    default = Tier("g", "org", "60/minute", "gcra")
    assert default.burst == 60
    assert default.capacity == 60
    assert default.describe() == "g: 60 per 60s per org (gcra, burst 60)"
    shadow = Tier("s", "key", "100/minute", "sliding_log", shadow=True)
    assert shadow.describe() == "s: 100 per 60s per key (sliding_log, shadow)"


def test_tier_accepts_limits_items_and_both_rate_spellings() -> None:
    """Rates are the limits grammar ('1000/hour', '100 per minute') or a RateLimitItem."""
    a = Tier("a", "key", limits.RateLimitItemPerMinute(100))
    b = Tier("b", "key", "100 per minute")
    c = Tier("c", "key", "100/minute")
    assert (a.limit, a.window_us) == (b.limit, b.window_us) == (c.limit, c.window_us)
    assert (a.limit, a.window) == (100, 60)


def _costs() -> CostTable:
    return CostTable(
        (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
        (
            Operation("items.list", "read", "0.01"),
            Operation("items.create", "write", 0.05, permission="items:write"),
        ),
    )


def test_plan_for_applies_only_matching_tiers_in_policy_order() -> None:
    """An operation's plan holds its price and the tiers that apply to it, in policy order."""
    tiers = [
        Tier("all", "key", "10/minute"),
        Tier("writes", "org", "2/minute", "gcra", operations=("items.create",)),
        Tier("burst", "key", "5/second", "sliding_log"),
    ]
    policy = Policy(tiers, _costs(), CreditPlan("3"))
    read = policy.plan_for("items.list")
    write = policy.plan_for("items.create")
    assert [t.name for t in read.tiers] == ["all", "burst"]
    assert read.tier_index == (0, 2)
    assert [t.name for t in write.tiers] == ["all", "writes", "burst"]
    assert write.price == 50_000
    assert read.price == 10_000
    assert write.category == "write"
    assert write.policy_header == (
        '"all";q=10;w=60, "writes";q=2;w=60;meterkit-burst=2, "burst";q=5;w=1'
    )
    assert policy.operations["items.create"].permission == "items:write"
    assert policy.price("items.create") == Decimal("0.05")


def test_crane_ledger_policy_header_follows_the_ietf_draft() -> None:
    """The RateLimit-Policy text names each tier with its quota (q) and window (w)."""
    plan = Policy.crane_ledger().plan_for("invoices.list")
    assert plan.policy_header == (
        '"key-hour";q=1000;w=3600, "org-hour";q=10000;w=3600, "key-burst";q=100;w=60'
    )


def test_to_dict_describes_the_compiled_policy() -> None:
    """to_dict reports tiers, prices as exact strings, credits and routes."""
    tiers = [Tier("g", "org", "2/minute", "gcra", burst=3, shadow=True)]
    policy = Policy(
        tiers,
        _costs(),
        CreditPlan(0.5),
        shadow=True,
        name="small",
        routes={"GET /orgs/{organization_id}/items": "items.list"},
    )
    assert policy.to_dict() == {
        "name": "small",
        "shadow": True,
        "tiers": [
            {
                "name": "g",
                "scope": "org",
                "limit": 2,
                "window_seconds": 60,
                "algorithm": "gcra",
                "burst": 3,
                "shadow": True,
                "operations": None,
            }
        ],
        "operations": {
            "items.list": {"category": "read", "price": "0.01", "permission": None},
            "items.create": {"category": "write", "price": "0.05", "permission": "items:write"},
        },
        "credits": {"allowance": "0.5", "period": "month", "alerts": []},
        "routes": {"GET /orgs/{organization_id}/items": "items.list"},
        "plans": {},
    }
    assert "small" in repr(policy)


def test_toml_accepts_numbers_for_amounts_and_defaults() -> None:
    """TOML amounts may be strings, ints or floats; optional fields take their defaults."""
    policy = Policy.from_toml(
        """
        [credits]
        allowance = 25

        [[tiers]]
        name = "per-key"
        scope = "key"
        rate = "3 per 10 seconds"

        [categories.read]
        min = 0.01
        max = "0.02"

        [operations.ping]
        category = "read"
        price = 0.02
        """
    )
    assert policy.name == "custom"
    assert policy.credits.allowance_micro == 25_000_000
    assert policy.tiers[0].algorithm == "fixed_window"
    assert policy.tiers[0].window == 10
    assert policy.plan_for("ping").price == 20_000
    assert policy.routes == {}


def test_a_path_with_a_nul_and_deeply_nested_toml_are_configuration_errors() -> None:
    """Policy.from_toml turns a NUL in a path (ValueError from the OS layer) and TOML
    nested deeper than the parser can go (RecursionError) into ConfigurationError."""
    from meterkit import ConfigurationError

    with pytest.raises(ConfigurationError, match="NUL"):
        Policy.from_toml("x\x00.toml")
    with pytest.raises(ConfigurationError, match="nested too deeply"):
        Policy.from_toml("a = " + "[" * 100_000 + "]" * 100_000)


def test_a_name_with_a_line_break_is_refused_not_sent_in_a_header() -> None:
    """Tier names go into the RateLimit headers as they are: ``^…$`` with ``re.match``
    let a trailing newline through, which would split the response's headers."""
    from meterkit import ConfigurationError
    from meterkit.core.policy import CustomerPlan

    made = (
        lambda name: Tier(name, "key", "10/minute"),
        lambda name: Category(name, "0.01", "0.02"),
        lambda name: Operation(name, "reads", "0.01"),
        lambda name: CustomerPlan(name),
    )
    for make in made:
        make("fine")
        for bad in ("burst\n", "burst\r\n", "\nburst"):
            with pytest.raises(ConfigurationError):
                make(bad)


def test_a_period_or_day_with_a_line_break_is_refused() -> None:
    from meterkit.errors import InvalidRequestError
    from meterkit.ledger.history import period_bounds

    assert period_bounds("2026-01")[0].isoformat() == "2026-01-01"
    for bad in ("2026-01\n", "2026-01-15\n"):
        with pytest.raises(InvalidRequestError):
            period_bounds(bad)
