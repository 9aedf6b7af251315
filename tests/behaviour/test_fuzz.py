"""Fuzz of the public API (issue 17): any call with any arguments, on every backend.

Hypothesis draws a sequence of ``Meter`` calls (check, peek, check_many, refund,
usage, set_allowance, top_up, reset_limits) whose arguments come from a pool of good
values, bad values of every type, and API-key plaintexts. Whatever is drawn:

- nothing but a meterkit error is ever raised;
- a call that raised changed no state (usage of every organization, in both modes,
  is as before);
- no error's message or repr holds a plaintext key, wherever it was passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterkit import (
    Category,
    CostTable,
    CreditPlan,
    MeterkitError,
    Operation,
    Policy,
    Tier,
)
from meterkit.keys.memory import MemoryKeyStore

_store = MemoryKeyStore()
SECRETS = (
    _store.create(org="org_a")[0],
    _store.create(org="org_b", mode="test")[0],
)
ORGS = ("org_a", "org_b")


def _policy() -> Policy:
    return Policy(
        [
            Tier("key-min", "key", "3/minute", "fixed_window"),
            Tier("org-min", "org", "5/minute", "sliding_log"),
            Tier("key-gcra", "key", "2/second", "gcra", burst=2),
        ],
        CostTable(
            (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
            (Operation("items.list", "read", "0.01"), Operation("items.create", "write", "0.05")),
        ),
        CreditPlan("1"),
    )


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


ANYTHING: list[object] = [
    None,
    "",
    0,
    -1,
    2**64,
    1.5,
    math.nan,
    math.inf,
    True,
    b"key_a",
    [],
    {},
    ("key_a",),
    _Opaque(),
    Decimal("NaN"),
    "k" * 300,
    "a\nb",
    "x\x00y",
    "{braces}",
    "1e999999",
    "-0.01",
    "0.000001",
    "9007199254.740993",
    *SECRETS,
    f"see {SECRETS[0]} here",
]
ids = st.sampled_from(("key_a", "key_b", *ORGS)) | st.sampled_from(ANYTHING)
orgs = st.sampled_from(ORGS) | st.sampled_from(ANYTHING)
operations = st.sampled_from(("items.list", "items.create")) | st.sampled_from(ANYTHING)
amounts = st.sampled_from(("0", "0.01", "0.5", "3")) | st.sampled_from(ANYTHING)
modes = st.sampled_from(("live", "test")) | st.sampled_from(ANYTHING)
idems = st.none() | st.sampled_from(("i1", "i2")) | st.sampled_from(ANYTHING)
costs = st.none() | amounts

check_args = st.fixed_dictionaries(
    {"key": ids, "org": orgs, "operation": operations},
    optional={"idempotency_key": idems, "cost": costs, "mode": modes},
)
calls = st.one_of(
    st.tuples(st.just("check"), check_args),
    st.tuples(
        st.just("peek"),
        st.fixed_dictionaries(
            {"key": ids, "org": orgs, "operation": operations},
            optional={"cost": costs, "mode": modes},
        ),
    ),
    st.tuples(
        st.just("check_many"),
        # (no idempotency keys: a conflict of one request is raised after the others
        # were applied, by design, so "nothing changed" would not hold)
        st.lists(
            st.fixed_dictionaries(
                {"key": ids, "org": orgs, "operation": operations},
                optional={"cost": costs, "mode": modes},
            ),
            max_size=4,
        )
        | st.sampled_from(ANYTHING),
    ),
    st.tuples(st.just("refund"), st.integers(0, 20) | st.sampled_from(ANYTHING)),
    st.tuples(st.just("usage"), st.fixed_dictionaries({"org": orgs}, optional={"key": ids})),
    st.tuples(
        st.just("set_allowance"),
        st.fixed_dictionaries({"org": orgs, "credits": amounts}, optional={"mode": modes}),
    ),
    st.tuples(
        st.just("top_up"),
        st.fixed_dictionaries({"org": orgs, "credits": amounts}, optional={"mode": modes}),
    ),
    st.tuples(
        st.just("reset_limits"),
        st.fixed_dictionaries({"org": orgs}, optional={"key": ids, "mode": modes}),
    ),
)


def _state(meter: Any) -> list[Any]:
    return [meter.usage(org, mode=mode).to_dict() for org in ORGS for mode in ("live", "test")]


def _outcome(call: Callable[..., Any], *args: Any) -> tuple[Any, MeterkitError | None]:
    """The call's result, or the meterkit error it raised (any other propagates)."""
    try:
        return call(*args), None
    except MeterkitError as exc:
        return None, exc


def _leaks(error: MeterkitError, secrets: Iterable[str]) -> bool:
    """Whether the error's message, repr or details hold a secret (or its tail)."""
    text = f"{error} {error!r} {getattr(error, 'detail', '')} {getattr(error, 'message', '')}"
    return any(s in text or s[8:] in text for s in secrets)


