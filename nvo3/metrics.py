"""Prometheus metrics for the NVE, read from the service at scrape time.

Nothing is counted twice and nothing is added to the hot path: the service
already keeps its counters, table sizes, queue depth and the per-event
propagation latencies (agent publish -> remote NVE applied, from the
``ts_ns`` carried in each binding); a custom collector turns them into
metrics when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from nve.service import NveService

BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class NveCollector(Collector):
    def __init__(self, service: NveService) -> None:
        self.service = service

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        svc = self.service
        nve = svc.config.nve_id
        events = CounterMetricFamily(
            "nvo3_nve_events", "NVE events by name: messages.<kind>, errors.<code>, ima_*",
            labels=["nve", "event"])
        for name, value in sorted(svc.counters.items()):
            events.add_metric([nve, name], float(value))
        yield events
        sizes = GaugeMetricFamily("nvo3_nve_table_entries", "Entries in the NVE's tables",
                                  labels=["nve", "table"])
        sizes.add_metric([nve, "local_vnics"], float(len(svc.core.vnics)))
        sizes.add_metric([nve, "local_bindings"], float(len(svc.core.local_bindings())))
        sizes.add_metric([nve, "remote_bindings"], float(svc.core.remote.size()))
        sizes.add_metric([nve, "served_vns"], float(len(svc.core.vn_members)))
        yield sizes
        depth = GaugeMetricFamily("nvo3_nve_ima_queue_depth", "IMA writes waiting",
                                  labels=["nve"])
        depth.add_metric([nve], float(svc.writer.depth))
        yield depth
        latencies = sorted(v / 1e9 for v in svc.latencies)
        buckets = []
        i = 0
        for bound in BUCKETS_S:
            while i < len(latencies) and latencies[i] <= bound:
                i += 1
            buckets.append((str(bound), float(i)))
        buckets.append(("+Inf", float(len(latencies))))
        hist = HistogramMetricFamily(
            "nvo3_propagation_seconds",
            "Agent publish to this NVE's remote table (last 200k events)",
            labels=["nve"])
        hist.add_metric([nve], buckets, sum_value=sum(latencies))
        yield hist


def serve_metrics(service: NveService, port: int, addr: str = "127.0.0.1") -> int:
    """Expose ``/metrics``; returns the bound port (``port=0`` picks a free one)."""
    registry = CollectorRegistry()
    registry.register(NveCollector(service))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return int(server.server_port)
