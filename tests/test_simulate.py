"""The simulator: traces with known answers, every input format, bad rows, timelines."""

from __future__ import annotations

import io
import json
from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import meterkit
from meterkit.simulate import (
    TraceError,
    bucket_width,
    plot_timeline,
    read_trace,
    rebin,
    simulate,
)
from tests.conftest import FakeClock

HOUR = 1_767_225_600  # 2026-01-01T00:00:00Z, the top of an hour and of a month


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def write_csv(path: Path, rows: list[tuple[float, str, str, str]], iso: bool = False) -> Path:
    lines = ["timestamp,key,org,operation"]
    lines += [f"{_iso(t) if iso else repr(t)},{k},{o},{p}" for t, k, o, p in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[tuple[float, str, str, str]], iso: bool = False) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for t, k, o, p in rows:
            stamp: float | str = _iso(t) if iso else t
            out.write(json.dumps({"timestamp": stamp, "key": k, "org": o, "operation": p}) + "\n")
    return path


def one_key_burst(count: int = 150, seconds: float = 60.0) -> list[tuple[float, str, str, str]]:
    step = seconds / count
    return [(HOUR + i * step, "key_a", "org_a", "invoices.list") for i in range(count)]


SMALL_POLICY = """
name = "small"
[credits]
allowance = "1"
[[tiers]]
name = "key-minute"
scope = "key"
rate = "5/minute"
algorithm = "gcra"
[[tiers]]
name = "watch"
scope = "org"
rate = "3/minute"
algorithm = "fixed_window"
shadow = true
[categories.any]
min = "0.01"
max = "0.5"
[operations.cheap]
category = "any"
price = "0.01"
[operations.dear]
category = "any"
price = "0.4"
"""


def test_one_key_burst_is_cut_at_one_hundred_by_the_burst_tier() -> None:
    """150 requests in one minute from one key: 100 admitted, 50 denied by key-burst."""
    report = simulate(one_key_burst())
    assert (report.requests, report.admitted, report.denied) == (150, 100, 50)
    assert report.denied_by_tier == {"key-hour": 0, "org-hour": 0, "key-burst": 50}
    assert report.denied_by_reason == {"rate_limited": 50, "insufficient_credits": 0}
    assert report.tiers["key-burst"].admitted == 100
    assert [(k.key, k.admitted, k.denied) for k in report.most_limited()] == [("key_a", 100, 50)]


@pytest.mark.parametrize(
    ("writer", "iso", "name"),
    [
        (write_csv, False, "t.csv"),
        (write_csv, True, "t.csv"),
        (write_jsonl, False, "t.jsonl"),
        (write_jsonl, True, "t.jsonl"),
        (write_csv, False, "trace"),  # no suffix: sniffed from the first line
        (write_jsonl, True, "trace"),
    ],
)
def test_every_trace_format_replays_to_the_same_answer(
    tmp_path: Path, writer: object, iso: bool, name: str
) -> None:
    """CSV and JSON Lines, UNIX seconds and ISO 8601, with or without a suffix, agree."""
    path = writer(tmp_path / name, one_key_burst(), iso=iso)  # type: ignore[operator]
    report = simulate(path)
    assert (report.admitted, report.denied, report.denied_by_tier["key-burst"]) == (100, 50, 50)
    assert report.start == HOUR


def test_key_hour_admits_exactly_one_thousand_in_a_clock_hour() -> None:
    """1001 requests spread over one clock hour: key-hour admits 1000 and denies one."""
    rows = [(HOUR + i * 3.59, "key_a", "org_a", "invoices.get") for i in range(1001)]
    report = simulate(rows)
    assert (report.admitted, report.denied) == (1000, 1)
    assert report.denied_by_tier == {"key-hour": 1, "org-hour": 0, "key-burst": 0}


