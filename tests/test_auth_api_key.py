"""API keys: the SQLite key store, the ``api_key`` provider in a kernel, the ``keys.*``
operations' audit records, and the ``/api/v1/keys`` routes through a real server."""

from __future__ import annotations

import json
import re
import stat
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from inferno.kernel import AuthError, Credentials
from inferno.plugins.auth.keystore import (
    KeyConflict,
    KeyNotFound,
    KeyRecord,
    KeyStore,
    KeyStoreError,
    Rejected,
    parse_expiry,
)
from inferno.plugins.gateway.calls import Call
from inferno.plugins.gateway.errors import ApiError
from tests.servers import ServerThread

# --------------------------------------------------------------------------- the store


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys.sqlite")


def test_a_new_key_has_the_prefix_an_id_and_256_bits_of_secret(store: KeyStore) -> None:
    record, key = store.create("ci", roles=["user"])
    assert re.fullmatch(rf"inf_{record.id}_[0-9a-f]{{64}}", key)  # 32 random bytes
    assert store.create("other", roles=["user"])[1] != key


def test_a_key_looks_up_to_its_record(store: KeyStore) -> None:
    record, key = store.create("ci", roles=["user", "viewer"], owner="alice",
                               models=["gemma"], limits={"concurrent": 2})
    found = store.lookup(key)
    assert isinstance(found, KeyRecord)
    assert found == record
    assert (found.owner, found.roles, found.models) == ("alice", ("user", "viewer"), ("gemma",))
    assert found.limits == {"concurrent": 2}


def test_wrong_unknown_and_malformed_keys_are_rejected(store: KeyStore) -> None:
    _, key = store.create("ci", roles=["user"])
    flipped = key[:-1] + ("0" if key[-1] != "0" else "1")
    assert store.lookup(flipped) == Rejected("unknown")  # right id, wrong secret
    assert store.lookup("inf_" + "a" * 12 + "_" + "b" * 64) == Rejected("unknown")
    assert store.lookup(key + "0") == Rejected("malformed")
    assert store.lookup("inf_nothex") == Rejected("malformed")


def test_a_revoked_key_is_rejected_and_its_name_is_free_again(store: KeyStore) -> None:
    record, key = store.create("ci", roles=["user"])
    with pytest.raises(KeyConflict, match="named 'ci' exists"):
        store.create("ci", roles=["admin"])  # names are unique among unrevoked keys
    revoked = store.revoke("ci")
    assert revoked.id == record.id
    assert revoked.revoked_at is not None
    assert store.lookup(key) == Rejected("revoked", revoked)
    with pytest.raises(KeyConflict, match="already revoked"):
        store.revoke(record.id)
    with pytest.raises(KeyNotFound):
        store.revoke("ci")  # by name only unrevoked keys are found
    assert store.create("ci", roles=["user"])[0].id != record.id


def test_an_expired_key_is_rejected_with_its_expiry(store: KeyStore) -> None:
    record, key = store.create("ci", roles=["user"], expires_at=time.time() + 3600)
    assert store.lookup(key) == record
    assert store.lookup(key, now=time.time() + 7200) == Rejected("expired", record)


def test_rotation_keeps_the_attributes_and_revokes_the_old_key(store: KeyStore) -> None:
    old, old_key = store.create("ci", roles=["user"], owner="alice", models=["gemma"],
                                limits={"requests_per_minute": 60}, expires_at=2e9)
    new, new_key, before = store.rotate("ci")
    assert new.id != old.id
    assert new_key != old_key
    assert (new.name, new.owner, new.roles, new.models, dict(new.limits), new.expires_at) == \
        ("ci", "alice", ("user",), ("gemma",), {"requests_per_minute": 60}, 2e9)
    assert before.replaced_by == new.id
    assert store.lookup(old_key) == Rejected("revoked", before)
    assert store.lookup(new_key) == new
    assert store.rotate(new.id, expires_at=None)[0].expires_at is None


