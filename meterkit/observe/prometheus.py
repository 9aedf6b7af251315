"""Prometheus metrics of a meter and its HTTP gate: :class:`PrometheusObserver`.

Pass one as ``on_decision`` (``Meter(policy, backend, on_decision=PrometheusObserver())``)
and serve its registry (``prometheus_client.generate_latest()``, or
``prometheus_client.make_asgi_app()``). Every name starts with ``meterkit_``:

=====================================  ==============================================
``meterkit_decisions_total``           requests decided, by ``operation``, ``outcome``
                                       (allowed, denied, refused, error) and
                                       ``reason`` ("" when admitted)
``meterkit_tier_refusals_total``       denials by the ``tier`` that denied (the first;
                                       ``credits`` for a 402), and ``operation``
``meterkit_backend_latency_seconds``   histogram of the backend's time per check, by
                                       ``operation``
``meterkit_degraded_total``            admissions made without the backend (fail-open),
                                       by ``operation``
``meterkit_shadow_denials_total``      denials shadow mode let through, by
                                       ``operation`` and ``tier``
``meterkit_backend_errors_total``      backend failures by ``kind``
                                       (backend_unavailable, backend_error, state_error)
``meterkit_refunds_total``             credits given back, by ``operation``
``meterkit_replays_total``             idempotent retries answered with the first
                                       decision, by ``operation``
``meterkit_credit_alerts_total``       credit alerts by ``threshold``
``meterkit_ledger_drain_lag_seconds``  how far the ledger's drain is behind (a gauge,
                                       when ``ledger_lag`` is given: ``drain.lag``)
=====================================  ==============================================

``org_label`` and ``key_label`` add ``org`` and ``key`` labels to the decisions, tier
refusals (and, for ``org``, credit alerts): ``True`` for every value, or a number N
for the N busiest seen so far (the others are counted under ``"other"``). Off by
default: a label per organization or key is a time series per organization or key.

The observer does as little as it can on the request's path: an admission adds to
three numbers of its operation under one lock (its latency bucket, the latency sum
and the admissions); the metric families are made only when a scrape asks. It is a
custom collector: with ``prometheus_client``'s multiprocess mode, each process
serves its own figures.
"""

from __future__ import annotations

import heapq
import logging
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Any

from meterkit.errors import ConfigurationError
from meterkit.observe.events import (
    ALERT,
    ALLOWED,
    DECIDED,
    DENIED,
    ERROR,
    LATENCY_BUCKETS,
    REFUNDED,
    Event,
)

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "meterkit.prometheus needs prometheus_client: pip install 'meterkit[prometheus]'"
    ) from exc

__all__ = ["LATENCY_BUCKETS", "PrometheusObserver"]

logger = logging.getLogger("meterkit")

#: The label value of organizations and keys outside the N busiest.
OTHER = "other"