def test_org_hour_caps_an_organization_across_its_keys() -> None:
    """11 keys of one org, 910 requests each in an hour: the org tier admits 10,000."""
    rows = [
        (HOUR + i * 3.9 + k * 0.01, f"key_{k}", "org_big", "invoices.get")
        for i in range(910)
        for k in range(11)
    ]
    report = simulate(rows)
    assert (report.admitted, report.denied) == (10_000, 10)
    assert report.denied_by_tier == {"key-hour": 0, "org-hour": 10, "key-burst": 0}
    assert report.orgs["org_big"].charged == Decimal("100")  # 10,000 × 0.01


def test_credits_run_out_and_are_reported_per_organization() -> None:
    """An allowance of 1 credit: two 0.4 operations pass, the third is refused for credits."""
    policy = meterkit.Policy.from_toml(SMALL_POLICY)
    rows = [(HOUR + i * 20.0, "key_a", "org_a", "dear") for i in range(3)]
    rows.append((HOUR + 61.0, "key_b", "org_b", "cheap"))
    report = simulate(rows, policy)
    assert report.denied_by_reason == {"rate_limited": 0, "insufficient_credits": 1}
    a, b = report.orgs["org_a"], report.orgs["org_b"]
    assert (a.requests, a.admitted, a.denied) == (3, 2, 1)
    assert (a.charged, a.credits_left) == (Decimal("0.8"), Decimal("0.2"))
    assert (b.charged, b.credits_left) == (Decimal("0.01"), Decimal("0.99"))


def test_shadow_tiers_are_counted_but_never_deny() -> None:
    """A shadow org tier of 3/minute reports would-deny counts and denies nothing."""
    policy = meterkit.Policy.from_toml(SMALL_POLICY)
    rows = [(HOUR + i * 12.0, f"key_{i}", "org_a", "cheap") for i in range(5)]
    report = simulate(rows, policy)
    assert (report.admitted, report.denied) == (5, 0)
    assert report.tiers["watch"].would_deny == 2
    assert report.tiers["watch"].denied == 0


def test_out_of_order_rows_are_replayed_at_the_latest_time() -> None:
    """A row earlier than one before it is counted and replayed at the latest time seen."""
    rows = [
        (HOUR + 10.0, "key_a", "org_a", "invoices.list"),
        (HOUR + 5.0, "key_a", "org_a", "invoices.list"),
        (HOUR + 11.0, "key_a", "org_a", "invoices.list"),
    ]
    report = simulate(rows)
    assert report.out_of_order == 1
    assert (report.start, report.end) == (HOUR + 10.0, HOUR + 11.0)


