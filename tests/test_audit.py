"""The audit log as plugins use it: real files, real AES-GCM, real processes and a real kernel."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from inferno.kernel import ConfigError, Principal
from inferno.plugins.audit.errors import AuditUnavailable
from inferno.plugins.audit.files import log_files, log_name, today
from inferno.plugins.audit.keys import keyring_from, new_key
from inferno.plugins.audit.log import AuditLog
from inferno.plugins.audit.settings import DEFAULTS, AuditSettings
from inferno.plugins.audit.verify import Verification, read_records, verify
from inferno.plugins.models.events import ModelFailed, ModelLoaded


def section(directory: Path, key: str, **overrides: Any) -> dict[str, Any]:
    return {**DEFAULTS, "key": key, "directory": str(directory), "fsync": "never",
            **overrides}


async def open_log(config: Mapping[str, Any]) -> AuditLog:
    return await AuditLog.open(AuditSettings.from_section(config, Path("/nonexistent")),
                               keyring_from(config))


def check(config: Mapping[str, Any]) -> Verification:
    return verify(Path(config["directory"]), keyring_from(config))


def events(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(read_records(Path(config["directory"]), keyring_from(config)))


@pytest.fixture
def key() -> str:
    return new_key()


async def test_records_are_sealed_chained_and_read_back(tmp_path: Path, key: str) -> None:
    config = section(tmp_path / "audit", key, fsync="always")
    audit = await open_log(config)
    alice = Principal(id="alice", roles=frozenset({"admin"}), attributes={})
    await audit.record("keys.create", "ok", principal=alice, source="10.0.0.7",
                       request_id="req-1", resource="key-42", details={"name": "ci"})
    await audit.record("auth.failure", "denied", source="10.0.0.8")
    await audit.close()

    result = check(config)
    assert result.ok, result.problem
    assert (result.records, result.last_seq) == (2, 2)
    first, second = events(config)
    assert first | {"time": None} == {
        "seq": 1, "key_id": audit.key.id, "time": None, "principal": "alice",
        "source": "10.0.0.7", "request_id": "req-1", "action": "keys.create",
        "resource": "key-42", "outcome": "ok", "details": {"name": "ci"}}
    assert first["time"].endswith("Z")
    assert (second["principal"], second["outcome"]) == (None, "denied")
    text = (tmp_path / "audit" / log_files(tmp_path / "audit")[0]).read_text()
    assert "alice" not in text  # sealed, not merely encoded
    assert "keys.create" not in text


async def test_a_record_is_in_the_file_when_record_returns(tmp_path: Path, key: str) -> None:
    config = section(tmp_path / "audit", key)
    audit = await open_log(config)
    await audit.record("models.load", "ok", resource="tiny")
    assert [e["action"] for e in events(config)] == ["models.load"]  # read by another reader
    assert check(config).ok
    await audit.close()
    with pytest.raises(AuditUnavailable, match="closed"):
        await audit.record("keys.revoke", "ok")


async def test_secret_details_are_masked_before_sealing(tmp_path: Path, key: str) -> None:
    config = section(tmp_path / "audit", key)
    audit = await open_log(config)
    await audit.record("keys.create", "ok", details={"api_key": "sk-live-123", "name": "ci",
                                                     "nested": {"token": "t0k"}})
    await audit.close()
    (event,) = events(config)
    assert event["details"] == {"api_key": "********", "name": "ci",
                                "nested": {"token": "********"}}


async def test_rotation_by_size_keeps_one_verifiable_chain(tmp_path: Path, key: str) -> None:
    config = section(tmp_path / "audit", key, max_bytes=4096, checkpoint_every=50)
    audit = await open_log(config)
    for index in range(120):
        await audit.record("batch.submit", "ok", details={"n": index})
    await audit.close()

    files = log_files(tmp_path / "audit")
    assert len(files) > 3
    assert files == sorted(files)
    result = check(config)
    assert result.ok, result.problem
    assert (result.records, result.files) == (120, len(files))
    assert [e["details"]["n"] for e in events(config)] == list(range(120))
    for name in files:  # every file ends with a signed checkpoint
        last = (tmp_path / "audit" / name).read_text().splitlines()[-1]
        assert json.loads(last)["type"] == "checkpoint"


async def test_a_new_day_starts_a_new_file(tmp_path: Path, key: str) -> None:
    config = section(tmp_path / "audit", key)
    audit = await open_log(config)
    await audit.record("models.load", "ok")
    await audit.close()
    (name,) = log_files(tmp_path / "audit")
    (tmp_path / "audit" / name).rename(tmp_path / "audit" / log_name(1, "20200101"))

    audit = await open_log(config)
    await audit.record("models.unload", "ok")
    await audit.close()
    assert log_files(tmp_path / "audit") == [log_name(1, "20200101"), log_name(2, today())]
    assert check(config).ok


async def test_two_writers_on_one_log_keep_one_chain(tmp_path: Path, key: str) -> None:
    config = section(tmp_path / "audit", key, checkpoint_every=7)
    server, shell = await open_log(config), await open_log(config)
    for index in range(30):
        writer = server if index % 3 else shell
        await writer.record("keys.create", "ok", details={"n": index})
    await asyncio.gather(*(w.record("auth.success", "ok") for w in (server, shell) * 10))
    await server.close()
    await shell.close()
    result = check(config)
    assert result.ok, result.problem
    assert result.records == 50
    assert [e["seq"] for e in events(config)] == list(range(1, 51))


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path, key: str) -> None:
    config = section(tmp_path / "audit", key, fsync="interval", checkpoint_every=25)
    script = textwrap.dedent("""
        import asyncio, json, sys
        from pathlib import Path
        from inferno.plugins.audit.keys import keyring_from
        from inferno.plugins.audit.log import AuditLog
        from inferno.plugins.audit.settings import AuditSettings

        async def main():
            config = json.loads(sys.argv[1])
            audit = await AuditLog.open(AuditSettings.from_section(config, Path("/")),
                                        keyring_from(config))
            print("ready", flush=True)
            sys.stdin.readline()  # all writers start together
            for n in range(COUNT):
                await audit.record("batch.submit", "ok", principal=sys.argv[2],
                                   details={"n": n})
            await audit.close()

        asyncio.run(main())
    """).replace("COUNT", "400")
    writers = [subprocess.Popen([sys.executable, "-c", script, json.dumps(config), name],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for name in ("a", "b", "c")]
    for writer in writers:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "ready\n"
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.close()
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0, 0]

    result = check(config)
    assert result.ok, result.problem
    assert result.records == 1200
    by_writer = {name: [e["details"]["n"] for e in events(config) if e["principal"] == name]
                 for name in "abc"}
    assert by_writer == {name: list(range(400)) for name in "abc"}


async def test_verify_during_appends_sees_a_consistent_log(tmp_path: Path, key: str) -> None:
    config = section(tmp_path / "audit", key, checkpoint_every=10, max_bytes=65536)
    audit = await open_log(config)
    stop = asyncio.Event()

    async def append() -> None:
        while not stop.is_set():
            await audit.record("auth.success", "ok", details={"pad": "x" * 200})
            await asyncio.sleep(0)

    writer = asyncio.create_task(append())
    results = []
    for _ in range(20):
        results.append(await asyncio.to_thread(check, config))
    stop.set()
    await writer
    await audit.close()
    assert [r.problem for r in results] == [None] * 20
    assert results[-1].records > results[0].records


def test_a_line_that_no_longer_parses_is_modified_or_corrupt(tmp_path: Path, key: str) -> None:
    config = section(tmp_path / "audit", key, checkpoint_every=100)

    async def write() -> None:
        audit = await open_log(config)
        for _ in range(4):
            await audit.record("auth.success", "ok")
        await audit.close()

    asyncio.run(write())
    (name,) = log_files(tmp_path / "audit")
    path = tmp_path / "audit" / name
    original = path.read_text().splitlines(keepends=True)
    path.write_text("".join([original[0], original[1].replace('"ct"', '"ct', 1),
                             *original[2:]]))
    problem = check(config).problem
    assert problem is not None
    assert (problem.reason, problem.seq, problem.line) == ("modified", 2, 2)
    path.write_text("".join([*original, "this is not a record\n"]))
    problem = check(config).problem
    assert problem is not None
    assert (problem.reason, problem.line) == ("corrupt", len(original) + 1)


async def test_a_full_disk_raises_audit_unavailable(tmp_path: Path, key: str) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    (directory / log_name(1, today())).symlink_to("/dev/full")
    config = section(directory, key, fail_closed=True)
    audit = await open_log(config)
    assert audit.fail_closed is True
    for _ in range(2):  # and again: nothing half-written is left in the way
        with pytest.raises(AuditUnavailable, match="No space left on device"):
            await audit.record("keys.create", "ok")
    await audit.close()


async def test_a_full_disk_fails_every_waiting_record_when_syncing(tmp_path: Path,
                                                                   key: str) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    (directory / log_name(1, today())).symlink_to("/dev/full")
    audit = await open_log(section(directory, key, fsync="always"))
    results = await asyncio.gather(*(audit.record("auth.success", "ok") for _ in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, AuditUnavailable) for r in results)
    await audit.close()


async def test_rotated_keys_still_read_older_records(tmp_path: Path, key: str) -> None:
    old = section(tmp_path / "audit", key)
    audit = await open_log(old)
    await audit.record("keys.create", "ok", details={"era": "old"})
    await audit.close()

    new = section(tmp_path / "audit", new_key(), key_id="2025-q3", previous_keys=[key])
    audit = await open_log(new)
    await audit.record("keys.create", "ok", details={"era": "new"})
    await audit.close()

    result = check(new)
    assert result.ok, result.problem
    read = events(new)
    assert [(e["details"]["era"], e["key_id"]) for e in read] == [
        ("old", read[0]["key_id"]), ("new", "2025-q3")]
    without_old = check({**new, "previous_keys": []})
    assert without_old.problem is not None
    assert (without_old.problem.reason, without_old.problem.seq) == ("wrong key", 1)


async def test_the_key_appears_in_no_file_and_no_repr(tmp_path: Path, key: str,
                                                      capfd: pytest.CaptureFixture[str]
                                                      ) -> None:
    config = section(tmp_path / "audit", key, checkpoint_every=2)
    audit = await open_log(config)
    for _ in range(5):
        await audit.record("auth.success", "ok")
    shown = f"{audit!r} {audit.keyring!r} {audit.key!r}"
    await audit.close()
    raw = base64.b64decode(key)
    for path in (tmp_path / "audit").iterdir():
        content = path.read_bytes()
        assert key.encode() not in content, path.name
        assert raw not in content, path.name
    captured = capfd.readouterr()
    assert key not in shown + captured.out + captured.err


async def test_an_incomplete_last_line_is_cut_by_the_next_writer(tmp_path: Path,
                                                                 key: str) -> None:
    config = section(tmp_path / "audit", key)
    audit = await open_log(config)
    await audit.record("models.load", "ok")
    await audit.close()
    (name,) = log_files(tmp_path / "audit")
    with (tmp_path / "audit" / name).open("ab") as handle:
        handle.write(b'{"v":1,"seq":2,"kid":"')  # a writer died mid-line

    audit = await open_log(config)
    await audit.record("models.unload", "ok")
    await audit.close()
    assert check(config).ok
    assert [e["action"] for e in events(config)] == ["models.load", "models.unload"]


async def test_a_cut_log_stays_visibly_cut_after_more_records(tmp_path: Path,
                                                              key: str) -> None:
    config = section(tmp_path / "audit", key, checkpoint_every=100)
    audit = await open_log(config)
    for _ in range(5):
        await audit.record("auth.success", "ok")
    await audit.close()
    (name,) = log_files(tmp_path / "audit")
    path = tmp_path / "audit" / name
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))

    audit = await open_log(config)  # continues after the head's seq 5, not after seq 3
    await audit.record("keys.revoke", "ok")
    await audit.close()
    result = check(config)
    assert result.problem is not None
    assert (result.problem.reason, result.problem.seq) == ("deleted", 4)


def test_enabled_without_a_key_refuses_to_start(make_kernel: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    monkeypatch.delenv("INFERNO_AUDIT__KEY", raising=False)
    kernel = make_kernel({"audit": {"enabled": True}})  # the profile itself is valid

    async def start() -> None:
        async with kernel.running(protocols=False):
            pass

    with pytest.raises(Exception) as caught:  # noqa: PT011 - the kernel wraps the cause
        asyncio.run(start())
    message = str(caught.value)
    assert "audit.key" in message
    for advice in ("INFERNO_AUDIT__KEY", "audit.key_file", "inferno audit keygen"):
        assert advice in message


def test_a_malformed_key_is_named_but_never_shown(make_kernel: Any, tmp_path: Path) -> None:
    short = base64.b64encode(b"sixteen byte key").decode()
    key_file = tmp_path / "audit.key"
    key_file.write_text("s3cr3t-n0t-base64!")
    kernel = make_kernel({"audit": {"key": short, "key_file": str(key_file),
                                    "previous_keys": ["also-s3cr3t!"]}}, configure=False)
    with pytest.raises(ConfigError) as caught:
        kernel.configure()
    problems = {p.key: p.message for p in caught.value.problems}
    assert "decodes to 16 bytes" in problems["audit.key"]
    assert "not valid base64" in problems["audit.key_file"]
    assert "not valid base64" in problems["audit.previous_keys"]
    for secret in (short, "s3cr3t-n0t-base64!", "also-s3cr3t!"):
        assert secret not in str(caught.value)


def test_the_kernel_records_model_events_and_offers_the_service(
        make_kernel: Any, run_kernel: Any, key: str, inferno_data_dir: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    kernel = make_kernel({"audit": {"enabled": True, "key": key, "fsync": "always"}})

    async def scenario(kernel: Any) -> None:
        audit = kernel.service("audit")
        await audit.record("keys.create", "ok", principal="ops", resource="key-1")
        kernel.bus.publish(ModelLoaded(model="tiny", backend="gguf", version="v1",
                                       seconds=0.5, memory_bytes=1024))
        kernel.bus.publish(ModelFailed(model="big", error="out of memory", stage="load"))
        await kernel.bus.drain()

    run_kernel(kernel, scenario)
    config = section(inferno_data_dir / "audit", key)
    assert check(config).ok
    read = [(e["action"], e["outcome"], e["principal"], e["resource"]) for e in events(config)]
    assert ("keys.create", "ok", "ops", "key-1") in read
    assert ("models.load", "ok", "system", "tiny") in read
    assert ("models.load", "failed", "system", "big") in read
    assert ("kernel.start", "ok", "system", "") in read
    assert read[-1][:3] == ("kernel.stop", "ok", "system")
    captured = capfd.readouterr()
    assert key not in captured.out + captured.err


def test_no_service_and_no_files_while_disabled(make_kernel: Any, run_kernel: Any,
                                                inferno_data_dir: Path) -> None:
    kernel = make_kernel()

    async def scenario(kernel: Any) -> None:
        with pytest.raises(LookupError):
            kernel.service("audit")

    run_kernel(kernel, scenario)
    assert not (inferno_data_dir / "audit").exists()
