"""Admission of every call: declared permissions on every route and message, the ``none``
provider's loopback rule, roles, and the network policy, over real servers on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inferno.kernel import ConfigError, Credentials, InfernoError, Principal, hookimpl
from inferno.plugins.gateway.calls import Call
from inferno.plugins.gateway.errors import ApiError
from inferno.plugins.gateway.permissions import AUTHENTICATED, PERMISSIONS, PUBLIC, declared
from inferno.plugins.protocols import stdin, websocket_connection
from inferno.plugins.security.network import NetworkPolicy
from inferno.plugins.security.roles import DEFAULT_ROLES, Roles
from tests.servers import ServerThread


async def fetch(method: str, url: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, \
            session.request(method, url, **kwargs) as response:
        return response.status, await response.json(content_type=None), response.headers


def app_routes(server: ServerThread) -> list[web.AbstractRoute]:
    app = server.kernel.drivers("protocols")["http"].app
    return [route for route in app.router.routes() if route.method != "OPTIONS"]


# --------------------------------------------------------------------------- declarations


def test_every_route_and_message_type_declares_what_it_needs(tmp_path: Path) -> None:
    sets = ["protocols.websocket.share_http=true", "auth.api_key.enabled=true"]
    with ServerThread("edge", tmp_path, sets=sets) as server:
        gateway = server.service("gateway")
        routes = app_routes(server)
        undeclared, unknown = [], []
        for route in routes:
            operations, permission = declared(route.handler)
            name = f"{route.method} {route.resource.canonical if route.resource else '?'}"
            if not operations and not permission:
                undeclared.append(name)
            unknown += [f"{name}: {op}" for op in operations if op not in gateway.permissions]
            if permission and permission not in {PUBLIC, AUTHENTICATED, *PERMISSIONS}:
                unknown.append(f"{name}: permission {permission}")
        paths = {route.resource.canonical for route in routes if route.resource}
    assert undeclared == []
    assert unknown == []
    assert {"/v1/chat/completions", "/v1/ws", "/api/chat", "/health/live"} <= paths
    assert len(routes) > 25  # the enumeration saw the whole application
    for operation, permission in gateway.permissions.items():
        assert operation == "access" or permission in {AUTHENTICATED, *PERMISSIONS}, operation
    for kind in websocket_connection.HANDLERS:
        assert kind in websocket_connection.OPERATIONS \
            or websocket_connection.MESSAGE_PERMISSIONS[kind] in {AUTHENTICATED, *PERMISSIONS}
    assert set(stdin._FIELDS) <= set(gateway.permissions)


async def test_a_route_that_declares_nothing_is_not_served(make_kernel: Any) -> None:
    async def secret(request: web.Request) -> web.Response:
        return web.json_response({"leaked": True})

    class Undeclared:
        @staticmethod
        @hookimpl
        def inferno_http_routes(kernel: Any) -> list[web.RouteDef]:
            return [web.get("/undeclared", secret)]

    kernel = make_kernel({"protocols": {"http": {"port": 0}}}, base="edge",
                         plugins={"undeclared": Undeclared})
    async with kernel.running():
        url = kernel.drivers("protocols")["http"].url
        status, body, _ = await fetch("GET", url + "/undeclared")
    assert status == 500
    assert body["error"]["code"] == "undeclared_route"
    assert "GET /undeclared declares no permission" in body["error"]["message"]


# --------------------------------------------------------------------------- none


def test_anonymous_access_refuses_an_address_other_machines_reach(make_kernel: Any) -> None:
    kernel = make_kernel({"protocols": {"http": {"host": "0.0.0.0", "port": 0}}}, base="edge")

    async def start() -> None:
        async with kernel.running():
            pass

    import asyncio

    with pytest.raises(InfernoError, match=r"auth provider 'none'.*protocols\.http\.host = "
                                           r"'0\.0\.0\.0'.*allow_insecure"):
        asyncio.run(start())


async def test_anonymous_access_on_any_address_when_the_profile_allows_it(
        make_kernel: Any) -> None:
    kernel = make_kernel({"protocols": {"http": {"host": "0.0.0.0", "port": 0}},
                          "auth": {"none": {"allow_insecure": True, "roles": ["viewer"]}}},
                         base="edge")
    async with kernel.running():
        port = kernel.drivers("protocols")["http"].url.rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}"
        listed, _, _ = await fetch("GET", url + "/v1/models")
        load, body, _ = await fetch("POST", url + "/api/v1/models/minilm/load")
    assert listed == 200
    assert load == 403
    assert body["error"]["code"] == "permission_denied"
    assert "'models:manage'" in body["error"]["message"]


async def test_without_any_auth_provider_every_call_but_public_ones_is_refused(
        make_kernel: Any) -> None:
    kernel = make_kernel({"protocols": {"http": {"port": 0}}, "auth": {"none": {
        "enabled": False}}}, base="edge")
    async with kernel.running():
        url = kernel.drivers("protocols")["http"].url
        models, body, headers = await fetch("GET", url + "/v1/models")
        live, _, _ = await fetch("GET", url + "/health/live")
    assert models == 401
    assert "no auth provider enabled" in body["error"]["message"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert live == 200


# --------------------------------------------------------------------------- roles


def test_roles_grant_their_permissions_and_admin_grants_all() -> None:
    roles = Roles({"auditor": ["audit:read"]})
    viewer = Principal("v", frozenset({"viewer"}))
    both = Principal("b", frozenset({"viewer", "auditor"}))
    admin = Principal("a", frozenset({"admin"}))
    nobody = Principal("n", frozenset({"no-such-role"}))
    assert roles.grants(viewer, "models:read")
    assert not roles.grants(viewer, "infer")
    assert roles.grants(both, "audit:read")
    assert not roles.grants(viewer, "audit:read")
    assert all(roles.grants(admin, p) for p in PERMISSIONS)
    assert not roles.grants(nobody, "models:read")
    assert roles.grants(nobody, AUTHENTICATED)
    assert set(DEFAULT_ROLES["user"]) < set(DEFAULT_ROLES["operator"])


def test_a_role_with_an_unknown_permission_is_a_config_error(make_kernel: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        make_kernel({"security": {"roles": {"auditor": ["audit:raed"]},
                                  "deny": ["10.0.0.0/33"]}}, base="edge")
    text = str(caught.value)
    assert "security.roles: role 'auditor' grants unknown permissions ['audit:raed']" in text
    assert "security.deny: '10.0.0.0/33' is not an IP address or a network" in text


def test_a_wildcard_origin_is_refused_where_the_profile_forbids_it(make_kernel: Any) -> None:
    kernel = make_kernel({"protocols": {"http": {"port": 0, "cors_origins": ["*"]}},
                          "security": {"allow_wildcard_cors": False}}, base="edge")

    async def start() -> None:
        async with kernel.running():
            pass

    import asyncio

    with pytest.raises(InfernoError, match=r"protocols\.http\.cors_origins: must name origins"):
        asyncio.run(start())


# --------------------------------------------------------------------------- network


def test_the_client_behind_trusted_proxies_is_the_last_untrusted_hop() -> None:
    policy = NetworkPolicy(allow=["10.0.0.0/8"], deny=["10.6.6.6"],
                           trusted_proxies=["192.168.0.0/16"])
    forwarded = {"x-forwarded-for": "6.6.6.6, 10.1.2.3, 192.168.0.9"}
    assert policy.client(Credentials(forwarded, "192.168.0.1")) == "10.1.2.3"
    assert policy.client(Credentials(forwarded, "172.16.0.1")) == "172.16.0.1"  # untrusted
    assert policy.admits("10.1.2.3", "192.168.0.1")
    assert not policy.admits("10.6.6.6", "192.168.0.1")  # denied wins over allowed
    assert not policy.admits("8.8.8.8", "8.8.8.8")  # not in the allow list
    assert not policy.admits("unknown", "192.168.0.1")  # a forwarded non-address
    assert policy.admits("stdin", "stdin")  # this machine's own transport
    assert policy.admits("::ffff:10.0.0.1", "::ffff:10.0.0.1")


async def test_a_denied_address_gets_403_on_every_route(tmp_path: Path) -> None:
    with ServerThread("edge", tmp_path, sets=['security.deny=["127.0.0.0/8"]']) as server:
        statuses = {}
        for path in ("/v1/models", "/health/live", "/openapi.json", "/api/version"):
            statuses[path], body, _ = await fetch("GET", server.url + path)
        assert body == {"error": "calls from 127.0.0.1 are not allowed here "
                                 "(security.allow and security.deny)"}
    assert set(statuses.values()) == {403}


async def test_a_trusted_proxy_forwards_the_address_the_policy_judges(tmp_path: Path) -> None:
    sets = ['security.trusted_proxies=["127.0.0.1"]', 'security.allow=["10.0.0.0/8"]']
    with ServerThread("edge", tmp_path, sets=sets) as server:
        inside, _, _ = await fetch("GET", server.url + "/v1/models",
                                   headers={"X-Forwarded-For": "10.9.8.7"})
        outside, body, _ = await fetch("GET", server.url + "/v1/models",
                                       headers={"X-Forwarded-For": "10.9.8.7, 203.0.113.5"})
        direct, _, _ = await fetch("GET", server.url + "/v1/models")
    assert inside == 200
    assert outside == 403
    assert "203.0.113.5" in body["error"]["message"]
    assert direct == 403  # the proxy itself is not in the allow list


async def test_access_checks_refuse_a_call_without_a_permission(make_kernel: Any) -> None:
    kernel = make_kernel(None, base="edge")
    async with kernel.running(protocols=False):
        with pytest.raises(ApiError) as caught:
            await kernel.service("gateway").run(Call("access"))
    assert caught.value.status == 500


async def test_tls_refuses_clients_older_than_the_minimum_version(tmp_path: Path) -> None:
    import ssl

    from tests.test_http_api import write_self_signed

    cert, key = write_self_signed(tmp_path)
    with ServerThread("edge", tmp_path / "data", sets=[
            f'protocols.http.tls_cert="{cert}"', f'protocols.http.tls_key="{key}"',
            'protocols.http.tls_min_version="1.3"']) as server:
        modern = ssl.create_default_context(cafile=str(cert))
        old = ssl.create_default_context(cafile=str(cert))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        status, _, _ = await fetch("GET", server.url + "/health/live", ssl=modern)
        with pytest.raises(aiohttp.ClientConnectorError):
            await fetch("GET", server.url + "/health/live", ssl=old)
    assert status == 200


async def test_the_none_provider_is_asked_last_so_a_bad_key_is_refused(
        tmp_path: Path) -> None:
    with ServerThread("edge", tmp_path, sets=["auth.api_key.enabled=true"]) as server:
        anonymous, _, _ = await fetch("GET", server.url + "/v1/models")
        wrong, body, _ = await fetch("GET", server.url + "/v1/models", headers={
            "Authorization": "Bearer inf_" + "0" * 12 + "_" + "1" * 64})
    assert anonymous == 200
    assert wrong == 401
    assert body["error"]["message"] == "unknown API key"


# --------------------------------------------------------------------------- enterprise


def enterprise_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNO_")}
    return {**env, "INFERNO_KERNEL__DATA_DIR": str(tmp_path / "data"),
            "INFERNO_PROTOCOLS__HTTP__HOST": "127.0.0.1",
            "INFERNO_PROTOCOLS__HTTP__PORT": "0", **extra}


def test_enterprise_refuses_to_start_without_an_audit_key_and_says_which(
        tmp_path: Path) -> None:
    import subprocess

    from .conftest import INFERNO

    done = subprocess.run([str(INFERNO), "--profile", "enterprise"], capture_output=True,
                          text=True, env=enterprise_env(tmp_path), timeout=60, check=False)
    assert done.returncode != 0
    assert "INFERNO_AUDIT__KEY" in done.stderr
    assert "inferno audit keygen" in done.stderr


def test_enterprise_admits_only_keys_and_audits_what_it_decides(tmp_path: Path) -> None:
    import asyncio
    import base64
    import json
    import secrets
    import subprocess

    from .conftest import INFERNO

    env = enterprise_env(tmp_path, INFERNO_AUDIT__KEY=base64.b64encode(
        secrets.token_bytes(32)).decode())

    def inferno(*args: str) -> str:
        done = subprocess.run([str(INFERNO), *args, "--profile", "enterprise"],
                              capture_output=True, text=True, env=env, timeout=60,
                              check=True)
        return done.stdout

    key = inferno("keys", "create", "--name", "ci", "--role", "viewer").split()[0]
    assert key.startswith("inf_")
    server = subprocess.Popen([str(INFERNO), "--profile", "enterprise"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        url = ""
        while not url:
            line = server.stderr.readline()
            assert line, "the server stopped before it listened"
            if '"listening"' in line:
                url = json.loads(line)["urls"][0]

        async def calls() -> list[tuple[int, Any, Any]]:
            return [await fetch("GET", url + "/v1/models"),
                    await fetch("GET", url + "/v1/models", headers={"X-API-Key": key}),
                    await fetch("GET", url + "/health/live"),
                    await fetch("POST", url + "/api/v1/models/x/load",
                                headers={"X-API-Key": key})]

        answers = asyncio.run(calls())
    finally:
        server.terminate()
        server.wait(30)
    assert [status for status, _, _ in answers] == [401, 200, 200, 403]
    assert answers[0][1]["error"]["code"] == "missing_credentials"
    records = [json.loads(line) for line in inferno("audit", "export").splitlines()]
    actions = [(r["action"], r["outcome"]) for r in records]
    assert ("keys.create", "ok") in actions
    assert ("auth.failure", "denied") in actions
    assert ("auth.success", "ok") in actions
    assert ("authz.denied", "denied") in actions
    assert inferno("audit", "verify").startswith("OK")


async def test_a_client_sending_its_headers_slowly_is_cut_off(tmp_path: Path) -> None:
    import asyncio
    import time

    with ServerThread("edge", tmp_path, sets=["protocols.http.keepalive_timeout=1.0"]) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        started = time.monotonic()
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        closed_after = None
        for _ in range(40):  # one header byte every 0.1 s, never finishing the head
            await asyncio.sleep(0.1)
            try:
                writer.write(b"X")
                await writer.drain()
            except ConnectionError:
                closed_after = time.monotonic() - started
                break
            if reader.at_eof() or await _closed(reader):
                closed_after = time.monotonic() - started
                break
        writer.close()
    assert closed_after is not None, "the server kept a connection whose headers never ended"
    assert closed_after < 3.0


async def _closed(reader: Any) -> bool:
    import asyncio

    try:
        data = await asyncio.wait_for(reader.read(1), 0.01)
    except TimeoutError:
        return False
    return data == b""


def test_an_empty_host_counts_as_every_interface_for_anonymous_access() -> None:
    from inferno.plugins.auth.anonymous import exposed_addresses

    assert exposed_addresses({"http": {"host": ""}}) == [("http", "")]
    assert exposed_addresses({"http": {"host": "127.0.0.1"}, "websocket": {}}) == []
    assert exposed_addresses({"http": {"host": "127.0.0.1", "enabled": False},
                              "websocket": {"host": "0.0.0.0"}}) == [("websocket", "0.0.0.0")]
    assert exposed_addresses({"websocket": {"share_http": False, "host": "::"}}) == \
        [("websocket", "::")]


async def test_a_flood_of_bad_credentials_writes_a_bounded_number_of_records(
        make_kernel: Any) -> None:
    import base64

    from inferno.plugins.audit.keys import keyring_from
    from inferno.plugins.audit.verify import read_records
    from inferno.plugins.security.middleware import FAILURES_PER_MINUTE

    key = base64.b64encode(b"q" * 32).decode()
    kernel = make_kernel({"auth": {"none": {"enabled": False}, "api_key": {}},
                          "audit": {"enabled": True, "key": key, "fsync": "never"}},
                         base="edge")
    async with kernel.running(protocols=False):
        gateway = kernel.service("gateway")
        for _ in range(FAILURES_PER_MINUTE + 20):
            with pytest.raises(ApiError):
                await gateway.run(Call("models.list", credentials=Credentials(
                    {"x-api-key": "inf_" + "0" * 12 + "_" + "1" * 64}, "10.0.0.9")))
        directory = kernel.service("audit").directory
    failures = [r for r in read_records(directory, keyring_from({"key": key}))
                if r.get("action") == "auth.failure"]
    assert len(failures) == FAILURES_PER_MINUTE


async def test_a_loopback_server_answers_no_dns_name_it_was_not_given(tmp_path: Path) -> None:
    sets = ['protocols.http.allowed_hosts=["inferno.local"]']
    with ServerThread("edge", tmp_path, sets=sets) as server:
        port = server.url.rsplit(":", 1)[1]
        rebound, body, _ = await fetch("GET", server.url + "/v1/models",
                                       headers={"Host": f"evil.example:{port}"})
        page, _, _ = await fetch("POST", server.url + "/api/v1/models/minilm/unload", headers={
            "Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"})
        named, _, _ = await fetch("GET", server.url + "/v1/models",
                                  headers={"Host": f"inferno.local:{port}"})
        own, _, _ = await fetch("GET", server.url + "/v1/models", headers={
            "Origin": f"http://127.0.0.1:{port}"})
    assert rebound == 403
    assert body["error"]["code"] == "host_not_allowed"
    assert page == 403
    assert named == 200
    assert own == 200
