"""The Redis codec on its own: no server. Commands are read as Redis would get them, and
replies are built byte for byte as the Lua scripts build them (see check.lua)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from meterkit import (
    Category,
    ConfigurationError,
    CostTable,
    CreditPlan,
    Operation,
    Policy,
    StateError,
    Tier,
)
from meterkit.backends.redis.codec import BATCH, Codec
from meterkit.backends.redis.scripts import as_eval, pack, script
from meterkit.core.plan import Plan
from tests.conftest import FakeClock

NOW = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in µs
MONTH_END = 1_769_904_000_000_000  # 2026-02-01


def _policy() -> Policy:
    return Policy(
        [
            Tier("key-hour", "key", "1000/hour"),
            Tier("org-burst", "org", "100/minute", "gcra", burst=10),
        ],
        CostTable((Category("read", "0.01", "0.01"),), (Operation("items.list", "read", "0.01"),)),
        CreditPlan("50"),
    )


def _plan(
    org: str = "org_1", key: str = "key_1", mode: str = "live", idem: str | None = None
) -> Plan:
    policy = _policy()
    return Plan(policy, policy.plan_for("items.list"), key, org, mode, 10_000, idem)  # type: ignore[arg-type]


def _codec(clock: Any = None, skew: float = 60.0) -> Codec:
    return Codec("mk", clock, skew)


def test_key_bases_carry_the_org_as_hash_tag_with_braces_and_percent_escaped() -> None:
    codec = _codec()
    assert codec.base("org_1", "live") == "mk:{org_1}:"
    assert codec.base("org_1", "test") == "mk:{org_1}:test:"
    # "o{x}" and "o%7Bx%7D" must not share keys, and a brace may not end the tag early
    assert codec.base("o{x}", "live") == "mk:{o%7Bx%7D}:"
    assert codec.base("o%7Bx%7D", "live") == "mk:{o%257Bx%257D}:"


@pytest.mark.parametrize("prefix", ["", "a b", "x{y}", "p" * 65, 5, "tab\t"])
def test_a_bad_prefix_is_a_configuration_error(prefix: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Codec(prefix, None, 60)
    assert info.value.location == "prefix"


@pytest.mark.parametrize("skew", [-1, 86_401, True, "60", float("nan")])
def test_a_bad_clock_skew_is_a_configuration_error(skew: Any) -> None:
    with pytest.raises(ConfigurationError):
        Codec("mk", None, skew)


def test_a_check_is_one_evalsha_of_its_operations_script_with_every_key_in_one_slot() -> None:
    cmd, charge = _codec().check(_plan())
    assert cmd[0] == "EVALSHA"
    numkeys = cmd[2]
    keys = cmd[3 : 3 + numkeys]
    assert keys == [
        "mk:{org_1}:fw:key-hour.1000.3600:key_1",
        "mk:{org_1}:gc:org-burst.100.60.10",
        "mk:{org_1}:cr",
        "mk:{org_1}:al",
        "mk:{org_1}:pl",
    ]
    args = cmd[3 + numkeys :]
    assert args[0] == ""  # no clock: the script reads the server's TIME
    assert args[1] == 10_000  # µ-credits
    assert args[2] == ""  # no idempotency key: the charge id is not stored
    assert args[3] == "q|items.list|key_1"
    assert len(args) == 6  # (and the month: no key plan, no peek)
    assert charge  # a fresh charge id, carried by the outcome if admitted
    assert len(cmd[1]) == 40  # (the SHA-1 of the operation's own check script)


def test_an_idempotent_check_adds_its_record_key_and_sends_the_charge_id() -> None:
    cmd, charge = _codec().check(_plan(idem="i-1"))
    keys = cmd[3 : 3 + cmd[2]]
    assert keys[-1] == "mk:{org_1}:id:i-1"
    assert charge in cmd


def test_a_client_clock_is_sent_in_microseconds() -> None:
    clock = FakeClock(NOW / 1e6 + 0.5)
    cmd, _ = _codec(clock).check(_plan())
    assert cmd[3 + cmd[2]] == NOW + 500_000


def test_a_peek_is_the_same_script_marked_dry() -> None:
    cmd, _ = _codec().check(_plan(), dry=True)
    assert cmd[-1] == "1"


def _reply(
    head: int, reason: int, now: int, retry: int, charged: int, balance: int, *tiers: int
) -> bytes:
    """check.lua's reply: admitted (1) or not, the reason, now, retry after, charged,
    balance, period end, then each tier's (remaining, reset, denied)."""
    return struct.pack("<7q", head, reason, now, retry, charged, balance, MONTH_END) + struct.pack(
        f"<{len(tiers)}q", *tiers
    )


def test_an_admitted_reply_becomes_an_outcome_with_the_charge_id() -> None:
    codec = _codec()
    reply = _reply(1, 0, NOW, 0, 10_000, 49_990_000, 999, 3_600_000_000, 0, 9, 600_000, 0)
    out = codec.outcome(_plan(), reply, "c-1")
    assert out.allowed
    assert out.now == NOW
    assert out.tiers == ((999, 3_600_000_000, 0), (9, 600_000, 0))
    assert (out.charged, out.balance, out.period_end, out.charge_id) == (
        10_000,
        49_990_000,
        MONTH_END,
        "c-1",
    )


