"""Every route of the running server against every kind of caller: no credential, a wrong,
revoked or expired key, a key whose role lacks the permission, and a good key; then the
WebSocket and stdin protocols under the same rules."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from inferno.kernel import Principal
from inferno.plugins.auth.keystore import KeyStore
from inferno.plugins.gateway.permissions import PUBLIC, declared
from inferno.plugins.security.roles import Roles
from tests.servers import ServerThread

from .conftest import INFERNO

HI = [{"role": "user", "content": "hi"}]
#: A body each POST route accepts, so that a caller who may use it gets past validation.
BODIES: dict[str, Any] = {
    "/v1/chat/completions": {"model": "minilm", "messages": HI, "max_tokens": 1},
    "/v1/completions": {"model": "minilm", "prompt": "hi", "max_tokens": 1},
    "/v1/embeddings": {"model": "minilm", "input": "hi"},
    "/api/generate": {"model": "minilm", "prompt": "hi", "stream": False},
    "/api/chat": {"model": "minilm", "messages": HI, "stream": False},
    "/api/embed": {"model": "minilm", "input": "hi"},
    "/api/embeddings": {"model": "minilm", "prompt": "hi"},
    "/api/show": {"model": "minilm"},
    "/api/v1/keys": {"name": "made-by-the-matrix", "roles": ["viewer"]},
}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, dict]]:
    """The edge profile with API keys only (no anonymous callers), and one key of each kind."""
    folder = tmp_path_factory.mktemp("secured")
    store_path = folder / "keys.sqlite"
    store = KeyStore(store_path)
    keys = {}
    _, keys["admin"] = store.create("admin", roles=["admin"])
    _, keys["viewer"] = store.create("viewer", roles=["viewer"])
    _, keys["scoped"] = store.create("scoped", roles=["user"], models=["gemma-3-270m"])
    _, keys["expired"] = store.create("expired", roles=["admin"], expires_at=time.time() - 5)
    _, keys["revoked"] = store.create("revoked", roles=["admin"])
    store.revoke("revoked")
    keys["unknown"] = "inf_" + "0" * 12 + "_" + "1" * 64
    sets = ["auth.none.enabled=false", f'auth.api_key.store="{store_path}"',
            "protocols.websocket.share_http=true"]
    with ServerThread("edge", folder / "data", sets=sets) as server:
        server.store = store  # type: ignore[attr-defined]
        yield server, keys
    store.close()


def concrete(path: str) -> str:
    return path.replace("{name}", "minilm").replace("{id}", "minilm")


async def call(method: str, url: str, key: str | None = None, *, header: str = "bearer",
               body: Any = None) -> tuple[int, Any]:
    headers = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {key}"} if header == "bearer" \
            else {"X-API-Key": key}
    async with aiohttp.ClientSession() as session, \
            session.request(method, url, headers=headers, json=body) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text  # /metrics answers in Prometheus' text format


def needs(route: Any, gateway: Any) -> set[str]:
    operations, permission = declared(route.handler)
    return {gateway.permissions[op] for op in operations} if operations else {permission}


async def test_every_route_answers_each_kind_of_caller_as_its_permission_says(
        secured: tuple[ServerThread, dict]) -> None:
    server, keys = secured
    gateway = server.service("gateway")
    app = server.kernel.drivers("protocols")["http"].app
    roles = Roles({})
    viewer = Principal("viewer", frozenset({"viewer"}))
    routes = [r for r in app.router.routes() if r.method not in ("OPTIONS", "HEAD")]
    wrong: list[str] = []
    for route in routes:
        path = concrete(route.resource.canonical)
        body = BODIES.get(route.resource.canonical) if route.method == "POST" else None
        permissions = needs(route, gateway)
        public = permissions == {PUBLIC}
        viewer_may = all(roles.grants(viewer, p) for p in permissions)
        expected = {
            None: None if public else 401, "unknown": None if public else 401,
            "revoked": None if public else 401, "expired": None if public else 401,
            "viewer": None if public or viewer_may else 403, "admin": None,
        }
        for who, status_wanted in expected.items():
            status, answer = await call(route.method, server.url + path,
                                        keys.get(who) if who else None, body=body)
            if status_wanted is None and status in (401, 403):
                wrong.append(f"{route.method} {path} as {who}: {status} {answer}")
            elif status_wanted is not None and status != status_wanted:
                wrong.append(f"{route.method} {path} as {who}: {status}, not {status_wanted}")
    assert wrong == []
    assert len(routes) > 25


async def test_keys_are_accepted_in_either_header_and_refusals_say_why(
        secured: tuple[ServerThread, dict]) -> None:
    server, keys = secured
    url = server.url + "/v1/models"
    assert (await call("GET", url, keys["viewer"], header="x-api-key"))[0] == 200
    cases = {"revoked": "revoked", "expired": "expired", "unknown": "unknown API key"}
    for who, reason in cases.items():
        status, body = await call("GET", url, keys[who])
        assert status == 401
        assert reason in body["error"]["message"]
        assert keys[who] not in json.dumps(body)
    status, body = await call("GET", url)
    assert status == 401
    assert body["error"]["code"] == "missing_credentials"


async def test_a_key_revoked_by_another_process_fails_at_its_next_request(
        secured: tuple[ServerThread, dict]) -> None:
    server, _ = secured
    _, key = server.store.create("short-lived", roles=["viewer"])  # type: ignore[attr-defined]
    url = server.url + "/v1/models"
    assert (await call("GET", url, key))[0] == 200
    server.store.revoke("short-lived")  # type: ignore[attr-defined]
    assert (await call("GET", url, key))[0] == 401


async def test_a_model_allowlist_limits_what_a_key_sees_and_uses(
        secured: tuple[ServerThread, dict]) -> None:
    server, keys = secured
    status, body = await call("GET", server.url + "/v1/models", keys["scoped"])
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["gemma-3-270m"]
    status, body = await call("POST", server.url + "/v1/embeddings", keys["scoped"],
                              body={"model": "all-minilm-l6-v2", "input": "hi"})
    assert status == 403
    assert body["error"]["code"] == "model_not_allowed"


# --------------------------------------------------------------------------- WebSocket


async def test_the_websocket_needs_a_credential_and_checks_every_message(
        secured: tuple[ServerThread, dict]) -> None:
    server, _ = secured
    endpoint = "ws" + server.url.removeprefix("http") + "/v1/ws"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(endpoint)
        assert refused.value.status == 401
        _, key = server.store.create("socket", roles=["viewer"])  # type: ignore[attr-defined]
        async with session.ws_connect(endpoint, headers={"X-API-Key": key}) as ws:
            await ws.send_json({"type": "ping", "id": 1})
            assert (await ws.receive_json(timeout=10))["type"] == "pong"
            await ws.send_json({"type": "embeddings", "id": 2, "model": "minilm",
                                "input": "hi"})
            denied = await ws.receive_json(timeout=10)
            assert denied["type"] == "error"
            assert denied["error"]["status"] == 403
            await ws.send_json({"type": "subscribe", "id": 3, "topics": ["model.*"]})
            assert (await ws.receive_json(timeout=10))["error"]["status"] == 403
            server.store.revoke("socket")  # type: ignore[attr-defined]
            await ws.send_json({"type": "ping", "id": 4})
            revoked = await ws.receive_json(timeout=10)
            assert revoked["type"] == "error"
            assert revoked["error"]["status"] == 401


# --------------------------------------------------------------------------- stdin


def run_stdin(tmp_path: Path, store: Path, key: str, lines: list[dict]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNO_")}
    env.update({"INFERNO_KERNEL__DATA_DIR": str(tmp_path / "data"),
                "INFERNO_PROTOCOLS__STDIN__KEY": key})
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    done = subprocess.run([str(INFERNO), "--profile", "edge", "--protocol", "stdin",
                           "--set", "auth.none.enabled=false",
                           "--set", f'auth.api_key.store="{store}"'],
                          input=data, capture_output=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert key not in done.stdout.decode() + done.stderr.decode()
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


def test_stdin_lines_carry_the_configured_key_and_a_bad_one_gets_error_lines(
        tmp_path: Path) -> None:
    store_path = tmp_path / "keys.sqlite"
    store = KeyStore(store_path)
    _, good = store.create("pipeline", roles=["user"])
    _, viewer = store.create("looker", roles=["viewer"])
    store.close()
    request = {"id": "a", "type": "embeddings", "model": "minilm", "input": "hi"}
    answered = run_stdin(tmp_path, store_path, good, [request])
    assert answered[0]["type"] == "done"
    assert len(answered[0]["data"][0]["embedding"]) == 384
    wrong = run_stdin(tmp_path, store_path, "inf_" + "0" * 12 + "_" + "1" * 64,
                      [request, {**request, "id": "b"}])
    assert [(line["id"], line["type"], line["error"]["status"]) for line in wrong] == \
        [("a", "error", 401), ("b", "error", 401)]
    denied = run_stdin(tmp_path, store_path, viewer, [request])
    assert denied[0]["error"]["status"] == 403


# --------------------------------------------------------------------------- escalation


async def test_using_a_model_does_not_let_a_key_unload_or_pin_it(
        secured: tuple[ServerThread, dict]) -> None:
    server, keys = secured
    _, user = server.store.create("plain-user", roles=["user"])  # type: ignore[attr-defined]
    for keep_alive in (0, -1, "5m"):
        status, body = await call("POST", server.url + "/v1/embeddings", user, body={
            "model": "minilm", "input": "hi", "keep_alive": keep_alive})
        assert status == 403
        assert body["error"]["param"] == "keep_alive"
    status, _ = await call("POST", server.url + "/v1/embeddings", user,
                           body={"model": "minilm", "input": "hi"})
    assert status == 200
    status, _ = await call("POST", server.url + "/v1/embeddings", keys["admin"], body={
        "model": "minilm", "input": "hi", "keep_alive": "5m"})
    assert status == 200


async def test_a_key_manager_hands_out_no_more_than_it_has(tmp_path: Path) -> None:
    store_path = tmp_path / "keys.sqlite"
    store = KeyStore(store_path)
    _, manager = store.create("manager", roles=["keyadmin", "user"], models=["minilm"])
    store.close()
    sets = ["auth.none.enabled=false", f'auth.api_key.store="{store_path}"',
            'security.roles={keyadmin=["keys:manage"]}']
    with ServerThread("edge", tmp_path / "data", sets=sets) as server:
        url = server.url + "/api/v1/keys"
        admin, body = await call("POST", url, manager, body={"name": "a", "roles": ["admin"],
                                                            "models": ["minilm"]})
        assert admin == 403
        assert "admin" in body["error"]["message"]
        wider, body = await call("POST", url, manager, body={"name": "b", "roles": ["user"],
                                                            "models": ["gemma-3-270m"]})
        assert wider == 403
        assert body["error"]["code"] == "model_not_allowed"
        same, body = await call("POST", url, manager, body={"name": "c", "roles": ["user"],
                                                           "models": ["minilm"]})
        assert same == 201
        assert body["key"].startswith("inf_")


async def test_a_restricted_key_sees_only_its_models_in_the_status(
        secured: tuple[ServerThread, dict]) -> None:
    server, keys = secured
    await call("POST", server.url + "/api/v1/models/minilm/load", keys["admin"])
    _, everything = await call("GET", server.url + "/api/v1/status", keys["admin"])
    _, scoped = await call("GET", server.url + "/api/v1/status", keys["scoped"])
    assert "minilm" in {row["name"] for row in everything["loaded"]}
    assert {row["name"] for row in scoped["loaded"]} <= {"gemma-3-270m"}
    assert set(scoped["queues"]) <= {"gemma-3-270m"}


async def test_a_revoked_subscriber_gets_no_more_events(
        secured: tuple[ServerThread, dict]) -> None:
    import asyncio

    server, keys = secured
    endpoint = "ws" + server.url.removeprefix("http") + "/v1/ws"
    _, key = server.store.create("listener", roles=["operator"])  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(endpoint, headers={"X-API-Key": key}) as ws:
        await ws.send_json({"type": "subscribe", "id": 1, "topics": ["model.*"]})
        assert (await ws.receive_json(timeout=10))["type"] == "subscribed"
        server.store.revoke("listener")  # type: ignore[attr-defined]
        await asyncio.sleep(1.1)  # past the recheck interval
        await call("POST", server.url + "/api/v1/models/minilm/unload", keys["admin"])
        await call("POST", server.url + "/api/v1/models/minilm/load", keys["admin"])
        frames = []
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            frames.append(json.loads(message.data))
    assert [f["type"] for f in frames] == ["error"]
    assert frames[0]["error"]["status"] == 401
    assert ws.closed  # the server ended the connection: no event reached a revoked key
