"""Reconciliation: prove that the ledger's sums equal the counters', or name every
difference; and exports of the ledger for a billing system (CSV, CloudEvents).

The counters hold the current month only (an account ends with its month), so a
reconciliation is of the month the backend's clock is in. For each organization
(and mode), one atomic step reads its counters and its events still in the stream
(on Redis, ``ledger_snapshot.lua``; in memory, under the backend's lock). The
ledger's side is then the store's events of that month up to that instant (by
stream position) plus the undrained ones, each counted once. So a reconciliation
is exact while traffic flows and drains run: every admitted charge is in the
counters and in exactly one of the two places.

Compared, per organization, key and operation: requests (admitted charges) and
credits (charged less refunded), to the micro-credit; per organization: top-ups.
"""

from __future__ import annotations

import csv
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

from meterkit.core.credits import from_micro
from meterkit.core.plan import month_bounds
from meterkit.errors import ConfigurationError, StateError
from meterkit.ledger.events import Event, account_of, entry_event
from meterkit.ledger.store._sql import add_event

if TYPE_CHECKING:
    from meterkit.ledger.store import LedgerStore

__all__ = [
    "Difference",
    "OrgSnapshot",
    "Reconciliation",
    "cloudevent",
    "compare",
    "reconcile",
    "write_cloudevents",
    "write_csv",
]

_US = 1_000_000
_HEAD = struct.Struct("<4q")
_PAIR = struct.Struct("<2q")


@dataclass(frozen=True)
class Difference:
    """One place where the counters and the ledger disagree.

    ``what`` is ``"requests"``, ``"credits"`` (µ-credits charged less refunded) or,
    for the organization as a whole (``key`` and ``operation`` empty), ``"topups"``.
    """

    org: str
    mode: str
    key: str
    operation: str
    what: str
    counters: int
    ledger: int

    def __str__(self) -> str:
        where = f"{self.org} ({self.mode})"
        if self.key or self.operation:
            where += f" key {self.key} operation {self.operation}"
        if self.what == "requests":
            return f"{where}: requests: counters {self.counters}, ledger {self.ledger}"
        return (
            f"{where}: {self.what}: counters {from_micro(self.counters)}, "
            f"ledger {from_micro(self.ledger)} credits"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "mode": self.mode,
            "key": self.key,
            "operation": self.operation,
            "what": self.what,
            "counters": self.counters,
            "ledger": self.ledger,
        }


@dataclass
class Reconciliation:
    """The result of :func:`reconcile`: what was compared, and every difference."""

    period_start: datetime
    period_end: datetime
    orgs: int = 0
    pairs: int = 0
    #: undrained events counted from the stream (or memory log)
    undrained: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the counters and the ledger agree everywhere."""
        return not self.differences

    def to_dict(self) -> dict[str, Any]:
        return {
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "ok": self.ok,
            "orgs": self.orgs,
            "pairs": self.pairs,
            "undrained": self.undrained,
            "differences": [d.to_dict() for d in self.differences],
        }


@dataclass
class OrgSnapshot:
    """One organization's counters and undrained events at one instant."""

    org: str
    mode: str
    start: int
    end: int
    #: (key, operation) -> [requests, µ-credits charged less refunded]
    pairs: dict[tuple[str, str], list[int]]
    topup: int
    undrained: list[Event]
    #: events of ``upto[0]`` past position ``upto[1]`` came after the snapshot
    upto: tuple[str, tuple[int, int]] | None