def test_neither_the_key_nor_its_secret_is_ever_written(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.sqlite")
    _, key = store.create("ci", roles=["user"])
    store.lookup(key)
    secret = key.rsplit("_", 1)[1]

    def written() -> bytes:
        return b"".join(p.read_bytes() for p in tmp_path.glob("keys.sqlite*"))

    before = written()
    store.close()  # checkpoints the write-ahead log into the database file
    for data in (before, written()):
        assert b"ci" in data  # the record is there ...
        for needle in (key.encode(), secret.encode(), bytes.fromhex(secret)):
            assert needle not in data  # ... the key is not


def test_the_store_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "sub" / "keys.sqlite")
    store.create("ci", roles=["user"])
    for path in tmp_path.glob("sub/keys.sqlite*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_revocation_through_one_store_is_seen_by_another_at_once(tmp_path: Path) -> None:
    server, admin = KeyStore(tmp_path / "k.sqlite"), KeyStore(tmp_path / "k.sqlite")
    _, key = admin.create("ci", roles=["user"])
    assert isinstance(server.lookup(key), KeyRecord)
    admin.revoke("ci")
    assert isinstance(server.lookup(key), Rejected)


def test_last_use_is_written_at_most_once_per_interval(tmp_path: Path) -> None:
    one = KeyStore(tmp_path / "k.sqlite", last_used_interval=60)
    other = KeyStore(tmp_path / "k.sqlite", last_used_interval=60)
    record, key = one.create("ci", roles=["user"])
    assert one.touch(record, now=1000.0)
    assert not one.touch(record, now=1030.0)
    fresh = other.lookup(key)
    assert isinstance(fresh, KeyRecord)
    assert fresh.last_used_at == 1000.0
    assert not other.touch(fresh, now=1030.0)  # another process wrote it recently
    assert other.touch(fresh, now=1061.0)
    assert one.get("ci").last_used_at == 1061.0


def test_expiries_read_as_durations_or_dates() -> None:
    assert parse_expiry("30d", now=0) == 30 * 86400
    assert parse_expiry("12h", now=0) == 12 * 3600
    assert parse_expiry("2027-01-01", now=0) == 1798761600
    assert parse_expiry("never") is None
    with pytest.raises(KeyStoreError, match="in the past"):
        parse_expiry("2001-01-01")
    with pytest.raises(KeyStoreError, match="neither a duration"):
        parse_expiry("soon")


# --------------------------------------------------------------------------- the provider


async def test_the_provider_accepts_bearer_and_x_api_key(make_kernel: Any) -> None:
    kernel = make_kernel({"auth": {"api_key": {}}})
    async with kernel.running():
        provider = kernel.drivers("auth")["api_key"]
        record, key = provider.store.create("ci", roles=["user"], models=["gemma"],
                                            limits={"tokens_per_minute": 1000})
        by_bearer = await provider.authenticate(Credentials({"authorization": f"Bearer {key}"}))
        by_header = await provider.authenticate(Credentials({"x-api-key": key}))
    assert by_bearer == by_header
    assert by_bearer.id == f"key:{record.id}"
    assert by_bearer.roles == frozenset({"user"})
    assert by_bearer.attributes == {"provider": "api_key", "key_id": record.id, "name": "ci",
                                    "owner": "", "models": ["gemma"],
                                    "limits": {"tokens_per_minute": 1000}}
    used = KeyStore(kernel.data_dir / "auth" / "api_key" / "keys.sqlite").get(record.id)
    assert used.last_used_at is not None  # written once the kernel stopped, at the latest


@pytest.mark.parametrize(("damage", "message"), [
    (lambda store, key: key[:-1] + ("1" if key[-1] == "0" else "0"), "unknown API key"),
    (lambda store, key: key[:-2], "malformed API key"),
    (lambda store, key: (store.revoke("ci"), key)[1], "API key revoked"),
])
async def test_the_provider_refuses_bad_keys_without_echoing_them(
        make_kernel: Any, damage: Any, message: str) -> None:
    kernel = make_kernel({"auth": {"api_key": {}}})
    async with kernel.running():
        provider = kernel.drivers("auth")["api_key"]
        _, key = provider.store.create("ci", roles=["user"])
        presented = damage(provider.store, key)
        with pytest.raises(AuthError) as caught:
            await provider.authenticate(Credentials({"x-api-key": presented}))
    assert str(caught.value) == message
    assert presented not in str(caught.value)
    assert presented[4:16] not in message


async def test_the_provider_refuses_an_expired_key_naming_when(make_kernel: Any) -> None:
    kernel = make_kernel({"auth": {"api_key": {}}})
    async with kernel.running():
        provider = kernel.drivers("auth")["api_key"]
        _, key = provider.store.create("ci", roles=["user"], expires_at=1e9)
        with pytest.raises(AuthError, match=r"^API key expired at 2001-09-09T01:46:40Z$"):
            await provider.authenticate(Credentials({"authorization": f"bearer {key}"}))


async def test_other_credentials_are_left_to_other_providers(make_kernel: Any) -> None:
    kernel = make_kernel({"auth": {"api_key": {}}})
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"
    async with kernel.running():
        provider = kernel.drivers("auth")["api_key"]
        for headers in ({}, {"authorization": f"Bearer {jwt}"}, {"authorization": "Basic eA=="},
                        {"x-api-key": "sk-something-else"}):
            assert await provider.authenticate(Credentials(headers)) is None


async def test_a_store_path_lets_kernels_share_keys(make_kernel: Any, tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "keys.sqlite"
    _, key = KeyStore(shared).create("ci", roles=["user"])
    kernel = make_kernel({"auth": {"api_key": {"store": str(shared)}}})
    async with kernel.running():
        found = await kernel.drivers("auth")["api_key"].authenticate(
            Credentials({"x-api-key": key}))
    assert found is not None
    assert found.attributes["name"] == "ci"


# --------------------------------------------------------------------------- audit


def call(operation: str, body: dict[str, Any], key: str) -> Call:
    return Call(operation, body, protocol="test", credentials=Credentials({"x-api-key": key}))


async def audited_kernel(make_kernel: Any, folder: Path, *, disk_full: bool = False,
                         fail_closed: bool = True) -> tuple[Any, str, Any]:
    """A started kernel (no protocols) with the real audit log in ``folder`` (on a full disk
    with ``disk_full``), an admin key, and what reads the log back."""
    from inferno.plugins.audit.files import log_name, today
    from inferno.plugins.audit.keys import keyring_from, new_key
    from inferno.plugins.audit.verify import read_records

    audit_key = new_key()
    folder.mkdir()
    if disk_full:
        (folder / log_name(1, today())).symlink_to("/dev/full")
    kernel = make_kernel({"auth": {"api_key": {}}, "security": {"audit_successes": False},
                          "audit": {"enabled": True, "key": audit_key, "fsync": "never",
                                    "directory": str(folder), "fail_closed": fail_closed}})
    await kernel.start(protocols=False)
    admin = kernel.drivers("auth")["api_key"].store.create("root", roles=["admin"])[1]
    return kernel, admin, lambda: list(read_records(folder, keyring_from({"key": audit_key})))


async def test_key_changes_are_audited_with_the_id_never_the_key(make_kernel: Any,
                                                                 tmp_path: Path) -> None:
    kernel, admin, records = await audited_kernel(make_kernel, tmp_path / "audit")
    try:
        gateway = kernel.service("gateway")
        created = (await gateway.run(call("keys.create", {
            "name": "ci", "roles": ["user"]}, admin))).value
        rotated = (await gateway.run(call("keys.rotate", {"id": "ci"}, admin))).value
        await gateway.run(call("keys.revoke", {"id": rotated["id"]}, admin))
    finally:
        await kernel.stop()
    mine = [r for r in records() if r["action"].startswith("keys.")]
    assert [(r["action"], r["outcome"], r["resource"]) for r in mine] == [
        ("keys.create", "ok", created["id"]), ("keys.rotate", "ok", created["id"]),
        ("keys.revoke", "ok", rotated["id"])]
    root = f"key:{admin.split('_')[1]}"
    assert {r["principal"] for r in mine} == {root}
    assert mine[1]["details"]["new_key_id"] == rotated["id"]
    text = json.dumps(records())
    assert created["key"] not in text
    assert rotated["key"] not in text


@pytest.mark.parametrize(("fail_closed", "kept"), [(True, ["root"]), (False, ["root", "ci"])])
async def test_an_unwritable_audit_log_withdraws_a_new_key_when_it_fails_closed(
        make_kernel: Any, tmp_path: Path, fail_closed: bool, kept: list[str]) -> None:
    kernel, admin, _ = await audited_kernel(make_kernel, tmp_path / "audit", disk_full=True,
                                            fail_closed=fail_closed)
    try:
        creating = kernel.service("gateway").run(call("keys.create", {
            "name": "ci", "roles": ["user"]}, admin))
        if fail_closed:
            with pytest.raises(ApiError, match=r"audit log cannot be written") as caught:
                await creating
            assert caught.value.status == 503
        else:
            await creating
        names = [r.name for r in kernel.drivers("auth")["api_key"].store.list()]
    finally:
        await kernel.stop()
    assert names == kept


# --------------------------------------------------------------------------- HTTP


async def fetch(method: str, url: str, key: str | None = None, **kwargs: Any
                ) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session, \
            session.request(method, url, headers=headers, **kwargs) as response:
        return response.status, await response.json(content_type=None), response.headers


@pytest.fixture
def keys_server(tmp_path: Path) -> Any:
    """The edge profile with API keys instead of anonymous access, its store at a known
    path; ``admin`` is a key with the admin role."""
    store = tmp_path / "keys.sqlite"
    sets = ["auth.none.enabled=false", f'auth.api_key.store="{store}"']
    with ServerThread("edge", tmp_path / "data", sets=sets) as server:
        server.admin = KeyStore(store).create("root", roles=["admin"])[1]
        server.store_path = store
        yield server


async def test_a_key_created_over_http_works_until_it_is_revoked(keys_server: Any) -> None:
    url = keys_server.url
    body = {"name": "app", "roles": ["user"], "expires": "30d", "limits": {"concurrent": 4}}
    status, created, headers = await fetch("POST", url + "/api/v1/keys", keys_server.admin,
                                           json=body)
    assert status == 201, created
    assert headers["Cache-Control"] == "no-store"
    assert created["key"].startswith(f"inf_{created['id']}_")
    assert created["owner"] == f"key:{keys_server.admin.split('_')[1]}"
    assert (await fetch("GET", url + "/v1/models", created["key"]))[0] == 200

    status, listed, _ = await fetch("GET", url + "/api/v1/keys", keys_server.admin)
    assert status == 200
    assert {k["name"]: k["status"] for k in listed["keys"]} == {"root": "active", "app": "active"}
    assert created["key"] not in repr(listed)

    status, revoked, _ = await fetch("DELETE", url + f"/api/v1/keys/{created['id']}",
                                     keys_server.admin)
    assert status == 200
    assert revoked["status"] == "revoked"
    status, refused, _ = await fetch("GET", url + "/v1/models", created["key"])
    assert status == 401
    assert refused["error"]["message"] == "API key revoked"


async def test_rotating_over_http_replaces_the_key(keys_server: Any) -> None:
    url = keys_server.url
    _, created, _ = await fetch("POST", url + "/api/v1/keys", keys_server.admin,
                                json={"name": "app", "roles": ["viewer"]})
    status, rotated, _ = await fetch("POST", url + "/api/v1/keys/app/rotate",
                                     keys_server.admin)
    assert status == 200
    assert rotated["replaces"] == created["id"]
    assert (await fetch("GET", url + "/v1/models", created["key"]))[0] == 401
    assert (await fetch("GET", url + "/v1/models", rotated["key"]))[0] == 200


async def test_the_admin_routes_need_keys_manage(keys_server: Any) -> None:
    url = keys_server.url
    status, _, headers = await fetch("GET", url + "/api/v1/keys")
    assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="inferno"')
    _, user = KeyStore(keys_server.store_path).create("someone", roles=["operator"])
    status, body, _ = await fetch("POST", url + "/api/v1/keys", user,
                                  json={"name": "mine", "roles": ["admin"]})
    assert status == 403, body
    assert [r.name for r in KeyStore(keys_server.store_path).list()] == ["root", "someone"]


@pytest.mark.parametrize(("body", "param"), [
    ({"name": "x", "roles": "user"}, "roles"),
    ({"name": "x", "roles": ["wizard"]}, "roles"),
    ({"name": "has space", "roles": ["user"]}, "name"),
    ({"name": "x", "roles": ["user"], "limits": {"concurrent": 0}}, "limits.concurrent"),
    ({"name": "x", "roles": ["user"], "expires": "tomorrow"}, "expires"),
    ({"name": "x", "roles": ["user"], "colour": "red"}, "colour"),
])
async def test_a_malformed_key_request_names_the_field(keys_server: Any, body: dict[str, Any],
                                                       param: str) -> None:
    status, answer, _ = await fetch("POST", keys_server.url + "/api/v1/keys",
                                    keys_server.admin, json=body)
    assert status == 400, answer
    assert answer["error"]["param"] == param


async def test_unknown_and_conflicting_keys_are_404_and_409(keys_server: Any) -> None:
    url = keys_server.url
    missing = await fetch("DELETE", url + "/api/v1/keys/nosuch", keys_server.admin)
    taken = await fetch("POST", url + "/api/v1/keys", keys_server.admin,
                        json={"name": "root", "roles": ["user"]})
    assert (missing[0], missing[1]["error"]["code"]) == (404, "key_not_found")
    assert (taken[0], taken[1]["error"]["code"]) == (409, "key_conflict")
