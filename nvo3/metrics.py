"""Prometheus metrics for the NVE, the IMA and the agent, read at scrape time.

Nothing is counted twice and nothing is added to the hot path beyond a
``Counter`` increment: each service already keeps its counters, table sizes
and queues (the NVE also keeps the per-event propagation latencies, agent
publish -> remote NVE applied, from the ``ts_ns`` carried in each binding;
the agent keeps its request round trips per histogram bucket).  A custom
collector turns them into metrics when Prometheus scrapes.  The metric names
are listed in docs/operations.md ("Metrics").

The collector runs in the HTTP server's thread while the service mutates its
counters on the event loop, so it copies each mapping (one C-level call under
the GIL) before it iterates.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from agents.service import AgentService
    from ima.service import ImaService
    from ima.store import EtcdStore
    from nve.service import NveService

BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily


def _prefixed(counters: Mapping[str, int], prefix: str) -> list[tuple[str, float]]:
    """``prefix.rest`` counters as (rest, value), sorted."""
    n = len(prefix) + 1
    return sorted((k[n:], float(v)) for k, v in counters.items() if k.startswith(prefix + "."))


def _counter(name: str, doc: str, labels: list[str], base: list[str],
             rows: Iterable[tuple[str, float]]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for label, value in rows:
        family.add_metric([*base, label], value)
    return family


def _gauge(name: str, doc: str, labels: list[str], base: list[str],
           value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    family.add_metric(base, value)
    return family


def _store_families(prefix: str, store: EtcdStore, labels: list[str],
                    base: list[str]) -> Iterator[Family]:
    """etcd calls of one process's store, by op (first word: get, list, put, txn, ...)."""
    counters = dict(store.counters)
    yield _counter(f"{prefix}_etcd_requests", "etcd calls by op (retries not included)",
                   [*labels, "op"], base, _prefixed(counters, "calls"))
    family = CounterMetricFamily(f"{prefix}_etcd_retries",
                                 "etcd calls retried after a transient failure", labels=labels)
    family.add_metric(base, float(counters.get("retries", 0)))
    yield family
    family = CounterMetricFamily(f"{prefix}_etcd_unavailable",
                                 "etcd calls that gave up (StoreUnavailable)", labels=labels)
    family.add_metric(base, float(counters.get("unavailable", 0)))
    yield family


# --------------------------------------------------------------------------- NVE


