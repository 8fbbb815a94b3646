"""``inferno keys``, run as a user runs it: the installed command against a data directory."""

from __future__ import annotations

import base64
import getpass
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from inferno.plugins.auth.keystore import KeyRecord, KeyStore, Rejected
from tests.conftest import run_inferno
from tests.servers import ServerThread

ENABLED = ("--set", "auth.api_key.enabled=true")
KEY = re.compile(r"inf_([0-9a-f]{12})_[0-9a-f]{64}")


def keys(*args: str) -> subprocess.CompletedProcess[str]:
    return run_inferno("keys", *args, *ENABLED)


def created_key(result: subprocess.CompletedProcess[str]) -> str:
    """The key a create or rotate printed: stdout holds it alone."""
    assert result.returncode == 0, result.stderr
    assert KEY.fullmatch(result.stdout.strip()), result.stdout
    assert result.stdout.count("\n") == 1
    return result.stdout.strip()


@pytest.fixture
def store(tmp_path: Path) -> Callable[[], KeyStore]:
    """The profile's key store, opened as another process would."""
    return lambda: KeyStore(tmp_path / "data" / "auth" / "api_key" / "keys.sqlite")


def test_create_prints_the_key_once_and_the_store_accepts_it(
        store: Callable[[], KeyStore]) -> None:
    result = keys("create", "--name", "ci", "--role", "user", "--role", "viewer",
                  "--models", "gemma-3-270m, minilm", "--expires", "30d", "--concurrent", "2",
                  "--tokens-per-minute", "5000")
    key = created_key(result)
    key_id = KEY.fullmatch(key).group(1)  # type: ignore[union-attr]
    assert f"created API key {key_id} (ci; roles user, viewer;" in result.stderr
    assert "the only time the key is shown" in result.stderr
    assert key not in result.stderr
    record = store().lookup(key)
    assert isinstance(record, KeyRecord)
    assert (record.name, record.roles, record.models, record.owner) == (
        "ci", ("user", "viewer"), ("gemma-3-270m", "minilm"), getpass.getuser())
    assert record.limits == {"concurrent": 2, "tokens_per_minute": 5000}
    assert record.expires_at is not None


def test_list_shows_every_key_but_never_a_key_itself() -> None:
    first = created_key(keys("create", "--name", "ci", "--role", "user"))
    second = created_key(keys("create", "--name", "bot", "--role", "admin", "--owner", "ops"))
    table = keys("list")
    as_json = keys("list", "--json")
    assert table.returncode == as_json.returncode == 0
    for output in (table.stdout, as_json.stdout):
        for key in (first, second):
            assert key not in output
            assert key.rsplit("_", 1)[1] not in output
    assert table.stdout.splitlines()[0].split()[:4] == ["ID", "NAME", "OWNER", "ROLES"]
    rows = {row["name"]: row for row in json.loads(as_json.stdout)}
    assert rows["bot"]["owner"] == "ops"
    assert rows["bot"]["id"] == KEY.fullmatch(second).group(1)  # type: ignore[union-attr]
    assert rows["ci"]["status"] == "active"
    assert rows["ci"]["last_used_at"] is None


def test_revoke_by_name_stops_the_key(store: Callable[[], KeyStore]) -> None:
    key = created_key(keys("create", "--name", "ci", "--role", "user"))
    result = keys("revoke", "ci")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("revoked API key ")
    assert isinstance(store().lookup(key), Rejected)
    assert "no API keys" in keys("list").stdout
    listed = json.loads(keys("list", "--all", "--json").stdout)
    assert [(row["name"], row["status"]) for row in listed] == [("ci", "revoked")]


def test_rotate_replaces_the_key_keeping_its_attributes(store: Callable[[], KeyStore]) -> None:
    old = created_key(keys("create", "--name", "ci", "--role", "user", "--models", "minilm",
                           "--requests-per-minute", "30"))
    result = keys("rotate", "ci")
    new = created_key(result)
    assert "(now revoked)" in result.stderr
    assert store().lookup(old) == Rejected("revoked", store().get(old.split("_")[1]))
    record = store().lookup(new)
    assert isinstance(record, KeyRecord)
    assert (record.name, record.roles, record.models, dict(record.limits)) == (
        "ci", ("user",), ("minilm",), {"requests_per_minute": 30})


@pytest.mark.parametrize(("args", "message"), [
    (("create", "--name", "ci", "--role", "wizard"),
     "unknown role 'wizard'; the roles defined are admin, operator, user, viewer"),
    (("create", "--name", "ci", "--role", "user", "--expires", "soon"),
     "expiry 'soon' is neither a duration"),
    (("create", "--name", "c i", "--role", "user"), "name must be 1 to 64 letters"),
    (("revoke", "nosuch"), "no API key with id 'nosuch'"),
])
def test_mistakes_are_clear_errors(args: tuple[str, ...], message: str) -> None:
    result = keys(*args)
    assert result.returncode == 1
    assert f"error: {message}" in result.stderr
    assert result.stdout == ""


def test_roles_the_profile_defines_are_accepted() -> None:
    result = keys("create", "--name", "audit", "--role", "auditor",
                  "--set", 'security.roles={ auditor = ["audit:read"] }')
    created_key(result)


def test_a_profile_without_api_keys_says_which_table_to_add() -> None:
    result = run_inferno("keys", "list")
    assert result.returncode == 1
    assert "add the table [auth.api_key]" in result.stderr


def test_changes_are_recorded_in_the_audit_log() -> None:
    env = {"INFERNO_AUDIT__ENABLED": "true",
           "INFERNO_AUDIT__KEY": base64.b64encode(os.urandom(32)).decode()}
    key = created_key(run_inferno("keys", "create", "--name", "ci", "--role", "user", *ENABLED,
                                  env=env))
    assert run_inferno("keys", "revoke", "ci", *ENABLED, env=env).returncode == 0
    query = run_inferno("audit", "query", "--action", "keys.*", env=env)
    assert query.returncode == 0, query.stderr
    records = [json.loads(line) for line in query.stdout.splitlines()]
    key_id = key.split("_")[1]
    assert [(r["action"], r["outcome"], r["resource"]) for r in records] == [
        ("keys.create", "ok", key_id), ("keys.revoke", "ok", key_id)]
    assert {r["principal"] for r in records} == {f"cli:{getpass.getuser()}"}
    assert key not in query.stdout


async def test_a_running_server_refuses_a_key_the_cli_revoked(tmp_path: Path) -> None:
    shared = tmp_path / "shared-keys.sqlite"
    sets = ["auth.none.enabled=false", f'auth.api_key.store="{shared}"']
    use_shared = ("--set", f'auth.api_key.store="{shared}"')
    with ServerThread("edge", tmp_path / "server-data", sets=sets) as server:
        key = created_key(keys("create", "--name", "app", "--role", "viewer", *use_shared))
        async with aiohttp.ClientSession(headers={"X-API-Key": key}) as session:
            async with session.get(server.url + "/v1/models") as before:
                assert before.status == 200
            assert keys("revoke", "app", *use_shared).returncode == 0
            async with session.get(server.url + "/v1/models") as after:
                assert after.status == 401
                assert (await after.json())["error"]["message"] == "API key revoked"
