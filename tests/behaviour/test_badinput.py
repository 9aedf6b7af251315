"""Bad input: every mistake raises a typed meterkit error and changes nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterkit import (
    AuthenticationError,
    Category,
    ConfigurationError,
    CostTable,
    CreditPlan,
    InvalidAmountError,
    InvalidIdentifierError,
    InvalidRequestError,
    MeterkitError,
    Operation,
    Policy,
    Tier,
    UnknownOperationError,
)

ORG, KEY, OTHER = "org_a", "key_a", "key_b"


@dataclass(frozen=True)
class ApiKey:
    """The shape of an authenticated key, as Meter.check accepts it."""

    id: str
    org: str
    mode: str = "live"


def _policy() -> Policy:
    costs = CostTable(
        (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
        (Operation("items.list", "read", "0.01"), Operation("items.create", "write", "0.05")),
    )
    tiers = [
        Tier("key-min", "key", "3/minute", "fixed_window"),
        Tier("org-min", "org", "5/minute", "sliding_log"),
    ]
    return Policy(tiers, costs, CreditPlan("1"))


@pytest.fixture
def meter(make_meter: Callable[[Policy], Any]) -> Any:
    """A meter with some state: two live checks (one idempotent) and one test-mode check."""
    m = make_meter(_policy())
    assert m.check(KEY, org=ORG, operation="items.list").allowed
    assert m.check(KEY, org=ORG, operation="items.create", idempotency_key="idem-1").allowed
    assert m.check(KEY, org=ORG, operation="items.list", mode="test").allowed
    return m


def _snapshot(m: Any) -> list[dict[str, Any]]:
    return [
        m.usage(ORG).to_dict(),
        m.usage(ORG, mode="test").to_dict(),
        m.usage(ORG, key=KEY).to_dict(),
        m.usage("org_b").to_dict(),
    ]


def _assert_untouched(m: Any, before: list[dict[str, Any]]) -> None:
    """Usage is as it was, and the tiers and idempotency record behave as if nothing happened."""
    assert _snapshot(m) == before
    first = m.check(KEY, org=ORG, operation="items.create", idempotency_key="idem-1")
    assert first.replayed
    assert first.charged == Decimal("0.05")
    third = m.check(KEY, org=ORG, operation="items.list")
    assert third.allowed
    assert third.tiers[0].remaining == 0
    assert third.tiers[1].remaining == 2
    assert third.balance == Decimal("0.93")
    assert m.check(KEY, org=ORG, operation="items.list").reason == "rate_limited"
    test_mode = m.check(KEY, org=ORG, operation="items.list", mode="test")
    assert test_mode.tiers[0].remaining == 1
    assert test_mode.balance == Decimal("0.98")


BAD_IDS: list[object] = [
    "",
    "k" * 257,
    "key\n",
    "key\x00",
    "\x1ftest\x1fkey_a",
    "key\x7f",
    "tab\there",
    "nbsp\xa0",
    None,
    5,
    b"key_a",
]

Call = Callable[[Any], object]

BAD_CALLS: list[tuple[str, Call, type[MeterkitError]]] = [
    (
        "unknown operation",
        lambda m: m.check(KEY, org=ORG, operation="items.nope"),
        UnknownOperationError,
    ),
    ("empty operation", lambda m: m.check(KEY, org=ORG, operation=""), UnknownOperationError),
    (
        "operation not a str",
        lambda m: m.check(KEY, org=ORG, operation=["items.list"]),
        UnknownOperationError,
    ),
    ("operation None", lambda m: m.check(KEY, org=ORG, operation=None), UnknownOperationError),
    ("no org", lambda m: m.check(KEY, operation="items.list"), InvalidIdentifierError),
    (
        "mode",
        lambda m: m.check(KEY, org=ORG, operation="items.list", mode="prod"),
        InvalidRequestError,
    ),
    (
        "idempotency other operation",
        lambda m: m.check(KEY, org=ORG, operation="items.list", idempotency_key="idem-1"),
        InvalidRequestError,
    ),
    (
        "idempotency other key",
        lambda m: m.check(OTHER, org=ORG, operation="items.create", idempotency_key="idem-1"),
        InvalidRequestError,
    ),
    (
        "idempotency other cost",
        lambda m: m.check(
            KEY, org=ORG, operation="items.create", idempotency_key="idem-1", cost="0.06"
        ),
        InvalidRequestError,
    ),
    (
        "api key of another org",
        lambda m: m.check(ApiKey(KEY, "org_b"), org=ORG, operation="items.list"),
        AuthenticationError,
    ),
    (
        "api key with a bad mode",
        lambda m: m.check(ApiKey(KEY, ORG, "prod"), operation="items.list"),
        InvalidRequestError,
    ),
    (
        "api key with an empty id",
        lambda m: m.check(ApiKey("", ORG), operation="items.list"),
        InvalidIdentifierError,
    ),
    ("usage of a bad org", lambda m: m.usage(""), InvalidIdentifierError),
    ("usage of a bad key", lambda m: m.usage(ORG, key="k\n"), InvalidIdentifierError),
    ("usage in a bad mode", lambda m: m.usage(ORG, mode="prod"), InvalidRequestError),
    ("allowance of a bad org", lambda m: m.set_allowance("", "5"), InvalidIdentifierError),
    (
        "allowance in a bad mode",
        lambda m: m.set_allowance(ORG, "5", mode="prod"),
        InvalidRequestError,
    ),
    ("top-up of a bad org", lambda m: m.top_up("o\x00", "5"), InvalidIdentifierError),
    ("top-up in a bad mode", lambda m: m.top_up(ORG, "5", mode="Live"), InvalidRequestError),
]
for _i, _bad in enumerate(BAD_IDS):
    BAD_CALLS += [
        (
            f"key {_i}",
            lambda m, b=_bad: m.check(b, org=ORG, operation="items.list"),
            InvalidIdentifierError,
        ),
        (
            f"org {_i}",
            lambda m, b=_bad: m.check(KEY, org=b, operation="items.list"),
            InvalidIdentifierError,
        ),
    ]
    if _bad is not None:  # None means "no idempotency key"
        BAD_CALLS.append(
            (
                f"idempotency key {_i}",
                lambda m, b=_bad: m.check(KEY, org=ORG, operation="items.list", idempotency_key=b),
                InvalidIdentifierError,
            )
        )

BAD_AMOUNTS: list[object] = [
    math.nan,
    math.inf,
    -0.01,
    "-1",
    "0.0000001",
    0.1234567,
    True,
    False,
    "abc",
    Decimal("Infinity"),
    Decimal("NaN"),
    [],
    "1e999999",
    "1.0000000000000000000000000001",
]
for _i, _bad in enumerate(BAD_AMOUNTS):
    BAD_CALLS += [
        (
            f"cost {_i}",
            lambda m, b=_bad: m.check(KEY, org=ORG, operation="items.list", cost=b),
            InvalidAmountError,
        ),
        (f"allowance {_i}", lambda m, b=_bad: m.set_allowance(ORG, b), InvalidAmountError),
        (f"top-up {_i}", lambda m, b=_bad: m.top_up(ORG, b), InvalidAmountError),
    ]


@pytest.mark.parametrize(
    ("call", "error"), [(c, e) for _, c, e in BAD_CALLS], ids=[n for n, _, _ in BAD_CALLS]
)
def test_bad_call_raises_typed_error_and_changes_nothing(
    meter: Any, call: Call, error: type[MeterkitError]
) -> None:
    """A bad argument raises its typed meterkit error; counters, credits and records stay."""
    before = _snapshot(meter)
    with pytest.raises(error) as info:
        call(meter)
    assert isinstance(info.value, MeterkitError)
    _assert_untouched(meter, before)


def test_refund_of_a_denied_decision_changes_nothing(meter: Any) -> None:
    """Refunding a denied decision returns False and leaves every balance as it was."""
    denied = meter.check(KEY, org=ORG, operation="items.list", cost="5")
    assert denied.reason == "insufficient_credits"
    before = _snapshot(meter)
    assert meter.refund(denied) is False
    _assert_untouched(meter, before)


@pytest.mark.parametrize("value", ["0.1", 0.1, Decimal("0.1"), "0.100000"])
def test_float_cost_with_a_short_repr_is_exact(
    make_meter: Callable[[Policy], Any], value: object
) -> None:
    """A cost of 0.1 (float or text) is charged as exactly 0.1 credits."""
    m = make_meter(_policy())
    decision = m.check(KEY, org=ORG, operation="items.list", cost=value)
    assert decision.charged == Decimal("0.1")
    assert decision.balance == Decimal("0.9")
    assert m.usage(ORG).credits_used == Decimal("0.1")


def test_id_of_exactly_256_printable_characters_is_accepted(
    make_meter: Callable[[Policy], Any],
) -> None:
    """Ids up to 256 printable characters (spaces and non-ASCII included) are accepted."""
    m = make_meter(_policy())
    long_id = "k" * 256
    decision = m.check(long_id, org="o" * 256, operation="items.list", idempotency_key="i" * 256)
    assert decision.allowed
    assert m.check("clé à molette", org="организация", operation="items.list").allowed
    assert m.usage("o" * 256, key=long_id).requests == 1


# -- policies -----------------------------------------------------------------------

BASE_TOML = """
name = "bad-input"

