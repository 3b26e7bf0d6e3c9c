"""Prometheus metrics of one process (DC, RS, CS), on prometheus_client: HELP and TYPE for every
series, histograms with buckets, the exposition format done by the library.

Two kinds of series: instruments the code updates as things happen (histograms of latencies,
counters with labels), and read-outs of state taken when /metrics is scraped (sessions, block
age, gas balance, and the plain counters the parts already keep in dicts). Each process has its
own registry, so tests that run several DCs in one process never mix their figures.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series: they double the output and say nothing an operator needs

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Latencies from a millisecond (a direction on loopback) to half a minute (a registration that
# waits for a slow chain).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """A registry with a prefix (`ntm_dc`), instruments, and read-outs collected on each scrape."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.registry = CollectorRegistry(auto_describe=True)
        self._readouts: list[Callable[[], Iterable[Metric]]] = []
        self.registry.register(self)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
        return Histogram(f"{self.prefix}_{name}", doc, labels, registry=self.registry, buckets=LATENCY_BUCKETS)

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(f"{self.prefix}_{name}", doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, read: Callable[[], float | None]) -> None:
        """A value read at scrape time (None: not known yet, the series is left out)."""

        def collect() -> Iterable[Metric]:
            value = read()
            if value is not None:
                family = GaugeMetricFamily(f"{self.prefix}_{name}", doc)
                family.add_metric([], value)
                yield family

        self._readouts.append(collect)

    def labelled_gauge(self, name: str, doc: str, label: str, read: Callable[[], dict[str, float]]) -> None:
        def collect() -> Iterable[Metric]:
            family = GaugeMetricFamily(f"{self.prefix}_{name}", doc, labels=[label])
            for key, value in sorted(read().items()):
                family.add_metric([key], value)
            yield family

        self._readouts.append(collect)

    def counters(
        self, read: Callable[[], dict[str, int]], docs: dict[str, str], label: tuple[str, str] | None = None
    ) -> None:
        """Counters the code keeps in a dict: one series per key documented in `docs` (name: help),
        or, with `label` = (series name, label name), one labelled series over all keys."""

        def collect() -> Iterable[Metric]:
            values = read()
            if label is not None:
                family = CounterMetricFamily(f"{self.prefix}_{label[0]}", docs[label[0]], labels=[label[1]])
                for key, value in sorted(values.items()):
                    family.add_metric([key], value)
                yield family
                return
            for key, doc in docs.items():
                if key in values:
                    yield CounterMetricFamily(f"{self.prefix}_{key}", doc, value=values[key])

        self._readouts.append(collect)

    def collect(self) -> Iterable[Metric]:
        for read in self._readouts:
            yield from read()

    def describe(self) -> Iterable[Metric]:
        return []  # read-outs change names only with the code: nothing to check at registration

    def render(self) -> bytes:
        return generate_latest(self.registry)