def test_a_denied_reply_carries_no_charge_and_unspends_the_other_tiers() -> None:
    codec = _codec()
    # The key tier passed (remaining 5 after this request), the org tier denied.
    reply = _reply(0, 1, NOW, 2_000, 0, 50_000_000, 5, 3_600_000_000, 0, 0, 600_000, 1)
    out = codec.outcome(_plan(), reply, "c-1")
    assert not out.allowed
    assert out.reason == 1
    assert out.retry_after == 2_000
    assert out.charge_id == ""
    assert out.charged == 0
    # (a denied request consumed nothing: the passing tier gives its unit back)
    assert out.tiers[0][0] == 6
    assert out.tiers[1] == (0, 600_000, 1)


def test_an_idempotency_record_that_meterkit_did_not_write_is_a_state_error() -> None:
    with pytest.raises(StateError):
        _codec().outcome(_plan(idem="i"), [b"r", b"not a record"], "c")


def test_a_batch_groups_by_slot_and_makes_one_batch_call_per_run_of_up_to_batch() -> None:
    codec = _codec()
    plans = [_plan(org=f"org_{i % 2}", key=f"k{i}") for i in range(BATCH + 3)] + [
        _plan(org="org_9")
    ]

    slots: dict[str, int] = {}

    def slot(base: str) -> int:
        return slots.setdefault(base, len(slots))

    commands, sent = codec.check_many(plans, slot)
    cmds = list(commands)
    # Each command covers requests of one org, in order; the lone org_9 request is a
    # plain check.
    covered = sorted(i for indexes, _, _ in sent for i in indexes)
    assert covered == list(range(len(plans)))
    for cmd, (indexes, charges, batch) in zip(cmds, sent, strict=True):
        assert cmd[0] == "EVALSHA"
        assert len({plans[i].org for i in indexes}) == 1
        assert indexes == sorted(indexes)
        assert len(indexes) <= BATCH
        assert len(charges) == len(indexes)
        assert batch == (len(indexes) > 1)
    assert ([i for i, _, b in sent if not b]) == [[len(plans) - 1]]


def test_a_batch_reply_is_decoded_per_request_and_an_error_stays_with_its_request() -> None:
    codec = _codec()
    plans = [_plan(key="a"), _plan(key="b")]
    commands, sent = codec.check_many(plans)
    list(commands)
    ok = _reply(1, 0, NOW, 0, 10_000, 1, 1, 1, 0, 1, 1, 0)
    results = codec.outcomes(plans, sent, [[ok, b"not a reply"]])
    assert results[0].allowed  # type: ignore[union-attr]
    assert isinstance(results[1], StateError)


def test_a_refund_of_nothing_is_no_command() -> None:
    codec = _codec()
    denied = codec.outcome(_plan(), _reply(0, 1, NOW, 1, 0, 0, 0, 1, 1, 0, 1, 0), "c")
    assert codec.refund(_plan(), denied) is None
    admitted = codec.outcome(_plan(), _reply(1, 0, NOW, 0, 10_000, 0, 1, 1, 0, 1, 1, 0), "c-9")
    cmd = codec.refund(_plan(), admitted)
    assert cmd is not None
    assert "c-9" in cmd
    assert 10_000 in cmd


def test_usage_replies_decode_the_months_account() -> None:
    codec = _codec()
    start = NOW
    head = struct.pack("<4q", start, 30_000, 5_000_000, -1)
    pair = struct.pack("<2q", 3, 30_000)
    reply = [start, MONTH_END, None, [b"h", head, b"q|items.list|key_1", pair], None]
    assert codec.raw_usage(_policy(), reply) == (
        start,
        MONTH_END,
        50_000_000 + 5_000_000,
        30_000,
        3,
        {("key_1", "items.list"): [3, 30_000]},
        "default",
    )
    # An account of an earlier month counts as empty; an override replaces the allowance.
    old = [start, MONTH_END, b"7", [b"h", struct.pack("<4q", start - 1, 9, 9, -1)], None]
    assert codec.raw_usage(_policy(), old) == (start, MONTH_END, 7, 0, 0, {}, "default")
    with pytest.raises(StateError):
        codec.raw_usage(_policy(), [start, MONTH_END, None, [b"h", b"short"], None])


def test_a_script_call_refused_with_noscript_goes_again_with_its_text() -> None:
    check = script("usage")
    cmd = ["EVALSHA", check.sha, 2, "a", "b", ""]
    assert as_eval(cmd) == ["EVAL", check.text, 2, "a", "b", ""]


def test_commands_are_packed_in_the_redis_protocol() -> None:
    assert (
        pack(["GET", "k", 5, b"\x00"]) == b"*4\r\n$3\r\nGET\r\n$1\r\nk\r\n$1\r\n5\r\n$1\r\n\x00\r\n"
    )
