"""The ``prometheus`` exporter's exposition: valid for promtool, documented metric by metric,
bounded labels, one registry per kernel; and the dashboard and alert rules built on it."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferno.kernel import ConfigError
from inferno.plugins.exporters.prom_metrics import StateCollector
from inferno.plugins.gateway.calls import Call
from tests.model_files import write_tiny_gguf
from tests.servers import ServerThread

REPO = Path(__file__).resolve().parent.parent
PROMTOOL = "/usr/bin/promtool"
ALERTS = REPO / "contrib" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "inferno.json"
#: What a client writes: it must never become a label value.
USER_STRING = "x-user-supplied-name"
ENABLED = 'exporters.prometheus.path="/metrics"'
#: A response cache tier in memory.
CACHED = "cache.memory.max_entries=100"
CACHE_METRICS = {"inferno_cache_hits_total", "inferno_cache_misses_total",
                 "inferno_cache_evictions_total", "inferno_cache_bytes", "inferno_cache_entries"}

# --------------------------------------------------------------------------- reading metrics


def documented() -> dict[str, tuple[str, set[str]]]:
    """``{name: (type, label names)}`` from the tables of docs/metrics.md."""
    rows = re.findall(r"^\| `(inferno_\w+)` \| (counter|gauge|histogram) \|[^|]*\|([^|]*)\|",
                      (REPO / "docs" / "metrics.md").read_text(), flags=re.MULTILINE)
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def families(text: str) -> dict[str, Any]:
    """Metric families of an exposition by the name a query uses (counters with ``_total``),
    without the ``_created`` series prometheus_client writes beside counters and
    histograms (the text format has no place for them in their family)."""
    found = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        found[name] = family
    return {name: family for name, family in found.items()
            if not (name.endswith("_created") and _created_of(name, found))}


def _created_of(name: str, found: dict[str, Any]) -> bool:
    base = name.removesuffix("_created")
    return base + "_total" in found or (found.get(base) is not None and \
        found[base].type == "histogram")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` of an exposition."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return scraped.get((name, frozenset(labels.items())), 0.0)


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


# --------------------------------------------------------------------------- a scraped server


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """What a server with the exporter (and a memory cache tier) serves after embeddings,
    completions (one streamed), and requests naming a model, a route and a method a client
    made up."""
    tiny = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context_length=4096)
    sets = [f'plugins.models.entries.tiny.path="{tiny}"', ENABLED, CACHED]
    with ServerThread("edge", tmp_path_factory.mktemp("data"), sets=sets) as server:
        yield asyncio.run(_traffic(server.url))


async def _traffic(url: str) -> str:
    async with aiohttp.ClientSession() as session:
        for path, body in (
                ("/v1/embeddings", {"model": "minilm", "input": "hello"}),
                ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4}),
                ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4,
                                     "stream": True}),
                ("/v1/embeddings", {"model": USER_STRING, "input": "hello"}),
                ("/v1/chat/completions", {"model": USER_STRING, "messages": [
                    {"role": "user", "content": "hi"}]}),
                ("/api/v1/models/" + USER_STRING, None),
                ("/" + USER_STRING, None)):
            method = "POST" if body is not None else "GET"
            async with session.request(method, url + path, json=body) as response:
                await response.read()
        async with session.request("PROPFIND", url + "/v1/models") as response:
            await response.read()
        async with session.get(url + "/metrics") as response:
            assert response.status == 200
            return await response.text()


def test_the_exposition_passes_promtool(scraped: str) -> None:
    checked = promtool("check", "metrics", stdin=scraped)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert not (checked.stdout + checked.stderr).strip()


def test_every_metric_served_is_documented_with_its_type_and_labels(scraped: str) -> None:
    docs = documented()
    for name, family in families(scraped).items():
        assert name in docs, f"{name} is served but not in docs/metrics.md"
        kind, labels = docs[name]
        assert family.type == kind, name
        served = {label for sample in family.samples for label in sample.labels} - {"le"}
        assert served <= labels, f"{name} has undocumented labels {served - labels}"


def test_every_documented_metric_is_served(scraped: str) -> None:
    missing = set(documented()) - set(families(scraped))
    assert not missing


def test_no_label_carries_what_a_client_wrote(scraped: str) -> None:
    values = [label for (_, labels) in samples(scraped) for _, label in labels]
    assert values
    assert not [v for v in values if USER_STRING in v.lower()]


def test_a_model_a_client_made_up_is_counted_without_a_model(scraped: str) -> None:
    found = samples(scraped)
    assert value(found, "inferno_requests_total", operation="embeddings", model="",
                 protocol="http", outcome="client_error") == 1
    assert value(found, "inferno_requests_total", operation="chat", model="",
                 protocol="http", outcome="client_error") == 1
    assert value(found, "inferno_http_requests_total", route="unmatched", method="GET",
                 status="404") == 1
    assert value(found, "inferno_http_requests_total", route="unmatched", method="other",
                 status="405") == 1


def test_the_build_and_the_process_are_described(scraped: str) -> None:
    found = families(scraped)
    assert found["inferno_build_info"].samples[0].labels["version"]
    assert found["inferno_process_open_fds"].samples[0].value > 0
    assert found["inferno_process_resident_memory_bytes"].samples[0].value > 0


# --------------------------------------------------------------------------- kernels


async def test_each_kernel_counts_in_a_registry_of_its_own(make_kernel: Any) -> None:
    first = make_kernel({"exporters": {"prometheus": {}}}, base="edge")
    second = make_kernel({"exporters": {"prometheus": {}}}, base="edge")
    async with first.running(protocols=False), second.running(protocols=False):
        for _ in range(3):
            await first.service("gateway").run(Call("models.list", protocol="stdin"))
        await second.service("gateway").run(Call("models.list", protocol="websocket"))
        counts = [samples(prometheus_client.generate_latest(k.service("metrics").registry)
                          .decode()) for k in (first, second)]
    ok = {"operation": "models.list", "model": "", "outcome": "ok"}
    assert value(counts[0], "inferno_requests_total", protocol="stdin", **ok) == 3
    assert value(counts[1], "inferno_requests_total", protocol="stdin", **ok) == 0
    assert value(counts[1], "inferno_requests_total", protocol="websocket", **ok) == 1
    assert prometheus_client.REGISTRY.get_sample_value(
        "inferno_requests_total", {"protocol": "stdin", **ok}) is None


def test_bad_settings_are_refused_each_with_its_key(make_kernel: Any) -> None:
    with pytest.raises(ConfigError) as refused:
        make_kernel({"exporters": {"prometheus": {"path": "metrics", "port": 70000,
                                                  "latency_buckets": [1, 0.5]}}})
    keys = {problem.key for problem in refused.value.problems}
    assert {"exporters.prometheus.path", "exporters.prometheus.port",
            "exporters.prometheus.latency_buckets"} <= keys


class _Services:
    """A kernel as the collector sees it: the services it offers, by name."""

    def __init__(self, **services: Any) -> None:
        self.services = services

    def service(self, name: str) -> Any:
        if name not in self.services:
            raise LookupError(name)
        return self.services[name]


class _Cache:
    def stats(self) -> dict[str, dict[str, int]]:
        return {"memory": {"hits": 3, "misses": 1, "evictions": 2, "bytes": 2048, "entries": 5},
                "disk": {"hits": 0, "misses": 4, "evictions": 0, "bytes": 0, "entries": 0}}


def test_cache_tiers_are_read_from_the_cache_service_at_scrape_time() -> None:
    registry = prometheus_client.CollectorRegistry()
    registry.register(StateCollector(_Services(cache=_Cache())))  # type: ignore[arg-type]
    found = samples(prometheus_client.generate_latest(registry).decode())
    assert value(found, "inferno_cache_hits_total", tier="memory") == 3
    assert value(found, "inferno_cache_misses_total", tier="disk") == 4
    assert value(found, "inferno_cache_evictions_total", tier="memory") == 2
    assert value(found, "inferno_cache_bytes", tier="memory") == 2048
    assert value(found, "inferno_cache_entries", tier="memory") == 5


# --------------------------------------------------------------------------- contrib


def test_the_alert_rules_pass_promtool() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout


def used_metrics(text: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", name)
            for name in re.findall(r"\binferno_\w+", text)}


@pytest.mark.parametrize("path", [ALERTS, DASHBOARD], ids=["alerts", "dashboard"])
def test_contrib_files_query_only_documented_metrics(path: Path) -> None:
    used = used_metrics(path.read_text())
    assert used
    assert used <= set(documented()), used - set(documented())


def test_the_alerts_cover_first_tokens_errors_queues_and_load_failures() -> None:
    text = ALERTS.read_text()
    assert re.search(r"inferno_time_to_first_token_seconds_bucket[^\n]*\n\s*\) > 2\b", text)
    assert re.search(r'outcome="server_error"[\s\S]*?> 0\.05', text)
    assert re.search(r"inferno_queue_depth\) > \d+", text)
    assert "inferno_model_load_failures_total" in text


def test_the_dashboard_reads_a_prometheus_input_and_shows_each_topic() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {p["datasource"]["uid"] for p in panels} == {"${DS_PROMETHEUS}"}
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert "sum by (status) (rate(inferno_http_requests_total" in exprs
    assert {"inferno_request_duration_seconds", "inferno_time_to_first_token_seconds",
            "inferno_completion_tokens_total", "inferno_queue_depth",
            "inferno_cache_hits_total", "inferno_model_memory_bytes",
            "inferno_auth_failures_total", "inferno_rate_limit_rejections_total"
            } <= used_metrics(exprs)