[credits]
allowance = "100"

[[tiers]]
name = "key-hour"
scope = "key"
rate = "1000/hour"

[[tiers]]
name = "org-hour"
scope = "org"
rate = "10000/hour"

[[tiers]]
name = "key-burst"
scope = "key"
rate = "100/minute"
algorithm = "sliding_log"

[categories.read]
min = "0.01"
max = "0.01"

[categories.write]
min = "0.03"
max = "0.15"

[operations."items.list"]
category = "read"
price = "0.01"

[operations."items.create"]
category = "write"
price = "0.05"

[routes]
"GET /orgs/{organization_id}/items" = "items.list"
"""


def _edit(old: str, new: str) -> str:
    assert old in BASE_TOML
    return BASE_TOML.replace(old, new, 1)


def test_base_toml_is_valid() -> None:
    """The policy the TOML cases below break is itself valid."""
    assert [t.name for t in Policy.from_toml(BASE_TOML).tiers] == [
        "key-hour",
        "org-hour",
        "key-burst",
    ]


BAD_TOML: list[tuple[str, str, str, str]] = [
    # (case, text, location, words in the message)
    ("malformed rate", _edit('"100/minute"', '"often"'), "tiers[2].rate", "malformed rate 'often'"),
    ("zero rate", _edit('"100/minute"', '"0/minute"'), "tiers[2].rate", "admits nothing"),
    ("unknown unit", _edit('"100/minute"', '"100/fortnight"'), "tiers[2].rate", "malformed rate"),
    (
        "two rates in one",
        _edit('"100/minute"', '"100/minute;5/second"'),
        "tiers[2].rate",
        "one rate",
    ),
    ("zero-length window", _edit('"100/minute"', '"100 per 0 seconds"'), "tiers[2].rate", "window"),
    ("rate not a string", _edit('"100/minute"', "100"), "tiers[2].rate", "Expected `str`"),
    ("unknown algorithm", _edit('"sliding_log"', '"leaky"'), "tiers[2].algorithm", "leaky"),
    ("unknown scope", _edit('scope = "org"', 'scope = "team"'), "tiers[1].scope", "team"),
    (
        "burst without gcra",
        _edit('algorithm = "sliding_log"', 'algorithm = "sliding_log"\nburst = 5'),
        "tiers[2].burst",
        "gcra",
    ),
    (
        "zero burst",
        _edit('algorithm = "sliding_log"', 'algorithm = "gcra"\nburst = 0'),
        "tiers[2].burst",
        "positive",
    ),
    (
        "bad tier name",
        _edit('name = "org-hour"', 'name = "org hour"'),
        "tiers[1].name",
        "tier name",
    ),
    (
        "duplicate tier names",
        _edit('name = "org-hour"', 'name = "key-hour"'),
        "tiers[1].name",
        "two tiers are named 'key-hour'",
    ),
    (
        "unknown tier field",
        _edit('name = "org-hour"', 'name = "org-hour"\ncolour = "red"'),
        "tiers[1]",
        "unknown field `colour`",
    ),
    ("unknown top-level field", "colour = 'red'\n" + BASE_TOML, "", "unknown field `colour`"),
    (
        "unknown credits field",
        _edit('allowance = "100"', 'allowance = "100"\nrollover = true'),
        "credits",
        "unknown field `rollover`",
    ),
    (
        "unknown tier operation",
        _edit('name = "org-hour"', 'name = "org-hour"\noperations = ["items.nope"]'),
        "tiers[1].operations",
        "items.nope",
    ),
    (
        "price above its category",
        _edit('price = "0.05"', 'price = "0.5"'),
        "operations.items.create.price",
        "outside its category 'write'",
    ),
    (
        "price below its category",
        _edit('price = "0.05"', 'price = "0.02"'),
        "operations.items.create.price",
        "outside",
    ),
    (
        "over-precise price",
        _edit('price = "0.05"', 'price = "0.0500001"'),
        "operations.items.create.price",
        "6 decimal places",
    ),
    (
        "negative price",
        _edit('price = "0.05"', 'price = "-0.05"'),
        "operations.items.create.price",
        "negative",
    ),
    (
        "price not a number",
        _edit('price = "0.05"', 'price = "cheap"'),
        "operations.items.create.price",
        "not a number",
    ),
    (
        "unknown category",
        _edit('category = "write"', 'category = "bulk"'),
        "operations.items.create.category",
        "unknown category 'bulk'",
    ),
    (
        "category min above max",
        _edit('min = "0.03"', 'min = "0.2"'),
        "categories.write.max",
        "above max",
    ),
    (
        "allowance not finite",
        _edit('allowance = "100"', 'allowance = "nan"'),
        "credits.allowance",
        "allowance must be finite",
    ),
    (
        "period not a month",
        _edit('allowance = "100"', 'allowance = "100"\nperiod = "year"'),
        "credits.period",
        "year",
    ),
    (
        "route to an unknown operation",
        _edit(
            '"GET /orgs/{organization_id}/items" = "items.list"',
            '"GET /orgs/{organization_id}/items" = "x"',
        ),
        "routes.'GET /orgs/{organization_id}/items'",
        "unknown operation 'x'",
    ),
    ("missing credits", _edit('[credits]\nallowance = "100"\n', ""), "", "`credits`"),
    ("malformed TOML", BASE_TOML + "\n[[[", "", "malformed TOML"),
    ("not TOML at all", "this is = = not toml", "", "malformed TOML"),
]


@pytest.mark.parametrize(
    ("text", "location", "words"), [c[1:] for c in BAD_TOML], ids=[c[0] for c in BAD_TOML]
)
def test_bad_toml_names_the_place(text: str, location: str, words: str) -> None:
    """A policy file's mistake raises ConfigurationError whose text starts at its place."""
    with pytest.raises(ConfigurationError) as info:
        Policy.from_toml(text)
    err = info.value
    assert err.location == location
    assert words in str(err)
    if location:
        assert str(err).startswith(f"{location}: ")