def compare(store: LedgerStore, snapshots: Iterable[OrgSnapshot], result: Reconciliation) -> None:
    """Compare each snapshot with the store's sums (and its undrained events)."""
    for snap in snapshots:
        ledger, topup, ids = store.sums(snap.org, snap.mode, snap.start, snap.end, snap.upto)
        for event in snap.undrained:
            if event.id in ids or not snap.start <= event.time < snap.end:
                continue
            ids.add(event.id)
            result.undrained += 1
            add_event(ledger, event.kind, event.key, event.operation, event.micro)
            if event.kind == "topup":
                topup += event.micro
        result.orgs += 1
        for pair in sorted(set(snap.pairs) | set(ledger)):
            result.pairs += 1
            requests, micro = snap.pairs.get(pair, (0, 0))
            n, charged, _, refunded = ledger.get(pair, (0, 0, 0, 0))
            key, operation = pair
            if requests != n:
                result.differences.append(
                    Difference(snap.org, snap.mode, key, operation, "requests", requests, n)
                )
            if micro != charged - refunded:
                result.differences.append(
                    Difference(
                        snap.org, snap.mode, key, operation, "credits", micro, charged - refunded
                    )
                )
        if snap.topup != topup:
            result.differences.append(
                Difference(snap.org, snap.mode, "", "", "topups", snap.topup, topup)
            )


def _account_pairs(
    flat: list[Any], start: int, where: str
) -> tuple[dict[tuple[str, str], list[int]], int]:
    """(key, operation) -> [requests, µ-credits], and the top-ups, of an account hash."""
    fields = dict(zip(flat[0::2], flat[1::2], strict=False))
    head = fields.get(b"h")
    if head is None:
        return {}, 0
    try:
        period, _, topup, _ = _HEAD.unpack_from(head)
        if period != start:
            return {}, 0  # last month's account: this month has none yet
        pairs: dict[tuple[str, str], list[int]] = {}
        for name, value in fields.items():
            if name[:2] == b"q|":
                operation, key = name[2:].decode("utf-8").split("|", 1)
                pairs[(key, operation)] = list(_PAIR.unpack(value))
    except (ValueError, struct.error, UnicodeDecodeError):
        raise StateError(f"redis holds an account meterkit did not write: {where}") from None
    return pairs, topup


def _redis_snapshots(
    backend: Any, store: LedgerStore, orgs: Iterable[tuple[str, str]] | None
) -> tuple[Iterator[OrgSnapshot], int, int]:
    """Snapshots of every organization with an account (or those of ``orgs``) on a
    Redis backend; and the month (start, end µs) they are of."""
    from meterkit.backends.redis.scripts import script
    from meterkit.ledger.streams import stream_for

    io_ = backend._io
    cluster = hasattr(io_, "client")
    client = io_.client if cluster else _plain(io_.pool)
    codec = backend._codec
    prefix = codec.prefix
    snap_script = client.register_script(script("ledger_snapshot").text)
    now = codec._now()
    pairs_of: list[tuple[str, str]]
    pairs_of = sorted(set(_redis_orgs(client, prefix))) if orgs is None else list(orgs)
    if now == "":
        reply = client.time()
        if isinstance(reply, dict):  # (a cluster answers per node)
            reply = next(iter(reply.values()))
        seconds, micros = reply
        start, end = month_bounds(int(seconds) * _US + int(micros))
    else:
        start, end = month_bounds(int(now))
    known = set(pairs_of)
    for org, mode in store.orgs(start, end):
        if (org, mode) not in known:
            pairs_of.append((org, mode))
            known.add((org, mode))

    def snapshots() -> Iterator[OrgSnapshot]:
        for org, mode in pairs_of:
            base = codec.base(org, mode)
            stream = stream_for(prefix, base, cluster)
            account = base + "cr"
            s, e, flat, last, mine = snap_script(keys=[account, stream], args=[now])
            pairs, topup = _account_pairs(flat, s, account)
            ms, _, seq = last.decode().partition("-")
            undrained = [entry_event(stream, entry_id, fields) for entry_id, fields in mine]
            yield OrgSnapshot(
                org, mode, s, e, pairs, topup, undrained, (stream, (int(ms), int(seq or 0)))
            )

    return snapshots(), start, end


def _plain(pool: Any) -> Any:
    import redis

    return redis.Redis(connection_pool=pool)