def test_a_bad_row_raises_an_error_naming_its_line(tmp_path: Path) -> None:
    """A malformed timestamp on the fourth line of a CSV raises TraceError(line=4)."""
    path = tmp_path / "t.csv"
    path.write_text(
        "timestamp,key,org,operation\n"
        f"{HOUR},key_a,org_a,invoices.list\n"
        f"{HOUR + 1},key_a,org_a,invoices.list\n"
        "yesterday,key_a,org_a,invoices.list\n"
        f"{HOUR + 3},key_a,org_a,invoices.list\n",
        encoding="utf-8",
    )
    with pytest.raises(TraceError, match="line 4: timestamp 'yesterday'") as info:
        simulate(path)
    assert info.value.line == 4


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{HOUR},key_a,org_a,invoices.fly", "unknown operation 'invoices.fly'"),
        ("{HOUR},,org_a,invoices.list", "key must not be empty"),
        ("{HOUR},key_a,org_a", "expected 4 fields, got 3"),
        ("nan,key_a,org_a,invoices.list", "not a time"),
        ("-5,key_a,org_a,invoices.list", "not a time"),
    ],
)
def test_bad_rows_are_skipped_and_counted_with_skip_bad(
    tmp_path: Path, row: str, message: str
) -> None:
    """Each kind of bad row raises naming line 3, or is skipped and counted with skip_bad."""
    good = f"{HOUR},key_a,org_a,invoices.list"
    path = tmp_path / "t.csv"
    path.write_text(
        "\n".join(["timestamp,key,org,operation", good, row.format(HOUR=HOUR), good]) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(TraceError, match=f"line 3: .*{message}"):
        simulate(path)
    report = simulate(path, skip_bad=True)
    assert (report.admitted, report.skipped) == (2, 1)


def test_a_bad_json_line_names_its_line(tmp_path: Path) -> None:
    """A JSON line missing a field raises TraceError naming that line."""
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps({"timestamp": HOUR, "key": "k", "org": "o", "operation": "invoices.list"})
        + "\n\n"
        + json.dumps({"timestamp": HOUR, "key": "k", "org": "o"})
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(TraceError, match="line 3: Object missing required field `operation`"):
        simulate(path)


def test_a_csv_without_the_header_is_refused(tmp_path: Path) -> None:
    """A CSV whose first line is data, not the header, names line 1 and the missing columns."""
    path = tmp_path / "t.csv"
    path.write_text(f"{HOUR},key_a,org_a,invoices.list\n", encoding="utf-8")
    with pytest.raises(TraceError, match="line 1: the CSV header must name the columns"):
        simulate(path)


def test_csv_columns_may_come_in_any_order_with_extra_columns() -> None:
    """Columns are found by the header's names; unknown columns are ignored."""
    text = "org,operation,status,key,timestamp\norg_a,invoices.list,200,key_a,2026-01-01T00:00Z\n"
    rows = list(read_trace(io.StringIO(text)))
    assert rows == [(2, float(HOUR), "key_a", "org_a", "invoices.list")]


def test_a_byte_order_mark_before_the_header_is_ignored(tmp_path: Path) -> None:
    """A CSV exported with a UTF-8 byte order mark (as spreadsheets do) reads normally."""
    path = tmp_path / "t.csv"
    path.write_bytes(
        "\ufeffTimestamp,Key,Org,Operation\r\n1767225600,key_a,org_a,invoices.list\r\n".encode()
    )
    assert list(read_trace(path)) == [(2, float(HOUR), "key_a", "org_a", "invoices.list")]


def test_a_trace_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """Binary junk raises TraceError rather than a UnicodeDecodeError."""
    path = tmp_path / "t.csv"
    path.write_bytes(b"timestamp,key,org,operation\n\xff\xfe\x00junk\n")
    with pytest.raises(TraceError, match="not UTF-8"):
        simulate(path)


def test_a_missing_trace_file_is_a_trace_error(tmp_path: Path) -> None:
    """A path that does not exist raises TraceError with the operating system's reason."""
    with pytest.raises(TraceError, match="No such file"):
        simulate(tmp_path / "absent.csv")


def test_naive_iso_times_are_utc() -> None:
    """An ISO 8601 time without an offset means UTC; one with an offset is converted."""
    text = (
        "timestamp,key,org,operation\n"
        "2026-01-01T00:00:00,k,o,invoices.list\n"
        "2026-01-01T01:00:00+01:00,k,o,invoices.list\n"
    )
    assert [row[1] for row in read_trace(io.StringIO(text))] == [HOUR, HOUR]


def test_the_timeline_adds_up_to_the_totals() -> None:
    """Per-second counts of the timeline sum to the report's admitted and denied counts."""
    report = simulate(one_key_burst(300, 120.0), timeline=True)
    tl = report.timeline
    assert tl is not None
    assert sum(tl.all_admitted.values()) == report.admitted
    assert sum(tl.all_denied.values()) == report.denied
    for name, counts in report.tiers.items():
        assert sum(tl.admitted[name].values()) == counts.admitted
        assert sum(tl.denied[name].values()) == counts.denied


def test_rebin_and_bucket_width() -> None:
    """Buckets are round widths; rebinning sums seconds into them and drops outsiders."""
    assert bucket_width(60) == 1
    assert bucket_width(3600) == 30
    assert bucket_width(86_400 * 400) == 2 * 86_400
    assert rebin({100: 1, 101: 2, 110: 4, 99: 8, 200: 16}, 100, 10, 2) == [3, 4]


def test_plot_timeline_writes_a_png(tmp_path: Path) -> None:
    """With matplotlib installed, the timeline plot is a PNG file."""
    pytest.importorskip("matplotlib")
    report = simulate(one_key_burst(), timeline=True)
    out = tmp_path / "plot.png"
    plot_timeline(report, out)
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_timeline_needs_a_timeline() -> None:
    """A report made without timeline=True cannot be plotted."""
    with pytest.raises(meterkit.InvalidRequestError, match="no timeline"):
        plot_timeline(simulate(one_key_burst()), "unused.png")


def test_progress_is_reported_on_long_traces() -> None:
    """The progress callback is called with increasing line numbers on a long trace."""
    seen: list[int] = []
    rows = [(HOUR + i * 0.5, f"key_{i % 50}", "org_a", "invoices.list") for i in range(20_000)]
    simulate(rows, progress=seen.append)
    assert seen
    assert seen == sorted(seen)
    assert seen[-1] <= 20_000


_ops = st.sampled_from(["invoices.list", "invoices.pdf", "reports.generate"])
_row = st.tuples(
    st.floats(min_value=0, max_value=240, allow_nan=False),
    st.sampled_from(["k1", "k2", "k3"]),
    st.sampled_from(["o1", "o2"]),
    _ops,
)


@given(st.lists(_row, max_size=300), st.booleans())
def test_simulate_agrees_with_a_meter_replaying_the_same_trace(
    rows: list[tuple[float, str, str, str]], small: bool
) -> None:
    """Counts per tier, reason, org and key equal those of Meter.check on a fake clock."""
    rows.sort()
    rows = [(HOUR + t, k, o, op) for t, k, o, op in rows]
    policy = meterkit.Policy.crane_ledger()
    if small:
        policy = meterkit.Policy.from_toml(SMALL_POLICY)
        rows = [(t, k, o, "dear" if op == "invoices.pdf" else "cheap") for t, k, o, op in rows]
    report = simulate(rows, policy)

    clock = FakeClock(HOUR)
    meter = meterkit.Meter(policy, meterkit.MemoryBackend(clock=clock))
    tiers: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    shadow: Counter[str] = Counter()
    per_key: Counter[tuple[str, bool]] = Counter()
    charged: Counter[str] = Counter()
    for t, k, o, op in rows:
        clock.now = t
        d = meter.check(k, org=o, operation=op)
        per_key[(k, d.allowed)] += 1
        shadow.update(s.name for s in d.tiers if s.denied and s.shadow)
        if d.allowed:
            charged[o] += int(d.charged * 1_000_000)
        else:
            assert d.reason is not None
            reasons[d.reason] += 1
            tiers.update(s.name for s in d.tiers if s.denied and not s.shadow)
    assert report.admitted == sum(n for (_, ok), n in per_key.items() if ok)
    assert report.denied == sum(reasons.values())
    assert {r: n for r, n in report.denied_by_reason.items() if n} == dict(reasons)
    assert {t: n for t, n in report.denied_by_tier.items() if n} == dict(tiers)
    assert {t: c.would_deny for t, c in report.tiers.items() if c.would_deny} == dict(shadow)
    for key, counts in report.keys.items():
        assert (counts.admitted, counts.denied) == (per_key[(key, True)], per_key[(key, False)])
    for org, credits in report.orgs.items():
        assert credits.charged * 1_000_000 == charged[org]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2026-01-01T00:00:00.25Z", HOUR + 0.25),
        ("2026-01-01T00:00:00,5+00:00", HOUR + 0.5),
        ("2026-01-01 00:00:00.123456789", HOUR + 0.123456),
        ("2026-01-01", HOUR),
        ("2026-01-01T02:00:00.1+02:00", HOUR + 0.1),
    ],
)
def test_iso_times_read_the_same_on_every_python(text: str, seconds: float) -> None:
    """Fractions of any length, with a dot or a comma, read alike on Python 3.10 and later."""
    line = json.dumps({"timestamp": text, "key": "k", "org": "o", "operation": "x"})
    rows = list(read_trace(io.StringIO(line + "\n")))
    assert rows[0][1] == pytest.approx(seconds, abs=1e-6)