def test_toml_rate_error_reads_as_in_the_docs() -> None:
    """The message of a malformed rate in the third tier is 'tiers[2].rate: malformed rate …'."""
    with pytest.raises(ConfigurationError, match=r"^tiers\[2\]\.rate: malformed rate 'often'"):
        Policy.from_toml(_edit('"100/minute"', '"often"'))


def test_missing_or_wrong_policy_sources_are_configuration_errors(tmp_path: Path) -> None:
    """A policy path that does not exist, or a source of the wrong type, is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="cannot read policy file"):
        Policy.from_toml(str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigurationError, match="cannot read policy file"):
        Policy.from_toml(tmp_path / "absent.toml")
    with pytest.raises(ConfigurationError, match="not int"):
        Policy.from_toml(42)  # type: ignore[arg-type]


def _costs() -> CostTable:
    return CostTable(
        (Category("read", "0.01", "0.01"),), (Operation("items.list", "read", "0.01"),)
    )


BAD_OBJECTS: list[tuple[str, Callable[[], object], str]] = [
    ("rate 0", lambda: Tier("t", "key", "0/hour"), "rate"),
    ("malformed rate", lambda: Tier("t", "key", "1000 an hour"), "rate"),
    ("empty rate", lambda: Tier("t", "key", ""), "rate"),
    ("rate not a string", lambda: Tier("t", "key", 1000), "rate"),  # type: ignore[arg-type]
    ("two rates", lambda: Tier("t", "key", "1/second, 5/minute"), "rate"),
    ("zero window", lambda: Tier("t", "key", "5 per 0 minutes"), "rate"),
    ("empty name", lambda: Tier("", "key", "1/hour"), "name"),
    ("long name", lambda: Tier("t" * 65, "key", "1/hour"), "name"),
    ("scope", lambda: Tier("t", "user", "1/hour"), "scope"),  # type: ignore[arg-type]
    ("algorithm", lambda: Tier("t", "key", "1/hour", "token"), "algorithm"),  # type: ignore[arg-type]
    ("bool burst", lambda: Tier("t", "key", "1/hour", "gcra", burst=True), "burst"),
    ("negative burst", lambda: Tier("t", "key", "1/hour", "gcra", burst=-1), "burst"),
    ("shadow not a bool", lambda: Tier("t", "key", "1/hour", shadow=1), "shadow"),  # type: ignore[arg-type]
    (
        "operations a string",
        lambda: Tier("t", "key", "1/hour", operations="items.list"),  # type: ignore[arg-type]
        "operations",
    ),
    (
        "operations not a list",
        lambda: Tier("t", "key", "1/hour", operations=5),  # type: ignore[arg-type]
        "operations",
    ),
    ("huge sliding window", lambda: Tier("t", "key", "100000000/day", "sliding_window"), "rate"),
    ("huge sliding log", lambda: Tier("t", "key", "100001/day", "sliding_log"), "rate"),
    ("huge gcra", lambda: Tier("t", "key", "1/day", "gcra", burst=10**9), "burst"),
    ("category min above max", lambda: Category("c", "2", "1"), "max"),
    ("category bad min", lambda: Category("c", "x", "1"), "min"),
    ("price not exact", lambda: Operation("o", "read", 0.0100001), "price"),
    ("bool price", lambda: Operation("o", "read", True), "price"),
    ("allowance NaN", lambda: CreditPlan(math.nan), "allowance"),
    ("period", lambda: CreditPlan("1", period="week"), "period"),  # type: ignore[arg-type]
    (
        "price outside category",
        lambda: CostTable((Category("read", "0.01", "0.01"),), (Operation("o", "read", "0.02"),)),
        "operations[0].price",
    ),
    (
        "operation priced twice",
        lambda: CostTable(
            (Category("read", "0.01", "0.01"),),
            (Operation("o", "read", "0.01"), Operation("o", "read", "0.01")),
        ),
        "operations[1]",
    ),
    (
        "two categories of one name",
        lambda: CostTable((Category("read", "0.01", "0.01"), Category("read", "0.02", "0.02")), ()),
        "categories",
    ),
    (
        "duplicate tier names",
        lambda: Policy(
            [Tier("t", "key", "1/hour"), Tier("t", "org", "2/hour")], _costs(), CreditPlan("1")
        ),
        "tiers[1].name",
    ),
    (
        "a tier that is not a Tier",
        lambda: Policy([Tier("t", "key", "1/hour"), "1/hour"], _costs(), CreditPlan("1")),  # type: ignore[list-item]
        "tiers[1]",
    ),
    (
        "unknown operation in a tier",
        lambda: Policy(
            [Tier("t", "key", "1/hour", operations=("nope",))], _costs(), CreditPlan("1")
        ),
        "tiers[0].operations",
    ),
    (
        "shadow policy not a bool",
        lambda: Policy([], _costs(), CreditPlan("1"), shadow="yes"),
        "shadow",
    ),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("build", "location"), [c[1:] for c in BAD_OBJECTS], ids=[c[0] for c in BAD_OBJECTS]
)
def test_bad_policy_objects_raise_configuration_errors(
    build: Callable[[], object], location: str
) -> None:
    """Building a tier, category, operation, cost table or policy wrongly names the field."""
    with pytest.raises(ConfigurationError) as info:
        build()
    assert info.value.location == location


def test_unknown_operation_of_a_policy_is_typed() -> None:
    """Looking up an unpriced operation raises UnknownOperationError, also for non-strings."""
    policy = Policy.crane_ledger()
    for operation in ("invoices.burn", "", None, ["invoices.list"]):
        with pytest.raises(UnknownOperationError):
            policy.plan_for(operation)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.refund(None),
        lambda m: m.refund("ch_1"),
        lambda m: m.check_many(5),
        lambda m: m.check_many("items.list"),
        lambda m: m.check_many({"key": KEY, "operation": "items.list"}),
    ],
    ids=["refund-none", "refund-str", "batch-int", "batch-str", "batch-dict"],
)
def test_wrong_argument_types_are_typed_errors_and_change_nothing(
    meter: Any, call: Callable[[Any], object]
) -> None:
    """refund() of something that is not a Decision and check_many() of something that
    is not a list of requests raise InvalidRequestError (not AttributeError or
    TypeError), and nothing is consumed."""
    before = meter.usage(ORG)
    with pytest.raises(InvalidRequestError):
        call(meter)
    assert meter.usage(ORG) == before