def _redis_orgs(client: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """(organization, mode) of every account under ``prefix`` (every primary of a cluster)."""
    for name in client.scan_iter(match=f"{prefix}:{{*:cr", count=1000, _type="hash"):
        text = name.decode("utf-8") if isinstance(name, bytes) else name
        close = text.find("}")
        if text[close:] not in ("}:cr", "}:test:cr"):
            continue  # (a key id that happens to end in :cr)
        yield account_of(text)


def reconcile(
    backend: Any,
    store: LedgerStore | str,
    *,
    orgs: Iterable[tuple[str, str]] | None = None,
) -> Reconciliation:
    """Compare the counters of ``backend`` (a :class:`~meterkit.RedisBackend`, or a
    :class:`~meterkit.MemoryBackend` with a ledger) for its current month with the
    ledger in ``store``, per organization, key and operation; ``orgs`` limits it to
    those (organization, mode) pairs."""
    from meterkit.ledger.store import store_from_url

    owned = isinstance(store, str)
    ledger = store_from_url(store) if isinstance(store, str) else store
    try:
        if type(backend).__name__ == "AsyncRedisBackend":
            raise ConfigurationError(
                "reconcile reads Redis with a blocking client: pass a RedisBackend (same "
                "URL and prefix)",
                "backend",
            )
        if hasattr(backend, "ledger_snapshot"):
            snaps, start, end = backend.ledger_snapshot(orgs, ledger)
        elif hasattr(backend, "_codec"):
            snaps, start, end = _redis_snapshots(backend, ledger, orgs)
        else:
            raise ConfigurationError(
                f"cannot reconcile a {type(backend).__name__}: pass a RedisBackend or a "
                "MemoryBackend with a ledger",
                "backend",
            )
        result = Reconciliation(
            datetime.fromtimestamp(start // _US, tz=timezone.utc),
            datetime.fromtimestamp(end // _US, tz=timezone.utc),
        )
        compare(ledger, snaps, result)
        return result
    finally:
        if owned:
            ledger.close()


# -- exports ------------------------------------------------------------------------------

_CSV_COLUMNS = (
    "id",
    "time",
    "org",
    "mode",
    "kind",
    "key",
    "operation",
    "credits",
    "micro_credits",
    "charge",
    "detail",
)


def _iso(us: int) -> str:
    moment = datetime.fromtimestamp(us // _US, tz=timezone.utc).replace(microsecond=us % _US)
    return moment.isoformat().replace("+00:00", "Z")


def write_csv(events: Iterable[Event], out: TextIO) -> int:
    """Write ``events`` as CSV (a header, then one row each); return how many."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    n = 0
    for e in events:
        credits = (
            ""
            if e.kind == "plan" or (e.kind == "allowance" and e.micro < 0)
            else from_micro(e.micro)
        )
        writer.writerow(
            (
                e.id,
                _iso(e.time),
                e.org,
                e.mode,
                e.kind,
                e.key,
                e.operation,
                credits,
                e.micro,
                e.charge,
                e.detail,
            )
        )
        n += 1
    return n


def cloudevent(event: Event) -> dict[str, Any]:
    """One event shaped as a CloudEvent (specification 1.0, JSON format): ``type``
    ``dev.meterkit.<kind>``, ``subject`` the organization, ``data`` the rest."""
    data: dict[str, Any] = {"org": event.org, "mode": event.mode}
    if event.key:
        data["key"] = event.key
    if event.operation:
        data["operation"] = event.operation
    if event.kind != "plan" and not (event.kind == "allowance" and event.micro < 0):
        data["credits"] = str(from_micro(event.micro))
        data["micro_credits"] = event.micro
    if event.charge:
        data["charge"] = event.charge
    if event.detail:
        data["detail"] = event.detail
    return {
        "specversion": "1.0",
        "id": event.id,
        "source": "meterkit/" + (event.source or "ledger"),
        "type": f"dev.meterkit.{event.kind}",
        "subject": event.org,
        "time": _iso(event.time),
        "datacontenttype": "application/json",
        "data": data,
    }


def write_cloudevents(events: Iterable[Event], out: TextIO) -> int:
    """Write ``events`` as JSON lines, one CloudEvent each; return how many."""
    n = 0
    for e in events:
        out.write(json.dumps(cloudevent(e), separators=(",", ":"), ensure_ascii=False) + "\n")
        n += 1
    return n