# -- plans --------------------------------------------------------------------------------

PLANS_POLICY = """
name = "planned"
[credits]
allowance = "100"
[[tiers]]
name = "key-hour"
scope = "key"
rate = "5/hour"
[[tiers]]
name = "org-hour"
scope = "org"
rate = "8/hour"
[categories.read]
min = "0.01"
max = "0.01"
[operations."items.list"]
category = "read"
price = "0.01"
[plans.free.tiers]
"key-hour" = "2/hour"
[plans.pro.tiers]
"key-hour" = "50/hour"
"org-hour" = "off"
"""


def _twenty(plan_at: dict[int, str] | None = None) -> list[tuple[float, str, str, str, str | None]]:
    """Twenty requests of one key in a minute; ``plan_at`` names a plan on some rows."""
    plans = plan_at or {}
    return [(HOUR + i, "key_a", "org_a", "items.list", plans.get(i)) for i in range(20)]


def test_simulate_with_a_plan_replays_every_organization_on_it() -> None:
    """The same trace under free, the default plan and pro admits 2, 5 and 20, and the
    report counts the requests per plan in force."""
    policy = meterkit.Policy.from_toml(PLANS_POLICY)
    admitted = {}
    for plan in ("free", None, "pro"):
        report = simulate(_twenty(), policy, plan=plan)
        admitted[plan] = report.admitted
        name = plan or "default"
        assert report.plan == name
        assert {n: (c.admitted, c.denied) for n, c in report.plans.items()} == {
            name: (report.admitted, report.denied)
        }
    assert admitted == {"free": 2, None: 5, "pro": 20}
    pro = simulate(_twenty(), policy, plan="pro")
    assert (pro.tiers["key-hour"].admitted, pro.tiers["org-hour"].admitted) == (20, 0)
    assert pro.to_dict()["plans"] == {"pro": {"admitted": 20, "denied": 0}}


