"""The metrics the ``prometheus`` exporter serves, in one registry per exporter.

Each exporter builds its own ``CollectorRegistry``: several kernels may run in one process
(tests do), and prometheus_client's default registry is a process global. Counters and
histograms are moved by the middlewares (``prom_middleware.py``) and by model events; the
state of the server (queues, loaded models, cache tiers, build) is read when scraped, by
``StateCollector``, so it costs a request nothing. docs/metrics.md lists every metric.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from inferno.kernel import KernelHandle

#: Seconds: request duration, time to first token, generation, queue wait.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)
#: Seconds between two tokens of one generation: much shorter than a request.
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Seconds a model load takes: from a small ONNX file to a large GGUF off a slow disk.
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: ``ApiError`` codes of refused credentials and permissions, counted from zero.
AUTH_REASONS = ("missing_credentials", "invalid_credentials", "permission_denied",
                "model_not_allowed", "address_denied")
#: Stages of ``model.failed`` events (plugins/models/events.py).
LOAD_STAGES = ("load", "verify", "swap", "rollback")


class Metrics:
    """The registry and the instruments the middlewares move."""

    def __init__(self, latency_buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry, latency = self.registry, tuple(latency_buckets)
        self.http_requests = Counter(
            "inferno_http_requests", "HTTP requests answered, by matched route, method and "
            "status", ["route", "method", "status"], registry=registry)
        self.http_duration = Histogram(
            "inferno_http_request_duration_seconds", "Seconds from an HTTP request's arrival "
            "to the end of its response (streams included)", ["route", "method"],
            buckets=latency, registry=registry)
        self.requests = Counter(
            "inferno_requests", "Gateway calls of every protocol, by outcome",
            ["operation", "model", "protocol", "outcome"], registry=registry)
        self.request_duration = Histogram(
            "inferno_request_duration_seconds", "Seconds from a gateway call's arrival to its "
            "reply's end", ["operation", "model"], buckets=latency, registry=registry)
        self.first_token = Histogram(
            "inferno_time_to_first_token_seconds", "Seconds from a generation's admission to "
            "its first token", ["model"], buckets=latency, registry=registry)
        self.inter_token = Histogram(
            "inferno_inter_token_latency_seconds", "Mean seconds between two tokens of a "
            "generation", ["model"], buckets=TOKEN_GAP_BUCKETS, registry=registry)
        self.generation = Histogram(
            "inferno_generation_duration_seconds", "Seconds from a generation's admission to "
            "its last token", ["model"], buckets=latency, registry=registry)
        self.queue_wait = Histogram(
            "inferno_queue_wait_seconds", "Seconds a request waited in its model's queue",
            ["model"], buckets=latency, registry=registry)
        self.load = Histogram(
            "inferno_model_load_seconds", "Seconds a model took to load", ["model"],
            buckets=LOAD_BUCKETS, registry=registry)
        self.load_failures = Counter(
            "inferno_model_load_failures", "Model loads, checks, swaps and rollbacks that "
            "failed", ["model", "stage"], registry=registry)
        self.prompt_tokens = Counter(
            "inferno_prompt_tokens", "Prompt tokens a model processed", ["model"],
            registry=registry)
        self.completion_tokens = Counter(
            "inferno_completion_tokens", "Tokens a model generated", ["model"],
            registry=registry)
        self.model_runs = Counter(
            "inferno_model_runs", "Calls a model ran for (not answered from the cache)",
            ["model", "operation"], registry=registry)
        self.rate_limited = Counter(
            "inferno_rate_limit_rejections", "Calls refused by rate limits (429)",
            registry=registry)
        self.auth_failures = Counter(
            "inferno_auth_failures", "Calls refused for their credentials or permissions, by "
            "error code", ["reason"], registry=registry)
        for reason in AUTH_REASONS:
            self.auth_failures.labels(reason)
        #: Labelled children already made: ``labels()`` validates and locks on every call
        #: (about 2.5 µs), a dictionary look-up is 30 times cheaper. Label values are
        #: bounded, so this stays small.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, made once."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class StateCollector(Collector):
    """What the server holds right now, read at scrape time: build, queues, loaded models
    and their memory, cache tiers. A service that is not offered (no cache configured, the
    gateway not started yet) leaves its metrics out."""

    def __init__(self, kernel: KernelHandle) -> None:
        self.kernel = kernel
        self.version = _version()

    def describe(self) -> list[Metric]:
        return []  # the names depend on which services run: nothing to check up front

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily("inferno_build_info", "Inferno's version (always 1)",
                                  labels=["version"])
        build.add_metric([self.version], 1)
        yield build
        status = self._gateway_status()
        if status is not None:
            yield from _gateway_metrics(status)
        stats = self._cache_stats()
        if stats is not None:
            yield from _cache_metrics(stats)

    def _gateway_status(self) -> Mapping[str, Any] | None:
        try:
            gateway = self.kernel.service("gateway")
        except LookupError:
            return None
        return gateway.status()  # type: ignore[no-any-return]

    def _cache_stats(self) -> Mapping[str, Mapping[str, int]] | None:
        try:
            cache = self.kernel.service("cache")
        except LookupError:
            return None
        return cache.stats()  # type: ignore[no-any-return]


def _gateway_metrics(status: Mapping[str, Any]) -> Iterator[Metric]:
    inflight = GaugeMetricFamily(
        "inferno_inflight_requests", "Requests a model's queue holds: running or waiting "
        "(an embedding batch counts once)", labels=["model"])
    depth = GaugeMetricFamily("inferno_queue_depth", "Requests waiting for their model's "
                              "turn", labels=["model"])
    for model, queue in status.get("queues", {}).items():
        inflight.add_metric([model], int(queue["running"]) + int(queue["waiting"]))
        depth.add_metric([model], int(queue["waiting"]))
    loaded = list(status.get("loaded", ()))
    count = GaugeMetricFamily("inferno_models_loaded", "Models loaded now", len(loaded))
    memory = GaugeMetricFamily("inferno_model_memory_bytes", "Memory a loaded model holds",
                               labels=["model"])
    for row in loaded:
        memory.add_metric([row["name"]], int(row.get("memory_bytes") or 0))
    yield from (inflight, depth, count, memory)
    yield from _batching_metrics({row["name"]: row["batching"] for row in loaded
                                  if row.get("batching")})


#: A batching model's figures: (metric, help, key in its ``batching`` status).
_BATCH_GAUGES = (("inferno_batch_slots", "Sequence slots a batching model decodes together",
                  "slots"),
                 ("inferno_batch_slots_busy", "Slots running a request now", "slots_busy"),
                 ("inferno_batch_waiting", "Requests handed to the model, waiting for a slot "
                                           "(or for room in its KV cache)", "waiting"))
_BATCH_COUNTERS = (("inferno_batch_steps", "Batched decode steps", "steps"),
                   ("inferno_batch_prompt_tokens", "Prompt tokens of requests started",
                    "prompt_tokens"),
                   ("inferno_batch_cached_prompt_tokens", "Prompt tokens whose KV cache was "
                                                          "reused, not evaluated",
                    "cached_prompt_tokens"))
_BATCH_HISTOGRAMS = (("inferno_batch_sequences_per_step", "Sequences decoded in one step",
                      "sequences_per_step"),
                     ("inferno_batch_tokens_per_step", "Tokens decoded in one step (one per "
                                                       "generating sequence, plus prompt "
                                                       "chunks)", "tokens_per_step"))


def _batching_metrics(models: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    if not models:
        return
    for name, text, key in _BATCH_GAUGES:
        gauge = GaugeMetricFamily(name, text, labels=["model"])
        for model, stats in models.items():
            gauge.add_metric([model], int(stats[key]))
        yield gauge
    for name, text, key in _BATCH_COUNTERS:
        counter = CounterMetricFamily(name, text, labels=["model"])
        for model, stats in models.items():
            counter.add_metric([model], int(stats[key]))
        yield counter
    for name, text, key in _BATCH_HISTOGRAMS:
        histogram = HistogramMetricFamily(name, text, labels=["model"])
        for model, stats in models.items():
            figures = stats[key]
            cumulative, buckets = 0, []
            for bound, count in zip([*figures["bounds"], "+Inf"], figures["counts"],
                                    strict=True):
                cumulative += count
                buckets.append((str(bound), cumulative))
            histogram.add_metric([model], buckets, sum_value=figures["sum"])
        yield histogram


def _cache_metrics(stats: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    families = {
        "hits": CounterMetricFamily("inferno_cache_hits", "Lookups a cache tier answered",
                                    labels=["tier"]),
        "misses": CounterMetricFamily("inferno_cache_misses", "Lookups a cache tier could "
                                      "not answer", labels=["tier"]),
        "evictions": CounterMetricFamily("inferno_cache_evictions", "Entries a cache tier "
                                         "dropped to make room or on expiry", labels=["tier"]),
        "bytes": GaugeMetricFamily("inferno_cache_bytes", "Bytes a cache tier holds",
                                   labels=["tier"]),
        "entries": GaugeMetricFamily("inferno_cache_entries", "Entries a cache tier holds",
                                     labels=["tier"]),
    }
    for tier, values in sorted(stats.items()):
        for key, family in families.items():
            family.add_metric([str(tier)], int(values.get(key, 0)))
    yield from families.values()


def process_collector(registry: CollectorRegistry) -> ProcessCollector:
    """CPU seconds, resident and virtual memory, open and maximum file descriptors and the
    start time of this process, as ``inferno_process_*``."""
    return ProcessCollector(namespace="inferno", registry=registry)


def _version() -> str:
    try:
        return version("inferno")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"
