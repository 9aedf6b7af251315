"""Ledger events: reading stream entries and memory log tuples, and what is refused."""

from __future__ import annotations

import pytest

from meterkit.errors import StateError
from meterkit.ledger.events import Event, account_of, entry_event, memory_event
from meterkit.ledger.streams import SLOTS, slot_of, slot_stream, stream_for

T = 1_767_225_600_000_000


def test_an_account_key_names_its_organization_and_mode() -> None:
    """The organization comes from the hash tag (percent-decoded), the mode from what follows."""
    assert account_of("mk:{org_1}:cr") == ("org_1", "live")
    assert account_of("mk:{org_1}:test:cr") == ("org_1", "test")
    assert account_of("pre:{a%7Bb%7D%25c}:cr") == ("a{b}%c", "live")


def test_a_charge_entry_is_read_into_its_event() -> None:
    """A charge's entry gives its charge id as id and charge, and its key, operation, amount."""
    body = f"abc1\nmk:{{org_1}}:test:cr\n{T}\n10000\nq|invoices.list|key_1"
    event = entry_event("mk:ledger", b"1700000000000-3", [b"c", body.encode()])
    assert event == Event(
        "abc1", T, "org_1", "test", "charge", "key_1", "invoices.list", 10_000, "abc1", "",
        "mk:ledger", (1_700_000_000_000, 3),
    )  # fmt: skip


def test_a_refund_entry_refers_to_its_charge() -> None:
    """A refund's id is 'r' and the charge's id; its charge is the charge refunded."""
    body = f"abc1\nmk:{{org_1}}:cr\n{T}\n10000\nq|reports.get|key|with|bars"
    event = entry_event("s", "5-0", {"r": body})
    assert (event.id, event.kind, event.charge) == ("rabc1", "refund", "abc1")
    assert (event.key, event.operation) == ("key|with|bars", "reports.get")


def test_top_up_allowance_and_plan_entries() -> None:
    """Top-ups carry their amount; an allowance its value (-1: the policy's); a plan its detail."""
    top = entry_event("s", "1-0", [b"t", f"id1\nmk:{{o}}:cr\n{T}\n5000000".encode()])
    assert (top.id, top.kind, top.micro, top.key, top.charge) == ("id1", "topup", 5_000_000, "", "")
    off = entry_event("s", "2-0", [b"a", f"id2\nmk:{{o}}:cr\n{T}\n".encode()])
    assert (off.kind, off.micro) == ("allowance", -1)
    on = entry_event("s", "3-0", [b"a", f"id3\nmk:{{o}}:cr\n{T}\n42".encode()])
    assert on.micro == 42
    deal = f"id4\nmk:{{o}}:cr\n{T}\ndeal\n\nkey-hour fixed_window 3600000000 5 0\norg-hour x"
    plan = entry_event("s", "4-0", [b"p", deal.encode()])
    assert plan.detail == "deal key-hour fixed_window 3600000000 5 0\norg-hour x"
    keyed = entry_event("s", "5-0", [b"p", f"id5\nmk:{{o}}:cr\n{T}\nkey\nk1\npro".encode()])
    assert (keyed.key, keyed.detail) == ("k1", "key pro")
    cleared = entry_event("s", "6-0", [b"p", f"id6\nmk:{{o}}:cr\n{T}\nplan\n\n".encode()])
    assert cleared.detail == "plan"


@pytest.mark.parametrize(
    "fields",
    [
        [b"x", b"id\nmk:{o}:cr\n1\n1"],  # unknown kind
        [b"c", b"id"],  # no body
        [b"c", b"id\nmk:{o}:cr\n1\n1\nq|a|b", b"e", b"more"],  # two fields
        [b"c", b"id\nmk:o:cr\n1\n1\nq|a|b"],  # no tag
        [b"c", b"id\nmk:{o}:cr\nnot-a-time\n1\nq|a|b"],
        [b"c", b"id\nmk:{o}:cr\n1\n1\nx|a|b"],  # not an account field
        [b"p", b"id\nmk:{o}:cr\n1\nother\n\nx"],
        [b"c", b"\xff\nmk:{o}:cr\n1\n1\nq|a|b"],
    ],
)
def test_an_entry_meterkit_did_not_write_is_a_state_error(fields: list[bytes]) -> None:
    """Anything else in a ledger stream raises StateError naming the stream."""
    with pytest.raises(StateError, match="mk:ledger"):
        entry_event("mk:ledger", b"1-0", fields)


def test_memory_events_qualify_the_process_counter_with_the_log_id() -> None:
    """A memory charge's id is '<log id>:<n>', and a refund of it 'r<log id>:<n>'."""
    charge = memory_event("ab12", (7, T, "org_1", "live", "key_1", "invoices.list", 10_000))
    assert (charge.id, charge.charge, charge.position, charge.source) == (
        "ab12:7", "ab12:7", (0, 7), "memory:ab12"
    )  # fmt: skip
    assert (charge.org, charge.mode, charge.key, charge.operation, charge.micro) == (
        "org_1", "live", "key_1", "invoices.list", 10_000
    )  # fmt: skip
    refund = memory_event(
        "ab12", (9, T + 1, "refund", "org_1", "live", "key_1", "invoices.list", 10_000, 7, "")
    )
    assert (refund.id, refund.charge, refund.position) == ("rab12:7", "ab12:7", (0, 9))


def test_every_slot_has_a_stream_in_that_slot() -> None:
    """On Cluster the stream of an organization shares its slot (its script may touch it)."""
    from redis.crc import key_slot

    for slot in range(0, SLOTS, 331):
        assert key_slot(slot_stream("mk", slot).encode()) == slot
    for org in ("org_1", "a{b", "x" * 200):
        base = f"mk:{{{org.replace('{', '%7B')}}}:"
        assert key_slot(stream_for("mk", base, True).encode()) == key_slot((base + "cr").encode())
        assert slot_of(base + "cr") == key_slot((base + "cr").encode())
    assert stream_for("mk", "mk:{org_1}:", False) == "mk:ledger"
