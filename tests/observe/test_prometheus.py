"""PrometheusObserver: every metric after the scripted sequence, labels, configuration."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import meterkit
from meterkit import ConfigurationError, MemoryBackend, Meter
from meterkit.observe.events import Event
from meterkit.prometheus import LATENCY_BUCKETS, PrometheusObserver
from tests.conftest import FakeClock
from tests.observe._script import EXPECTED, run_script, script_policy
from tests.observe.conftest import Scripted

LABELS = {
    "decisions": ("operation", "outcome", "reason"),
    "tier_refusals": ("operation", "tier"),
    "degraded": ("operation",),
    "shadow_denials": ("operation", "tier"),
    "backend_errors": ("kind",),
    "refunds": ("operation",),
    "replays": ("operation",),
    "latency_count": ("operation",),
}
NAMES = {
    "latency_count": "meterkit_backend_latency_seconds_count",
    **{m: f"meterkit_{m}_total" for m in LABELS if m != "latency_count"},
}


def samples(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the registry's metrics, by name: (labels, value), as a scrape
    reads them."""
    text = generate_latest(registry).decode()
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def by_metric(registry: CollectorRegistry) -> dict[str, dict[tuple[str, ...], float]]:
    """The samples of each metric of LABELS, by label values in LABELS' order (then
    org and key, when present)."""
    found = samples(registry)
    result = {}
    for metric, name in NAMES.items():
        order = (*LABELS[metric], "org", "key")
        result[metric] = {
            tuple(labels[n] for n in order if n in labels): value
            for labels, value in found.get(name, [])
        }
    return result


def test_every_metric_after_the_scripted_sequence(scripted: Scripted, clock: FakeClock) -> None:
    """After admits, a denial of each reason, shadow, a replay, a reused key, a refund and
    an outage, every metric holds exactly what happened, on memory and on Redis."""
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    meter, outage = scripted(observer)
    run_script(meter, clock, outage)
    assert by_metric(registry) == EXPECTED
    # the histogram: cumulative buckets, ending at the count; a positive sum
    for op in ("items.list", "items.create"):
        buckets = [
            registry.get_sample_value(
                "meterkit_backend_latency_seconds_bucket", {"operation": op, "le": le}
            )
            for le in [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
        ]
        assert buckets == sorted(buckets)  # type: ignore[type-var]
        assert buckets[-1] == EXPECTED["latency_count"][(op,)]
        total = registry.get_sample_value("meterkit_backend_latency_seconds_sum", {"operation": op})
        assert total is not None
        assert total > 0


def test_the_same_figures_from_an_asyncio_meter(clock: FakeClock) -> None:
    """AsyncMeter reports through the same hook: its admissions and denials are counted."""
    import asyncio

    registry = CollectorRegistry()
    meter = meterkit.AsyncMeter(
        script_policy(), MemoryBackend(clock=clock), on_decision=PrometheusObserver(registry)
    )

    async def three() -> list[Any]:
        return [await meter.check("k", org="org_a", operation="items.list") for _ in range(3)]

    assert [d.allowed for d in asyncio.run(three())] == [True, True, False]
    found = by_metric(registry)["decisions"]
    assert found == {
        ("items.list", "allowed", ""): 2,
        ("items.list", "denied", "rate_limited"): 1,
    }


def test_a_batch_reports_each_decision(clock: FakeClock) -> None:
    """check_many reports one decision per request, with the batch's latency each."""
    registry = CollectorRegistry()
    meter = Meter(
        script_policy(), MemoryBackend(clock=clock), on_decision=PrometheusObserver(registry)
    )
    meter.check_many([("k", "items.list", "org_a")] * 3)
    assert by_metric(registry)["decisions"] == {
        ("items.list", "allowed", ""): 2,
        ("items.list", "denied", "rate_limited"): 1,
    }
    assert by_metric(registry)["latency_count"] == {("items.list",): 3}


def test_org_and_key_labels_are_off_by_default(clock: FakeClock) -> None:
    """No series names an organization or a key unless asked."""
    registry = CollectorRegistry()
    meter = Meter(
        script_policy(), MemoryBackend(clock=clock), on_decision=PrometheusObserver(registry)
    )
    meter.check("key_1", org="org_a", operation="items.list")
    text = generate_latest(registry).decode()
    assert "org_a" not in text
    assert "key_1" not in text


def test_org_and_key_labels_when_asked(clock: FakeClock) -> None:
    """org_label=True and key_label=True add both labels to decisions and tier refusals."""
    registry = CollectorRegistry()
    meter = Meter(
        script_policy(),
        MemoryBackend(clock=clock),
        on_decision=PrometheusObserver(registry, org_label=True, key_label=True),
    )
    for _ in range(3):
        meter.check("key_1", org="org_a", operation="items.list")
    value = registry.get_sample_value
    assert (
        value(
            "meterkit_decisions_total",
            {
                "operation": "items.list",
                "outcome": "allowed",
                "reason": "",
                "org": "org_a",
                "key": "key_1",
            },
        )
        == 2
    )
    assert (
        value(
            "meterkit_tier_refusals_total",
            {"operation": "items.list", "tier": "key-burst", "org": "org_a", "key": "key_1"},
        )
        == 1
    )


def test_org_label_limited_to_the_busiest(clock: FakeClock) -> None:
    """org_label=N labels the first N organizations seen, then counts the rest as other."""
    registry = CollectorRegistry()
    meter = Meter(
        script_policy(),
        MemoryBackend(clock=clock),
        on_decision=PrometheusObserver(registry, org_label=2),
    )
    for org in ("org_a", "org_b", "org_c", "org_d", "org_a"):
        meter.check("key_1", org=org, operation="items.list")
    found = by_metric(registry)["decisions"]
    assert found == {
        ("items.list", "allowed", "", "org_a"): 2,
        ("items.list", "allowed", "", "org_b"): 1,
        ("items.list", "allowed", "", "other"): 2,
    }


def test_the_busiest_take_over_the_labels() -> None:
    """Once the counts are ranked again, the organizations seen most get the labels."""
    from meterkit.observe.prometheus import _Busiest

    busiest = _Busiest(2)
    assert [busiest.label(v) for v in ("a", "b", "c", "c", "c")] == ["a", "b", *["other"] * 3]
    for i in range(2 * busiest.keep):  # enough distinct values to rank again
        busiest.label(f"x{i}")
    assert busiest.leaders == {"c", "a"} or busiest.leaders == {"c", "b"}
    assert busiest.label("c") == "c"
    assert len(busiest.counts) <= 2 * busiest.keep


def test_credit_alerts_and_every_outcome_an_event_can_have() -> None:
    """Alerts count by threshold; events made by hand (as another meter would) count too."""
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    observer(Event("alert", "items.list", "org_a", "key_1", "live", "80%", None, 200, None))
    observer(Event("refused", None, None, None, None, "not_found", None, 404, None))
    observer(Event("allowed", "items.list", "org_a", "key_1", "live", None, None, 200, 0.001))
    assert registry.get_sample_value("meterkit_credit_alerts_total", {"threshold": "80%"}) == 1
    found = by_metric(registry)["decisions"]
    assert found == {("", "refused", "not_found"): 1, ("items.list", "allowed", ""): 1}


def test_ledger_lag_is_a_gauge_read_at_each_scrape() -> None:
    """ledger_lag is read when scraped; a failing reader is logged and leaves no sample."""
    lag = [1.5]

    def reader() -> float:
        if not lag:
            raise RuntimeError("no drain")
        return lag[0]

    registry = CollectorRegistry()
    PrometheusObserver(registry, ledger_lag=reader)
    assert registry.get_sample_value("meterkit_ledger_drain_lag_seconds") == 1.5
    lag[0] = 0.25
    assert registry.get_sample_value("meterkit_ledger_drain_lag_seconds") == 0.25
    lag.clear()
    assert registry.get_sample_value("meterkit_ledger_drain_lag_seconds") is None


def test_no_ledger_gauge_without_a_reader() -> None:
    """Without ledger_lag, no drain-lag gauge is served."""
    registry = CollectorRegistry()
    PrometheusObserver(registry)
    assert "meterkit_ledger_drain_lag_seconds" not in generate_latest(registry).decode()


def test_custom_buckets(clock: FakeClock) -> None:
    """buckets= sets the histogram's bounds."""
    registry = CollectorRegistry()
    meter = Meter(
        script_policy(),
        MemoryBackend(clock=clock),
        on_decision=PrometheusObserver(registry, buckets=[0.5, 1]),
    )
    meter.check("k", org="org_a", operation="items.list")
    found = samples(registry)["meterkit_backend_latency_seconds_bucket"]
    assert [labels["le"] for labels, _ in found] == ["0.5", "1.0", "+Inf"]


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"buckets": []}, "buckets"),
        ({"buckets": [1, 0.5]}, "buckets"),
        ({"buckets": [0.1, float("nan")]}, "buckets"),
        ({"buckets": ["1"]}, "buckets"),
        ({"org_label": -1}, "org_label"),
        ({"key_label": "yes"}, "key_label"),
        ({"ledger_lag": 3}, "ledger_lag"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], where: str) -> None:
    """A bad option raises ConfigurationError naming it, and registers nothing."""
    registry = CollectorRegistry()
    with pytest.raises(ConfigurationError) as caught:
        PrometheusObserver(registry, **options)
    assert caught.value.location == where
    assert generate_latest(registry) == b""


