"""Inferno's own HTTP API, health checks, request ids, backpressure and the transport options
(CORS, TLS, a unix socket, the concurrency limit), against real servers on loopback."""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import json
import logging
import re
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from inferno.kernel.logs import configure_logging
from tests.model_files import write_garbage, write_tiny_gguf
from tests.servers import ServerThread

MINILM = "minilm"
#: A long generation from the tiny model: its end-of-sequence token (</s>, id 2) is banned.
LONG = {"model": "tiny", "prompt": "hello", "max_tokens": 4000, "logit_bias": {"2": -100},
        "stream": True}


async def fetch(method: str, url: str, **kwargs: Any) -> tuple[int, Any, Any]:
    """``(status, JSON body, headers)`` of one request."""
    async with aiohttp.ClientSession() as session, \
            session.request(method, url, **kwargs) as response:
        return response.status, await response.json(content_type=None), response.headers


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context_length=4096)


def tiny_server(tmp_path_factory: pytest.TempPathFactory, tiny: Path, *sets: str
                ) -> ServerThread:
    return ServerThread("edge", tmp_path_factory.mktemp("data"), sets=[
        f'plugins.models.entries.tiny.path="{tiny}"', *sets])


# --------------------------------------------------------------------------- models


async def test_the_model_list_names_every_registered_model_and_its_state(
        edge_server: Any) -> None:
    status, body, _ = await fetch("GET", edge_server.url + "/api/v1/models")
    assert status == 200
    models = {row["name"]: row for row in body["models"]}
    assert set(models) == {"gemma-3-270m", MINILM}
    assert models[MINILM]["aliases"] == ["all-minilm-l6-v2"]
    assert models[MINILM]["unavailable"] is None
    assert isinstance(models[MINILM]["loaded"], bool)


async def test_a_model_not_loaded_shows_its_file_by_name_or_alias(edge_server: Any) -> None:
    await fetch("POST", edge_server.url + f"/api/v1/models/{MINILM}/unload")
    status, body, _ = await fetch("GET", edge_server.url + "/api/v1/models/all-minilm-l6-v2")
    assert status == 200
    assert (body["name"], body["loaded"], body["format"]) == (MINILM, False, "onnx")
    assert body["size"] > 1_000_000


async def test_an_unknown_model_is_404_in_the_error_envelope(edge_server: Any) -> None:
    for method, path in (("GET", ""), ("POST", "/load"), ("POST", "/unload"),
                         ("POST", "/rollback")):
        status, body, _ = await fetch(method, edge_server.url + "/api/v1/models/nope" + path)
        assert status == 404, path
        assert body["error"]["code"] == "model_not_found"
        assert "nope" in body["error"]["message"]


async def test_load_status_and_unload_of_a_model(edge_server: Any) -> None:
    url = edge_server.url + f"/api/v1/models/{MINILM}"
    status, loaded, _ = await fetch("POST", url + "/load", json={"keep_alive": "10m"})
    assert status == 200
    assert (loaded["name"], loaded["loaded"]) == (MINILM, True)
    _, details, _ = await fetch("GET", url)
    assert details["loaded"] is True
    assert details["info"]["format"] == "onnx"
    _, server_status, _ = await fetch("GET", edge_server.url + "/api/v1/status")
    row = next(r for r in server_status["loaded"] if r["name"] == MINILM)
    assert row["memory_bytes"] > 1_000_000
    assert row["keep_alive"] == 600
    assert (await fetch("POST", url + "/unload"))[1] == {"name": MINILM, "unloaded": True}
    assert (await fetch("POST", url + "/unload"))[1] == {"name": MINILM, "unloaded": False}
    _, server_status, _ = await fetch("GET", edge_server.url + "/api/v1/status")
    assert MINILM not in [r["name"] for r in server_status["loaded"]]


@pytest.mark.parametrize(("body", "param"), [
    ({"keep_alive": "forever"}, "keep_alive"), ({"keepalive": 5}, "keepalive"),
    ([1, 2], None)])
async def test_a_bad_load_body_is_refused_before_anything_loads(
        edge_server: Any, body: Any, param: str | None) -> None:
    await fetch("POST", edge_server.url + f"/api/v1/models/{MINILM}/unload")
    status, error, _ = await fetch("POST", edge_server.url + f"/api/v1/models/{MINILM}/load",
                                   json=body)
    assert status == 400
    assert error["error"]["param"] == param
    assert (await fetch("GET", edge_server.url + f"/api/v1/models/{MINILM}"))[1][
        "loaded"] is False