class NveCollector(Collector):
    def __init__(self, service: NveService) -> None:
        self.service = service

    def collect(self) -> Iterator[Family]:
        svc = self.service
        nve = svc.config.nve_id
        counters = dict(svc.counters)
        events = CounterMetricFamily(
            "nvo3_nve_events", "NVE events by name: messages.<kind>, errors.<code>, ima_*",
            labels=["nve", "event"])
        for name, value in sorted(counters.items()):
            events.add_metric([nve, name], float(value))
        yield events
        yield _counter("nvo3_nve_messages", "Hypervisor requests applied, by kind",
                       ["nve", "kind"], [nve], _prefixed(counters, "messages"))
        yield _counter("nvo3_nve_errors", "Hypervisor requests refused, by error code",
                       ["nve", "code"], [nve], _prefixed(counters, "errors"))
        sizes = GaugeMetricFamily("nvo3_nve_table_entries", "Entries in the NVE's tables",
                                  labels=["nve", "table"])
        sizes.add_metric([nve, "local_vnics"], float(len(svc.core.vnics)))
        sizes.add_metric([nve, "local_bindings"], float(len(svc.core.local_bindings())))
        sizes.add_metric([nve, "remote_bindings"], float(svc.core.remote.size()))
        sizes.add_metric([nve, "served_vns"], float(len(svc.core.vn_members)))
        yield sizes
        yield _gauge("nvo3_nve_ima_queue_depth", "IMA writes waiting", ["nve"], [nve],
                     float(svc.writer.depth))
        queues = GaugeMetricFamily(
            "nvo3_nve_queue_depth",
            "Work waiting: ima_writes (requests whose etcd ops are queued), replies "
            "(requests waiting for their commit before the reply), nats_requests "
            "(received, not yet handled)", labels=["nve", "queue"])
        queues.add_metric([nve, "ima_writes"], float(svc.writer.depth))
        queues.add_metric([nve, "replies"], float(len(svc._replies)))
        sub = svc.requests_sub
        queues.add_metric([nve, "nats_requests"], float(sub.pending_msgs if sub else 0))
        yield queues
        yield from _store_families("nvo3_nve", svc.store, ["nve"], [nve])
        latencies = [v / 1e9 for v in list(svc.latencies)]
        hist = HistogramMetricFamily(
            "nvo3_propagation_seconds",
            "Agent publish to this NVE's remote table (last 200k events)",
            labels=["nve"])
        hist.add_metric([nve], *_buckets(latencies))
        yield hist
        stages = HistogramMetricFamily(
            "nvo3_nve_request_stage_seconds",
            "Where a request's time goes (last 10k requests): receive = agent publish to "
            "NVE pick-up, commit = pick-up to IMA writes durable", labels=["nve", "stage"])
        for name, samples in svc.stages.items():
            stages.add_metric([nve, name], *_buckets([d / 1e9 for _, d in list(samples)]))
        yield stages
        lag = HistogramMetricFamily(
            "nvo3_nve_loop_lag_seconds",
            "How late the NVE's event loop ran a task due then (last 20k probes, one per "
            "5 ms): a long synchronous step, a GC pause, or no CPU", labels=["nve"])
        lag.add_metric([nve], *_buckets([d / 1e9 for _, d in list(svc.loop_lag.samples)]))
        yield lag
        steps = HistogramMetricFamily(
            "nvo3_nve_step_seconds",
            "Single steps (last 10k each): watch_apply = one watch response applied to the "
            "remote table (holds the event loop), ima_batch = one writer batch committed "
            "to etcd", labels=["nve", "step"])
        steps.add_metric([nve, "watch_apply"], *_buckets(
            [d / 1e9 for _, d in list(svc.watch_stages["apply"])]))
        steps.add_metric([nve, "ima_batch"], *_buckets(
            [d / 1e9 for _, d in list(svc.writer.batch_times)]))
        yield steps