def _call(meter: Any, decisions: list[Any], name: str, args: Any) -> Any:
    if name == "refund":
        target = decisions[args % len(decisions)] if isinstance(args, int) and decisions else args
        return meter.refund(target)
    if name == "check_many":
        return meter.check_many(args)
    return getattr(meter, name)(**args)


@settings(max_examples=120, deadline=None)
@given(trace=st.lists(calls, min_size=1, max_size=12))
def test_any_call_raises_only_typed_errors_changes_nothing_when_it_does_and_leaks_no_key(
    make_meter: Callable[[Policy], Any], trace: list[tuple[str, Any]]
) -> None:
    meter = make_meter(_policy())
    decisions: list[Any] = []
    for name, args in trace:
        before = _state(meter)
        result, error = _outcome(_call, meter, decisions, name, args)
        if error is not None:
            assert not _leaks(error, SECRETS), (name, str(error))
            assert _state(meter) == before, (name, args, error)
            continue
        if name == "check":
            decisions.append(result)
        elif name == "check_many":
            decisions += result


# -- the key stores ------------------------------------------------------------------------

grace = st.sampled_from((0, 60, 1.5)) | st.sampled_from(ANYTHING)
store_calls = st.one_of(
    st.tuples(
        st.just("create"),
        st.fixed_dictionaries(
            {"org": orgs},
            optional={
                "mode": modes,
                "permissions": st.lists(st.sampled_from(("items:read", *ANYTHING[:3])), max_size=2)
                | st.sampled_from(ANYTHING),
                "expires_at": st.sampled_from((None, 3600, 1_767_225_600.0))
                | st.sampled_from(ANYTHING),
                "name": st.sampled_from(("ci", None)) | st.sampled_from(ANYTHING),
            },
        ),
    ),
    st.tuples(st.just("get"), st.integers(0, 5) | st.sampled_from(ANYTHING)),
    st.tuples(st.just("revoke"), st.integers(0, 5) | st.sampled_from(ANYTHING)),
    st.tuples(st.just("rotate"), st.tuples(st.integers(0, 5) | st.sampled_from(ANYTHING), grace)),
    st.tuples(st.just("list"), orgs),
    st.tuples(
        st.just("authenticate"),
        st.tuples(
            st.integers(0, 5) | st.sampled_from(ANYTHING),
            orgs | st.none(),
            st.none() | st.sampled_from(("items:read", *ANYTHING[:4])),
        ),
    ),
)


def _keys(store: Any) -> list[Any]:
    return [store.list(org) for org in ORGS]


def _store_call(store: Any, made: list[tuple[str, Any]], name: str, args: Any) -> Any:
    def pick(value: Any, part: int) -> Any:
        # An int picks one of the keys made so far: its id (part 1) or plaintext (part 0)
        if isinstance(value, int) and not isinstance(value, bool) and made:
            return made[value % len(made)][part]
        return value

    if name == "create":
        return store.create(**args)
    if name in ("get", "revoke"):
        return getattr(store, name)(pick(args, 1))
    if name == "rotate":
        return store.rotate(pick(args[0], 1), grace=args[1])
    if name == "list":
        return store.list(args)
    header, org, permission = args
    presented = pick(header, 0)
    if isinstance(header, int) and made:
        presented = f"Bearer {presented}"
    return store.authenticate(presented, org=org, permission=permission)


@pytest.fixture(params=["memory", "redis", "async-redis"])
def key_store(request: pytest.FixtureRequest, clock: Any) -> Iterator[Any]:
    from tests.behaviour.test_keys import open_store, url_fixture

    fixture = url_fixture(request.param)
    url = request.getfixturevalue(fixture) if fixture else None
    opened = open_store(request.param, clock, url)
    try:
        yield opened.handle.store
    finally:
        opened.close()


@settings(max_examples=80, deadline=None)
@given(trace=st.lists(store_calls, min_size=1, max_size=10))
def test_any_key_store_call_raises_only_typed_errors_and_leaks_no_key(
    key_store: Any, trace: list[tuple[str, Any]]
) -> None:
    made: list[tuple[str, Any]] = []
    for name, args in trace:
        before = _keys(key_store)
        result, error = _outcome(_store_call, key_store, made, name, args)
        if error is not None:
            secrets = [p for p, _ in made] + list(SECRETS)
            assert not _leaks(error, secrets), (name, str(error))
            if name != "authenticate":  # (a refused key is still marked as presented)
                assert _keys(key_store) == before, (name, args, error)
            continue
        if name in ("create", "rotate"):
            plaintext, record = result
            made.append((str(plaintext), record.id))
