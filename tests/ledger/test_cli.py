"""``meterkit ledger``: drain, usage history, export; exit codes and errors."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from meterkit.cli.common import EXIT_OK, EXIT_USAGE
from meterkit.cli.parser import main
from meterkit.ledger import Event, store_from_url
from tests.conftest import delete_prefix, new_prefix
from tests.ledger.test_drain import add_charges

T = 1_767_225_600_000_000  # 2026-01-01
DAY = 86_400_000_000


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def filled(tmp_path: Path) -> str:
    """A SQLite ledger holding January 2026's events of org_1 (and others')."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    store = store_from_url(url)
    events = [
        Event(f"c{i}", T + i * DAY // 2, "org_1", "live", "charge", f"key_{i % 2}",
              "invoices.list" if i % 3 else "reports.get", 10_000 * (1 + i % 3), f"c{i}", "",
              "mk:ledger", (i, 0))
        for i in range(62)
    ]  # fmt: skip
    events.append(
        Event("r1", T + 3, "org_1", "live", "refund", "key_1", "invoices.list", 20_000, "c1",
              "", "mk:ledger", (100, 0))
    )  # fmt: skip
    events.append(
        Event("t1", T + 5, "org_1", "live", "topup", "", "", 7_000_000, "", "", "mk:ledger",
              (101, 0))
    )  # fmt: skip
    events.append(
        Event("o1", T, "org_2", "live", "charge", "k", "x", 1, "o1", "", "mk:ledger", (102, 0))
    )
    store.write(events)
    store.close()
    return url


def test_usage_prints_a_month_per_operation_key_and_day(
    capsys: pytest.CaptureFixture[str], filled: str
) -> None:
    """ledger usage --period shows totals, refunds, top-ups and each breakdown."""
    code, out, err = run(capsys, "ledger", "usage", "--to", filled, "--org", "org_1",
                         "--period", "2026-01")  # fmt: skip
    assert code == EXIT_OK, err
    assert "usage of org_1 (live), 2026-01-01 to 2026-02-01" in out
    assert "requests 62" in out
    assert "refunded 0.02 in 1 refunds" in out
    assert "topped up 7.00" in out
    for section in ("per operation:", "per key:", "per month:", "per day:"):
        assert section in out


def test_usage_json_of_a_range_and_one_key(capsys: pytest.CaptureFixture[str], filled: str) -> None:
    """--since/--until (until excluded) and --key narrow the JSON report."""
    code, out, _ = run(
        capsys, "ledger", "usage", "--to", filled, "--org", "org_1", "--key", "key_0",
        "--since", "2026-01-01", "--until", "2026-01-03", "--json",
    )  # fmt: skip
    assert code == EXIT_OK
    report = json.loads(out)
    assert (report["key"], report["since"], report["until"]) == (
        "key_0",
        "2026-01-01",
        "2026-01-03",
    )
    assert report["requests"] == 2  # charges 0 and 2 (days 1 and 2 hold charges 0-3)
    assert [d["day"] for d in report["days"]] == ["2026-01-01", "2026-01-02"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--period", "2026-13"],
        ["--since", "2026-01-01"],
        [],
    ],
)
def test_usage_refuses_a_bad_period(
    capsys: pytest.CaptureFixture[str], filled: str, argv: list[str]
) -> None:
    """A malformed or missing period is an error with a message, not a traceback."""
    code, _, err = run(capsys, "ledger", "usage", "--to", filled, "--org", "org_1", *argv)
    assert code in (1, EXIT_USAGE)
    assert err.startswith("meterkit: error:")


def test_export_csv_and_cloudevents(
    capsys: pytest.CaptureFixture[str], filled: str, tmp_path: Path
) -> None:
    """The period's events, oldest first, as CSV and as CloudEvents JSON lines."""
    code, out, _ = run(capsys, "ledger", "export", "--to", filled, "--period", "2026-01",
                       "--org", "org_1")  # fmt: skip
    assert code == EXIT_OK
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 64
    assert rows[0]["time"] == "2026-01-01T00:00:00Z"
    refund = next(r for r in rows if r["kind"] == "refund")
    assert (refund["credits"], refund["micro_credits"], refund["charge"]) == ("0.02", "20000", "c1")
    target = tmp_path / "events.jsonl"
    code, _, err = run(capsys, "ledger", "export", "--to", filled, "--period", "2026-01",
                       "--format", "cloudevents", "-o", str(target))  # fmt: skip
    assert code == EXIT_OK
    assert "65 events written" in err
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    first = lines[0]
    assert first["specversion"] == "1.0"
    assert first["type"] == "dev.meterkit.charge"
    assert first["source"] == "meterkit/mk:ledger"
    assert first["subject"] in ("org_1", "org_2")
    assert {"id", "time", "datacontenttype", "data"} <= set(first)
    topup = next(e for e in lines if e["type"] == "dev.meterkit.topup")
    assert topup["data"] == {"org": "org_1", "mode": "live", "credits": "7",
                             "micro_credits": 7_000_000}  # fmt: skip


@pytest.fixture
def stream(redis_url: str) -> Iterator[tuple[Any, str, str]]:
    client = redis.Redis.from_url(redis_url)
    prefix = new_prefix()
    yield client, prefix, redis_url
    delete_prefix(client, prefix)
    client.close()


def test_drain_once_moves_everything(
    capsys: pytest.CaptureFixture[str], stream: tuple[Any, str, str], tmp_path: Path
) -> None:
    """ledger drain --once moves what is there and says how much."""
    client, prefix, url = stream
    add_charges(client, prefix, 1_234, orgs=3)
    target = f"sqlite:///{tmp_path}/l.db"
    code, out, err = run(capsys, "ledger", "drain", "--url", url, "--to", target, "--prefix",
                         prefix, "--once", "--json")  # fmt: skip
    assert code == EXIT_OK, err
    assert json.loads(out)["moved"] == 1_234
    with store_from_url(target) as store:
        assert store.count() == 1_234


def test_drain_of_an_unreachable_redis_exits_3(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A Redis that does not answer is the backend exit code, with a message."""
    from tests._servers import free_port

    code, _, err = run(capsys, "ledger", "drain", "--url", f"redis://127.0.0.1:{free_port()}/0",
                       "--to", f"sqlite:///{tmp_path}/l.db", "--once")  # fmt: skip
    assert code == 3
    assert "meterkit: error: backend:" in err


def test_a_bad_store_url_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """An unsupported store URL exits 1 and does not echo the URL (it may hold a password)."""
    code, _, err = run(capsys, "ledger", "usage", "--to", "mysql://u:secret@h/db", "--org", "o",
                       "--period", "2026-01")  # fmt: skip
    assert code == 1
    assert "secret" not in err
