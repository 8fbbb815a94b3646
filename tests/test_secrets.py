"""Secrets never leak: a server is given an API key store, a JWT secret, an audit key and a
Redis password, driven through every path that handles them (good and bad credentials, key
creation, malformed requests) with debug logs, and everything it wrote is scanned."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt

from inferno.plugins.auth.keystore import KeyStore

from .conftest import INFERNO

JWT_SECRET = "jwt-secret-" + secrets.token_hex(24)
AUDIT_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
REDIS_PASSWORD = "redis-pass-" + secrets.token_hex(8)


def settings(tmp_path: Path, store: Path) -> tuple[list[str], dict[str, str]]:
    sets = ["auth.none.enabled=false", f'auth.api_key.store="{store}"',
            'auth.jwt.algorithms=["HS256"]', 'auth.jwt.issuer="https://id.example"',
            'auth.jwt.audience="inferno"', 'auth.jwt.secret_env="TEST_JWT_SECRET"',
            "audit.enabled=true", 'logging.level="debug"', 'logging.format="json"',
            f'rate_limits.redis_url="redis://:{REDIS_PASSWORD}@127.0.0.1:1/0"',
            'rate_limits.storage="memory"']
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNO_")}
    env.update({"INFERNO_KERNEL__DATA_DIR": str(tmp_path / "data"),
                "INFERNO_PROTOCOLS__HTTP__PORT": "0", "INFERNO_AUDIT__KEY": AUDIT_KEY,
                "TEST_JWT_SECRET": JWT_SECRET})
    return [arg for entry in sets for arg in ("--set", entry)], env


def token(**claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "alice", "iss": "https://id.example", "aud": "inferno", "exp": now + 600,
            "roles": ["user"], **claims}
    return pyjwt.encode(body, JWT_SECRET, algorithm="HS256")


async def drive(url: str, credentials: list[str], admin: str) -> tuple[dict[str, int], str]:
    """Each credential on a good, a malformed and a failing request; then a key created."""
    seen = {}
    async with aiohttp.ClientSession() as session:
        for number, credential in enumerate(credentials):
            headers = {"Authorization": f"Bearer {credential}"}
            for method, path, body in (("GET", "/v1/models", None),
                                       ("POST", "/v1/embeddings", "{not json"),
                                       ("GET", "/v1/models/no-such-model", None)):
                async with session.request(method, url + path, headers=headers,
                                           data=body) as response:
                    await response.read()
                    seen[f"{number} {method} {path}"] = response.status
        host, port = url.removeprefix("http://").rsplit(":", 1)  # a header aiohttp cannot parse
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}"
                     f"\x01\r\n\r\n".encode())
        seen["malformed header"] = int((await reader.readline()).split()[1])
        writer.close()
        async with session.post(url + "/api/v1/keys", json={"name": "made", "roles": ["viewer"]},
                                headers={"X-API-Key": admin}) as response:
            created = (await response.json())["key"]
    return seen, created


def test_no_secret_appears_in_logs_errors_config_or_the_audit_log(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.sqlite")
    _, admin = store.create("admin", roles=["admin"])
    _, revoked = store.create("gone", roles=["admin"])
    store.revoke("gone")
    store.close()
    wrong = "inf_" + "a" * 12 + "_" + secrets.token_hex(32)
    good_jwt, expired_jwt = token(), token(exp=int(time.time()) - 600)
    tampered_jwt = good_jwt[:-4] + ("AAAA" if not good_jwt.endswith("AAAA") else "BBBB")
    args, env = settings(tmp_path, tmp_path / "keys.sqlite")
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        server = subprocess.Popen([str(INFERNO), "--profile", "edge", *args], env=env,
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        url = wait_for_url(log, server)
        statuses, created = asyncio.run(drive(url, [admin, revoked, wrong, good_jwt,
                                                    expired_jwt, tampered_jwt], admin))
    finally:
        server.terminate()
        server.wait(30)
    assert statuses["0 GET /v1/models"] == 200
    assert statuses["malformed header"] == 400
    assert statuses["3 GET /v1/models"] == 200
    assert {statuses[f"{n} GET /v1/models"] for n in (1, 2, 4, 5)} == {401}
    shown = subprocess.run([str(INFERNO), "profile", "show", "edge", *args], env=env,
                           capture_output=True, text=True, check=True, timeout=60).stdout
    exported = subprocess.run([str(INFERNO), "audit", "export", "--profile", "edge", *args],
                              env=env, capture_output=True, text=True, check=True,
                              timeout=60).stdout
    assert "auth.failure" in exported  # the audit log did see the failures
    audit_files = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*")
                           if p.is_file() and "audit" in str(p))
    captured = {"logs": log.read_text(), "profile show": shown, "audit export": exported,
                "audit files": audit_files.decode("latin-1"),
                "key store": (tmp_path / "keys.sqlite").read_bytes().decode("latin-1")}
    planted = {"admin key": admin, "revoked key": revoked, "wrong key": wrong,
               "created key": created, "JWT": good_jwt, "expired JWT": expired_jwt,
               "tampered JWT": tampered_jwt, "JWT secret": JWT_SECRET,
               "audit key": AUDIT_KEY, "Redis password": REDIS_PASSWORD,
               "key secret part": admin.rsplit("_", 1)[1]}
    leaks = [f"{name} in {where}" for name, secret in planted.items()
             for where, text in captured.items() if secret in text]
    assert leaks == []
    assert len(captured["logs"]) > 2000  # debug logging really ran


def wait_for_url(log: Path, server: subprocess.Popen[bytes], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        for line in log.read_text().splitlines():
            if '"listening"' in line:
                return str(json.loads(line)["urls"][0])
        time.sleep(0.1)
    raise AssertionError(f"the server did not start:\n{log.read_text()}")