async def test_rolling_back_a_model_without_a_previous_version_is_a_conflict(
        edge_server: Any) -> None:
    loaded, _, _ = await fetch("POST", edge_server.url + f"/api/v1/models/{MINILM}/load")
    assert loaded == 200
    status, body, _ = await fetch("POST", edge_server.url + f"/api/v1/models/{MINILM}/rollback")
    assert status == 409
    assert body["error"]["code"] == "rollback_unavailable"
    assert "has no previous version" in body["error"]["message"]


async def test_status_reports_version_uptime_and_queues(edge_server: Any) -> None:
    status, _, _ = await fetch("POST", edge_server.url + "/v1/embeddings",
                               json={"model": MINILM, "input": "hello"})
    assert status == 200
    _, body, _ = await fetch("GET", edge_server.url + "/api/v1/status")
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", body["version"])
    assert body["state"] == "running"
    assert body["uptime_seconds"] > 0
    queue = body["queues"][MINILM]
    assert queue["served"] >= 1
    assert queue["waiting"] == 0
    assert queue["wait_seconds_total"] >= 0


# --------------------------------------------------------------------------- health


async def test_liveness_and_readiness_of_a_running_server(edge_server: Any) -> None:
    assert (await fetch("GET", edge_server.url + "/health/live"))[:2] == (
        200, {"status": "live"})
    status, body, _ = await fetch("GET", edge_server.url + "/health/ready")
    assert (status, body["status"], body["reasons"]) == (200, "ready", [])


async def test_readiness_is_503_with_the_reason_when_a_preloaded_model_failed(
        tmp_path: Path) -> None:
    broken = write_garbage(tmp_path / "broken.gguf", 4096)
    with ServerThread("edge", tmp_path / "data", sets=[
            f'plugins.models.entries.broken.path="{broken}"',
            "plugins.models.entries.broken.preload=true"]) as server:
        status, body, _ = await fetch("GET", server.url + "/health/ready")
        assert status == 503
        assert body["status"] == "not_ready"
        assert body["state"] == "running"
        assert "broken" in body["preload_failures"]
        assert any("'broken' failed to preload" in reason for reason in body["reasons"])
        assert (await fetch("GET", server.url + "/health/live"))[0] == 200


async def test_readiness_is_503_while_draining(tmp_path: Path, gemma_path: Path) -> None:
    """Shutdown begins while a model load is in flight; it waits for the load (the drain),
    and readiness says so meanwhile."""
    from inferno.kernel.events import KernelStateChanged
    from inferno.plugins.models.events import ModelLoading

    with ServerThread("edge", tmp_path / "data") as server:
        kernel = server.kernel
        draining = threading.Event()
        stops: list[asyncio.Future[None]] = []

        async def stop_when_loading() -> None:
            kernel.bus.subscribe(ModelLoading, lambda _: stops.append(asyncio.ensure_future(
                kernel.stop("a test drains the server"))))
            kernel.bus.subscribe(KernelStateChanged, lambda event: draining.set()
                                 if event.state == "stopping" else None)

        async def stopped() -> None:
            await stops[0]

        server.run(stop_when_loading())
        loading = asyncio.ensure_future(
            fetch("POST", server.url + "/api/v1/models/gemma-3-270m/load"))
        assert await asyncio.to_thread(draining.wait, 60)
        status, body, _ = await fetch("GET", server.url + "/health/ready")
        assert status == 503
        assert body["state"] == "stopping"
        assert body["reasons"] == ["Inferno is stopping, not running"]
        assert (await loading)[0] == 200
        await asyncio.to_thread(server.run, stopped())