def test_the_default_registry_and_a_second_observer() -> None:
    """Without a registry the observer serves from prometheus_client's; a second one on the
    same registry is refused by prometheus_client (its names are taken)."""
    import prometheus_client

    observer = PrometheusObserver()
    try:
        assert observer.registry is prometheus_client.REGISTRY
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            PrometheusObserver()
    finally:
        prometheus_client.REGISTRY.unregister(observer)


def test_counts_are_exact_under_threads(clock: FakeClock) -> None:
    """Events reported from many threads at once are each counted once."""
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    event = Event("allowed", "items.list", "org_a", "key_1", "live", None, None, 200, 0.00002)
    start = threading.Barrier(4)

    def report() -> None:
        start.wait()
        for _ in range(5000):
            observer(event)

    threads = [threading.Thread(target=report) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert by_metric(registry)["decisions"] == {("items.list", "allowed", ""): 20000}
    assert registry.get_sample_value(
        "meterkit_backend_latency_seconds_sum", {"operation": "items.list"}
    ) == pytest.approx(20000 * 0.00002)


def test_charges_are_untouched_by_the_observer(clock: FakeClock) -> None:
    """An observed meter charges what an unobserved one does."""
    observed = Meter(
        script_policy(),
        MemoryBackend(clock=clock),
        on_decision=PrometheusObserver(CollectorRegistry()),
    )
    plain = Meter(script_policy(), MemoryBackend(clock=clock))
    for meter in (observed, plain):
        meter.check("k", org="org_a", operation="items.create")
    assert observed.usage("org_a").credits_used == plain.usage("org_a").credits_used
    assert observed.usage("org_a").credits_used == Decimal("0.05")
