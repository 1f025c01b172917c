"""``/metrics``: Prometheus text built from the observer's shared sample.

A custom collector (no global mutable metrics): each scrape reads
:meth:`corral.scheduler.observer.Observer.sample`, which is at most
``dashboard.interval`` seconds old and shared with the dashboard's viewers.

Example scrape configuration::

    scrape_configs:
      - job_name: corral
        static_configs: [{targets: ["scheduler-host:8787"]}]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from ..scheduler.observer import Observer


class SchedulerCollector:
    """Yields the scheduler's metrics from the latest sample."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def describe(self) -> list[Metric]:
        return []  # no sampling when the collector is registered

    def collect(self) -> Iterator[Metric]:
        obs = self.observer
        snap: dict[str, Any] = obs.sample()
        tasks = GaugeMetricFamily("corral_scheduler_tasks", "Tasks by state.", labels=["state"])
        for state, n in snap["counts"].items():
            tasks.add_metric([state], n)
        yield tasks

        finished = CounterMetricFamily(
            "corral_scheduler_task_group_finished",
            "Tasks of each group (key prefix) that finished, since the scheduler started.",
            labels=["group"],
        )
        erred = CounterMetricFamily(
            "corral_scheduler_task_group_erred",
            "Task runs of each group that raised, since the scheduler started.",
            labels=["group"],
        )
        for group in snap["groups"]:
            finished.add_metric([group["name"]], group["finished"])
            erred.add_metric([group["name"]], group["failed"])
        yield finished
        yield erred

        workers = GaugeMetricFamily(
            "corral_scheduler_workers", "Connected workers.", labels=["status"]
        )
        by_status = {"running": 0, "paused": 0}
        for w in snap["workers"]:
            by_status[w["status"]] = by_status.get(w["status"], 0) + 1
        for status, n in by_status.items():
            workers.add_metric([status], n)
        yield workers
        yield GaugeMetricFamily(
            "corral_scheduler_clients", "Connected clients.", value=snap["scheduler"]["clients"]
        )

        labels = ["worker", "name"]
        per_worker = {
            "threads": ("corral_worker_threads", "Threads of the worker.", "nthreads"),
            "memory": ("corral_worker_memory_bytes", "Resident memory of the worker.", "memory"),
            "limit": (
                "corral_worker_memory_limit_bytes",
                "Memory limit (0: none).",
                "memory_limit",
            ),
            "cpu": ("corral_worker_cpu_percent", "CPU use of the worker process.", "cpu"),
            "processing": (
                "corral_worker_processing_tasks",
                "Tasks assigned to the worker and not finished.",
                "processing",
            ),
            "executing": ("corral_worker_executing_tasks", "Tasks running now.", "executing"),
            "stored": ("corral_worker_stored_bytes", "Bytes of results held.", "nbytes"),
        }
        families = {
            k: GaugeMetricFamily(n, h, labels=labels) for k, (n, h, _) in per_worker.items()
        }
        offered = GaugeMetricFamily(
            "corral_worker_resource_offered",
            "Amount of each resource the worker offers.",
            labels=[*labels, "resource"],
        )
        used = GaugeMetricFamily(
            "corral_worker_resource_used",
            "Amount of each resource held by running tasks.",
            labels=[*labels, "resource"],
        )
        for w in snap["workers"]:
            ids = [w["address"], w["name"]]
            for k, (_, _, field) in per_worker.items():
                families[k].add_metric(ids, float(w[field] or 0))
            for resource, amount in w["resources"].items():
                offered.add_metric([*ids, resource], float(amount))
                used.add_metric([*ids, resource], float(w["resources_used"].get(resource, 0.0)))
        yield from families.values()
        yield offered
        yield used

        members = GaugeMetricFamily(
            "corral_environment_members",
            "Workers that are members of each registered worker environment.",
            labels=["environment"],
        )
        for name, n in snap["environments"].items():
            members.add_metric([name], n)
        yield members

        messages = CounterMetricFamily(
            "corral_scheduler_messages_received",
            "Messages the scheduler received, by op and sender role.",
            labels=["op", "role"],
        )
        for role, ops in snap["ops"].items():
            for op, n in sorted(ops.items()):
                messages.add_metric([op, role], n)
        yield messages
        yield CounterMetricFamily(
            "corral_scheduler_transitions",
            "Task state transitions.",
            value=snap["scheduler"]["transitions"],
        )
        yield GaugeMetricFamily(
            "corral_scheduler_event_loop_lag_seconds",
            "How late the scheduler's event loop last woke a sleeping task.",
            value=obs.loop_lag,
        )
        yield GaugeMetricFamily(
            "corral_scheduler_event_loop_lag_max_seconds",
            "The largest event-loop lag of the last minute.",
            value=obs.loop_lag_max,
        )
        yield GaugeMetricFamily(
            "corral_scheduler_sample_seconds",
            "Time the last sample of the scheduler state took.",
            value=obs.sample_cost,
        )


def make_registry(observer: Observer) -> CollectorRegistry:
    """A registry of this scheduler's collector and its process's CPU/memory."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SchedulerCollector(observer))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