def _buckets(seconds: list[float]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative histogram buckets (BUCKETS_S, then +Inf) and the sum."""
    ordered = sorted(seconds)
    buckets = []
    i = 0
    for bound in BUCKETS_S:
        while i < len(ordered) and ordered[i] <= bound:
            i += 1
        buckets.append((str(bound), float(i)))
    buckets.append(("+Inf", float(len(ordered))))
    return buckets, sum(ordered)


# --------------------------------------------------------------------------- IMA


class ImaCollector(Collector):
    def __init__(self, service: ImaService) -> None:
        self.service = service

    def collect(self) -> Iterator[Family]:
        counters = dict(self.service.counters)
        ops = CounterMetricFamily(
            "nvo3_ima_operations",
            "IMA requests by op (create, get, list, delete, profile_set, profile_get, "
            "placement_set) and result (ok or the error code)", labels=["op", "result"])
        for key, value in _prefixed(counters, "ops"):
            op, _, result = key.partition(".")
            ops.add_metric([op, result], value)
        yield ops
        yield _counter("nvo3_ima_errors", "IMA requests refused, by error code", ["code"], [],
                       _prefixed(counters, "errors"))
        yield from _store_families("nvo3_ima", self.service.store, [], [])


# --------------------------------------------------------------------------- agent

# AgentService counters that have a family of their own: name -> (family, label value)
_AGENT_SERVICE = {
    "syncs": ("syncs", "ok"),
    "sync_failures": ("syncs", "failed"),
    "nve_restarts_seen": ("resyncs", "nve_restart"),
    "resyncs_after_drops": ("resyncs", "drops"),
    "resyncs_after_unreachable": ("resyncs", "unreachable"),
}


class AgentCollector(Collector):
    def __init__(self, service: AgentService) -> None:
        self.service = service

    def collect(self) -> Iterator[Family]:
        svc, agent = self.service, self.service.agent
        hv = agent.hypervisor
        sent = dict(agent.counters)
        yield _counter("nvo3_agent_requests", "Requests sent to NVEs, by kind (not retransmits)",
                       ["hv", "kind"], [hv], _prefixed(sent, "requests"))
        yield _counter("nvo3_agent_retransmits",
                       "Requests sent again (no answer in time, or renumbered after stale_seq)",
                       ["hv", "kind"], [hv], _prefixed(sent, "retransmits"))
        yield _counter("nvo3_agent_replies", "NVE replies by result (ok or the error code)",
                       ["hv", "result"], [hv], _prefixed(sent, "replies"))
        yield _counter("nvo3_agent_unreachable",
                       "Requests given up after every retransmit, by NVE (kept for resync)",
                       ["hv", "nve"], [hv], _prefixed(sent, "unreachable"))
        own = dict(svc.counters)
        syncs = CounterMetricFamily("nvo3_agent_syncs", "Full hv_sync runs by result",
                                    labels=["hv", "result"])
        resyncs = CounterMetricFamily(
            "nvo3_agent_resyncs", "Full syncs asked for, by reason (nve_restart, drops, "
            "unreachable); the one at agent start is not counted", labels=["hv", "reason"])
        for name, (family, label) in _AGENT_SERVICE.items():
            (syncs if family == "syncs" else resyncs).add_metric([hv, label],
                                                                  float(own.get(name, 0)))
        yield syncs
        yield resyncs
        commands = _prefixed(own, "command_errors")
        yield _counter("nvo3_agent_commands",
                       "Operator commands (nvo3 agent ctl) by result (ok or the error code)",
                       ["hv", "result"], [hv], [("ok", float(own.get("commands", 0))), *commands])
        other = sorted((k, float(v)) for k, v in own.items()
                       if k not in _AGENT_SERVICE and k != "commands"
                       and not k.startswith("command_errors."))
        yield _counter("nvo3_agent_events", "Other sidecar events (bad_announcements, ...)",
                       ["hv", "event"], [hv], other)
        yield _gauge("nvo3_agent_inflight_requests",
                     "Requests sent and not yet answered (retransmits included)",
                     ["hv"], [hv], float(agent.inflight))
        yield _gauge("nvo3_agent_sync_queue_depth", "NVEs waiting for a full hv_sync",
                     ["hv"], [hv], float(svc.sync_queue_depth))
        yield _gauge("nvo3_agent_unsynced_nves",
                     "NVEs that missed a request while unreachable (resync when they are back)",
                     ["hv"], [hv], float(len(agent.unsynced)))
        yield _gauge("nvo3_agent_desired_vnics", "VNICs in the agent's desired state",
                     ["hv"], [hv], float(len(agent.desired.vnics)))
        rtt = agent.rtt
        counts, total = list(rtt.counts), rtt.sum_s
        buckets, cumulative = [], 0
        for bound, count in zip((*rtt.bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else str(bound),
                            float(cumulative)))
        hist = HistogramMetricFamily(
            "nvo3_agent_request_rtt_seconds",
            "Request published to reply received, per answered attempt", labels=["hv"])
        hist.add_metric([hv], buckets, sum_value=total)
        yield hist


# --------------------------------------------------------------------------- serving


def _serve(collector: Collector, port: int, addr: str) -> int:
    registry = CollectorRegistry()
    registry.register(collector)
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return int(server.server_port)


def serve_metrics(service: NveService, port: int, addr: str = "127.0.0.1") -> int:
    """Expose the NVE's ``/metrics``; returns the bound port (``port=0`` picks a free one)."""
    return _serve(NveCollector(service), port, addr)


def serve_ima_metrics(service: ImaService, port: int, addr: str = "127.0.0.1") -> int:
    """Expose the IMA's ``/metrics``; returns the bound port."""
    return _serve(ImaCollector(service), port, addr)


def serve_agent_metrics(service: AgentService, port: int, addr: str = "127.0.0.1") -> int:
    """Expose an agent sidecar's ``/metrics``; returns the bound port."""
    return _serve(AgentCollector(service), port, addr)