# --------------------------------------------------------------------------- request ids


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Logging as the CLI sets it up, in JSON lines, read back as dicts."""
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    configure_logging("console", "warning")  # leave the process as the CLI would
    logging.getLogger().handlers.clear()


async def test_a_request_id_is_echoed_and_bound_into_the_requests_log_lines(
        edge_server: Any, log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    await fetch("POST", edge_server.url + f"/api/v1/models/{MINILM}/unload")
    status, _, headers = await fetch("POST", edge_server.url + f"/api/v1/models/{MINILM}/load",
                                     headers={"X-Request-ID": "load-7f3a"})
    assert status == 200
    assert headers["X-Request-ID"] == "load-7f3a"
    lines = log_lines()
    loaded = [line for line in lines if line["event"] == "model loaded"]
    assert {line["plugin"] for line in loaded} == {"onnx", "models"}
    assert all(line["request_id"] == "load-7f3a" for line in loaded)
    assert all(line["path"] == f"/api/v1/models/{MINILM}/load" for line in loaded)


@pytest.mark.parametrize("sent", [None, "has spaces", "x" * 200, "ünïcode"])
async def test_a_missing_or_invalid_request_id_is_replaced_by_a_generated_one(
        edge_server: Any, sent: str | None) -> None:
    headers = {"X-Request-ID": sent} if sent is not None else {}
    _, _, first = await fetch("GET", edge_server.url + "/api/v1/models/nope", headers=headers)
    _, _, second = await fetch("GET", edge_server.url + "/api/v1/status", headers=headers)
    assert re.fullmatch(r"[0-9a-f]{32}", first["X-Request-ID"])
    assert first["X-Request-ID"] != second["X-Request-ID"]


# --------------------------------------------------------------------------- backpressure


@pytest.fixture
def queued_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
                  ) -> Iterator[ServerThread]:
    """One request per model at a time, one waiting; keep-alive lines every 0.2 s. A server
    per test: a closed stream frees its turn a moment later, not before the next test."""
    with tiny_server(tmp_path_factory, tiny_model, "plugins.gateway.queue_limit=1",
                     "plugins.gateway.concurrency=1", "backends.gguf.parallel=1",
                     "protocols.http.stream_keepalive=0.2") as server:
        yield server


@asynccontextmanager
async def streaming(session: aiohttp.ClientSession, url: str, body: dict[str, Any]
                    ) -> AsyncIterator[aiohttp.ClientResponse]:
    """A stream whose headers arrived; leaving closes it, which cancels the generation."""
    async with session.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200
        yield response


async def queue_of(server: ServerThread) -> dict[str, Any]:
    queues = (await fetch("GET", server.url + "/api/v1/status"))[1]["queues"]
    return queues.get("tiny", {"running": 0, "waiting": 0})


async def test_a_full_queue_answers_503_with_retry_after_and_waits_are_measured(
        queued_server: ServerThread) -> None:
    url = queued_server.url
    async with aiohttp.ClientSession() as first, aiohttp.ClientSession() as second, \
            streaming(first, url, LONG) as running:
        await running.content.readuntil(b"\n\n")  # generating: it holds the model's turn
        # Its headers come after stream_keepalive: by then it has its place in the queue.
        async with streaming(second, url, LONG) as waiting:
            status, body, headers = await fetch("POST", url + "/v1/completions", json=LONG)
            assert status == 503
            assert body["error"]["code"] == "queue_full"
            assert int(headers["Retry-After"]) >= 1
            queue = await queue_of(queued_server)
            assert (queue["running"], queue["waiting"], queue["refused"]) == (1, 1, 1)
            running.close()
            await waiting.content.readuntil(b"data: ")  # its turn came: tokens flow
            queue = await queue_of(queued_server)
    assert queue["waiting"] == 0
    assert queue["last_wait_seconds"] > 0.2
    assert queue["wait_seconds_total"] >= queue["last_wait_seconds"]


async def test_a_stream_waiting_in_the_queue_gets_keep_alive_lines(
        queued_server: ServerThread) -> None:
    url = queued_server.url
    async with aiohttp.ClientSession() as first, aiohttp.ClientSession() as second, \
            streaming(first, url, LONG) as running:
        await running.content.readuntil(b"\n\n")
        async with streaming(second, url, {**LONG, "max_tokens": 2}) as waiting:
            head = await waiting.content.readexactly(len(b": keep-alive\n\n") * 2)
            assert head == b": keep-alive\n\n" * 2
            running.close()
            rest = (await waiting.content.read()).decode()
    events = [line for line in rest.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in events[-2]


async def test_more_requests_than_max_concurrent_get_503_but_health_checks_pass(
        tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> None:
    with tiny_server(tmp_path_factory, tiny_model, "protocols.http.max_concurrent=1") as server:
        async with aiohttp.ClientSession() as session, \
                streaming(session, server.url, LONG) as running:
            await running.content.readuntil(b"\n\n")
            status, body, headers = await fetch("GET", server.url + "/api/v1/models")
            assert status == 503
            assert body["error"]["code"] == "server_busy"
            assert headers["Retry-After"] == "1"
            assert (await fetch("GET", server.url + "/health/live"))[0] == 200
            assert (await fetch("GET", server.url + "/health/ready"))[0] == 200
            # a header alone does not make a request long-lived (exempt from the limit)
            upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
            assert (await fetch("GET", server.url + "/api/v1/models", headers=upgrade))[0] \
                == 503


# --------------------------------------------------------------------------- transports


async def test_cors_answers_preflights_from_the_configured_origin_only(tmp_path: Path) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    with ServerThread("edge", tmp_path, sets=[
            'protocols.http.cors_origins=["https://app.example"]']) as server:
        url = server.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            async with session.options(url, headers={
                    "Origin": "https://app.example", **preflight}) as allowed:
                assert allowed.status == 200
                assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
                assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
            async with session.options(url, headers={
                    "Origin": "https://evil.example", **preflight}) as refused:
                assert "Access-Control-Allow-Origin" not in refused.headers
            async with session.get(server.url + "/api/v1/status",
                                   headers={"Origin": "https://app.example"}) as simple:
                assert simple.headers["Access-Control-Allow-Origin"] == "https://app.example"
                assert simple.headers["Access-Control-Allow-Credentials"] == "true"


async def test_any_origin_never_gets_credentials(tmp_path: Path) -> None:
    with ServerThread("edge", tmp_path, sets=['protocols.http.cors_origins=["*"]']) as server:
        async with aiohttp.ClientSession() as session, session.get(
                server.url + "/api/v1/status", headers={"Origin": "https://any.example"}
        ) as response:
            assert response.status == 200
            assert "Access-Control-Allow-Credentials" not in response.headers


async def test_pages_of_other_sites_cannot_use_a_local_server(edge_server: Any) -> None:
    """A web page may POST text/plain to 127.0.0.1 without a preflight: the Origin header
    is what gives it away."""
    body = '{"model": "minilm", "input": "hi"}'
    plain = {"Content-Type": "text/plain"}
    url = edge_server.url
    status, answer, _ = await fetch("POST", url + "/v1/embeddings", data=body,
                                    headers={**plain, "Origin": "https://evil.example"})
    assert (status, answer["error"]["code"]) == (403, "origin_not_allowed")
    assert "protocols.http.cors_origins" in answer["error"]["message"]
    status, _, _ = await fetch("POST", url + f"/api/v1/models/{MINILM}/unload",
                               headers={"Origin": "https://evil.example"})
    assert status == 403
    assert (await fetch("POST", url + "/v1/embeddings", data=body, headers=plain))[0] == 200
    same = {**plain, "Origin": url}  # the server's own pages (a dashboard) may
    assert (await fetch("POST", url + "/v1/embeddings", data=body, headers=same))[0] == 200


def write_self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    cert, private = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, private


async def test_tls_serves_https_with_the_configured_certificate(tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path)
    with ServerThread("edge", tmp_path / "data", sets=[
            f'protocols.http.tls_cert="{cert}"', f'protocols.http.tls_key="{key}"']) as server:
        assert server.url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(cert))
        status, body, _ = await fetch("GET", server.url + "/health/live", ssl=trusting)
        assert (status, body) == (200, {"status": "live"})
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await fetch("GET", server.url + "/health/live")  # the system's CAs do not know it


async def test_the_api_answers_on_a_unix_socket_beside_tcp(tmp_path: Path) -> None:
    socket = tmp_path / "inferno.sock"
    with ServerThread("edge", tmp_path / "data", sets=[
            f'protocols.http.unix_socket="{socket}"']) as server:
        assert socket.is_socket()
        connector = aiohttp.UnixConnector(str(socket))
        async with aiohttp.ClientSession(connector=connector) as client, \
                client.get("http://inferno/api/v1/models") as response:
            assert response.status == 200
            names = [row["name"] for row in (await response.json())["models"]]
        assert "minilm" in names
        assert (await fetch("GET", server.url + "/health/live"))[0] == 200
    assert not socket.exists()