class _Busiest:
    """Which values get a label of their own: the ``n`` seen most often so far.

    Counts are kept for at most ``8 * n`` values (at least 1,024): when there are twice
    as many, the least seen are forgotten (a value seldom seen cannot be among the
    busiest). The leaders are chosen again at each such pruning, and the first ``n``
    values seen are leaders until then. A value that drops out keeps the series it
    had; its later requests count under :data:`OTHER`.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.keep = max(8 * n, 1024)
        self.counts: Counter[str] = Counter()
        self.leaders: set[str] = set()

    def label(self, value: str | None) -> str:
        if value is None:
            return ""
        counts = self.counts
        counts[value] += 1
        leaders = self.leaders
        if value in leaders:
            return value
        if len(leaders) < self.n:
            leaders.add(value)
            return value
        if len(counts) >= 2 * self.keep:
            kept = heapq.nlargest(self.keep, counts.items(), key=itemgetter(1))
            self.counts = Counter(dict(kept))
            self.leaders = {name for name, _ in kept[: self.n]}
            if value in self.leaders:
                return value
        return OTHER


def _labeller(spec: object, what: str) -> Callable[[str | None], str] | None:
    """The label of ``org_label``/``key_label``: None (no label), every value, or the
    busiest N."""
    if spec is False or spec is None:
        return None
    if spec is True:
        return lambda value: "" if value is None else value
    if type(spec) is int and spec > 0:
        return _Busiest(spec).label
    raise ConfigurationError("is False, True or a number of values (the busiest N)", what)


class PrometheusObserver(Collector):
    """Count every event of a meter (and of HTTP gates over it) as Prometheus metrics
    (see the module's docstring for their names and labels).

    ``registry`` is where the metrics are served (default ``prometheus_client.REGISTRY``);
    ``buckets`` the latency histogram's (default :data:`LATENCY_BUCKETS`);
    ``ledger_lag`` a callable giving the ledger's drain lag in seconds, read at each
    scrape (a :class:`~meterkit.ledger.Drain`'s ``lag``). One observer can serve several meters.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        org_label: bool | int = False,
        key_label: bool | int = False,
        buckets: Sequence[float] = LATENCY_BUCKETS,
        ledger_lag: Callable[[], float | None] | None = None,
    ) -> None:
        bounds = tuple(buckets) if isinstance(buckets, Iterable) else ()
        if not bounds or any(
            type(b) not in (int, float) or not 0 < b < float("inf") for b in bounds
        ):
            raise ConfigurationError("is a list of positive, finite seconds", "buckets")
        if list(bounds) != sorted(set(bounds)):
            raise ConfigurationError("is in increasing order, each bound once", "buckets")
        if ledger_lag is not None and not callable(ledger_lag):
            raise ConfigurationError("is a callable returning seconds", "ledger_lag")
        self._bounds = tuple(float(b) for b in bounds)
        self._by_org = _labeller(org_label, "org_label")
        self._by_key = _labeller(key_label, "key_label")
        self._who = tuple(
            name
            for name, labeller in (("org", self._by_org), ("key", self._by_key))
            if labeller is not None
        )
        self._ledger_lag = ledger_lag
        self._lock = threading.Lock()
        # Per operation: see _add.
        self._ops: dict[str | None, list[Any]] = {}
        self._sum_at = len(self._bounds) + 1
        self._decisions: Counter[tuple[Any, ...]] = Counter()
        self._tier_refusals: Counter[tuple[Any, ...]] = Counter()
        self._degraded: Counter[str | None] = Counter()
        self._shadow: Counter[tuple[str | None, str]] = Counter()
        self._errors: Counter[str | None] = Counter()
        self._refunds: Counter[str | None] = Counter()
        self._replays: Counter[str | None] = Counter()
        self._alerts: Counter[tuple[Any, ...]] = Counter()
        self.registry = REGISTRY if registry is None else registry
        self.registry.register(self)

    def __repr__(self) -> str:
        return f"PrometheusObserver(labels={('operation', *self._who)})"

    def __call__(self, event: Event) -> None:
        op = event.operation
        cells = self._ops.get(op)
        if cells is None:
            cells = self._add(op)
        seconds = event.latency
        plain = (
            event.outcome is ALLOWED
            and not (event.degraded or event.shadow or event.replayed)
            and not self._who
        )
        if seconds is not None:
            bucket = bisect_left(self._bounds, seconds)
        lock = self._lock
        lock.acquire()
        try:
            if seconds is not None:
                cells[bucket] += 1
                cells[self._sum_at] += seconds
            if plain:
                cells[self._sum_at + 1] += 1
            else:
                self._count(event)
        finally:
            lock.release()

    # -- counting ------------------------------------------------------------------------

    def _add(self, op: str | None) -> list[Any]:
        """The cells of operation ``op``: each latency bucket's count (not cumulative),
        the sum of the latencies, and the plain admissions (no flag, no org or key
        label), which the hot path counts by themselves."""
        with self._lock:
            cells = self._ops.get(op)
            if cells is None:
                cells = [0] * (len(self._bounds) + 1) + [0.0, 0]
                # (a new dict, swapped in whole: readers never see one being resized)
                self._ops = {**self._ops, op: cells}
            return cells

    def _count(self, event: Event) -> None:
        """Count everything of ``event`` but its latency (under the lock)."""
        outcome = event.outcome
        op = event.operation
        who: tuple[str, ...] = ()
        if self._who:
            by_org, by_key = self._by_org, self._by_key
            if by_org is not None:
                who = (by_org(event.org),)
            if by_key is not None:
                who += (by_key(event.key),)
        if outcome in DECIDED:
            decided = (op, outcome, event.reason, *who)
            self._decisions[decided] += 1
            if outcome == DENIED:
                denied = (op, event.tier, *who)
                self._tier_refusals[denied] += 1
            elif outcome == ERROR:
                self._errors[event.reason] += 1
        elif outcome == REFUNDED:
            self._refunds[op] += 1
        elif outcome == ALERT:
            alert = (event.reason, *who[:1]) if self._by_org is not None else (event.reason,)
            self._alerts[alert] += 1
        if event.degraded:
            self._degraded[op] += 1
            self._errors[event.reason] += 1
        for tier in event.shadow:
            self._shadow[(op, tier)] += 1
        if event.replayed and outcome != REFUNDED:
            self._replays[op] += 1

    # -- the collector -------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (what the registry checks names with)."""
        return list(self._families(with_samples=False))

    def collect(self) -> Iterable[Metric]:
        """Every metric."""
        return list(self._families(with_samples=True))

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        counts: list[dict[Any, int]]
        latency: dict[str | None, list[Any]]
        plain: dict[str | None, int]
        if with_samples:
            with self._lock:
                counts = [
                    dict(c)
                    for c in (
                        self._decisions,
                        self._tier_refusals,
                        self._degraded,
                        self._shadow,
                        self._errors,
                        self._refunds,
                        self._replays,
                        self._alerts,
                    )
                ]
                latency = {op: cells[:-1] for op, cells in self._ops.items()}
                plain = {op: cells[-1] for op, cells in self._ops.items()}
        else:
            plain = {}
            counts = [{} for _ in range(8)]
            latency = {}
        decisions, tiers, degraded, shadow, errors, refunds, replays, alerts = counts
        for op, n in plain.items():
            if n:
                admitted = (op, ALLOWED, None)
                decisions[admitted] = decisions.get(admitted, 0) + n
        who = list(self._who)
        yield _counter(
            "meterkit_decisions",
            "Requests decided by meterkit, by operation, outcome and reason.",
            ["operation", "outcome", "reason", *who],
            decisions,
        )
        yield _counter(
            "meterkit_tier_refusals",
            "Requests denied, by the tier that denied them ('credits' for a 402).",
            ["operation", "tier", *who],
            tiers,
        )
        yield self._histogram(latency)
        yield _counter(
            "meterkit_degraded",
            "Requests admitted without the backend, which was unavailable (fail-open).",
            ["operation"],
            degraded,
        )
        yield _counter(
            "meterkit_shadow_denials",
            "Requests that a shadow tier (or shadow credits) would have denied.",
            ["operation", "tier"],
            shadow,
        )
        yield _counter(
            "meterkit_backend_errors",
            "Backend failures, by kind.",
            ["kind"],
            errors,
        )
        yield _counter(
            "meterkit_refunds",
            "Admitted requests whose credits were given back.",
            ["operation"],
            refunds,
        )
        yield _counter(
            "meterkit_replays",
            "Idempotent retries answered with the first decision.",
            ["operation"],
            replays,
        )
        yield _counter(
            "meterkit_credit_alerts",
            "Organizations whose credit usage crossed an alert threshold.",
            ["threshold", *(["org"] if self._by_org is not None else [])],
            alerts,
        )
        if self._ledger_lag is not None:
            gauge = GaugeMetricFamily(
                "meterkit_ledger_drain_lag_seconds",
                "How far the ledger's drain is behind the events it has to write.",
            )
            if with_samples:
                try:
                    lag = self._ledger_lag()
                except Exception:
                    logger.exception("meterkit: could not read the ledger's drain lag")
                    lag = None
                if lag is not None:
                    gauge.add_metric([], float(lag))
            yield gauge

    def _histogram(self, latency: dict[str | None, list[Any]]) -> Metric:
        family = HistogramMetricFamily(
            "meterkit_backend_latency_seconds",
            "Seconds the backend took to answer a check (or a refund).",
            labels=["operation"],
        )
        bounds = (*self._bounds, float("inf"))
        for op, cells in sorted(latency.items(), key=lambda item: item[0] or ""):
            total = 0
            buckets = []
            for bound, n in zip(bounds, cells, strict=False):
                total += n
                buckets.append((_le(bound), total))
            if total:
                family.add_metric([op or ""], buckets, cells[-1])
        return family


def _le(bound: float) -> str:
    """A bucket's ``le`` label, as prometheus_client writes it."""
    le: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return le


def _counter(
    name: str, documentation: str, labels: list[str], counts: dict[Any, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, n in sorted(counts.items(), key=lambda item: repr(item[0])):
        if not isinstance(values, tuple):
            values = (values,)
        family.add_metric(["" if v is None else str(v) for v in values], n)
    return family