def test_a_plan_column_moves_the_organization_mid_window(tmp_path: Path) -> None:
    """A row naming pro moves its organization from then on, keeping the count of the
    window: 2 under free, then pro admits the rest (and a CSV column says so too)."""
    policy = meterkit.Policy.from_toml(PLANS_POLICY)
    report = simulate(_twenty({10: "pro"}), policy, plan="free")
    assert (report.admitted, report.denied) == (12, 8)
    assert {n: (c.admitted, c.denied) for n, c in report.plans.items()} == {
        "free": (2, 8),
        "pro": (10, 0),
    }
    path = tmp_path / "planned.csv"
    lines = ["timestamp,key,org,operation,plan"]
    lines += [f"{t!r},{k},{o},{op},{p or ''}" for t, k, o, op, p in _twenty({10: "pro"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    again = simulate(path, policy, plan="free")
    assert (again.admitted, again.plans) == (report.admitted, report.plans)
    assert next(iter(read_trace(path))) == (2, float(HOUR), "key_a", "org_a", "items.list")


def test_a_plan_the_policy_lacks_is_refused() -> None:
    """--plan of an unknown plan raises UnknownPlanError; a row naming one is a bad row."""
    policy = meterkit.Policy.from_toml(PLANS_POLICY)
    with pytest.raises(meterkit.UnknownPlanError, match="gold"):
        simulate(_twenty(), policy, plan="gold")
    with pytest.raises(TraceError, match="line 4: unknown plan 'gold'"):
        simulate(_twenty({3: "gold"}), policy)
    assert simulate(_twenty({3: "gold"}), policy, skip_bad=True).skipped == 1
