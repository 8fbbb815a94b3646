"""``inferno audit`` as an operator runs it: the installed command on a real log.

Each tampering an attacker without the key can do to the files is caught by ``verify``,
which names the first broken record and the reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from inferno.plugins.audit.files import log_files
from inferno.plugins.audit.keys import keyring_from, new_key
from inferno.plugins.audit.log import AuditLog
from inferno.plugins.audit.settings import DEFAULTS, AuditSettings
from tests.conftest import run_inferno

#: Who did what in the log the tests write: (principal, action, outcome).
ACTIONS = [("alice", "keys.create", "ok"), ("bob", "auth.failure", "denied"),
           ("alice", "models.load", "ok"), ("carol", "authz.denied", "denied"),
           ("alice", "keys.revoke", "ok"), ("bob", "auth.success", "ok"),
           ("system", "models.unload", "ok"), ("carol", "batch.submit", "ok"),
           ("alice", "models.update", "failed"), ("bob", "keys.create", "ok")]


def write_log(directory: Path, key: str, **settings: Any) -> None:
    config = {**DEFAULTS, "key": key, "directory": str(directory), "fsync": "never",
              "checkpoint_every": 4, **settings}

    async def main() -> None:
        audit = await AuditLog.open(AuditSettings.from_section(config, directory),
                                    keyring_from(config))
        for index, (principal, action, outcome) in enumerate(ACTIONS):
            await audit.record(action, outcome, principal=principal, source="10.1.2.3",
                               request_id=f"req-{index}", resource=f"thing-{index}")
        await audit.close()

    asyncio.run(main())


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    value = new_key()
    monkeypatch.setenv("INFERNO_AUDIT__KEY", value)
    return value


@pytest.fixture
def log_file(tmp_path: Path, key: str) -> Path:
    """The one file of a ten-record log in the data directory's ``audit`` folder."""
    directory = tmp_path / "data" / "audit"
    write_log(directory, key)
    (name,) = log_files(directory)
    return directory / name


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def line_of(path: Path, seq: int) -> int:
    """The index of record ``seq``'s line (checkpoints have a "type")."""
    return next(i for i, text in enumerate(lines(path))
                if json.loads(text).get("seq") == seq and "type" not in json.loads(text))


def edit(path: Path, change: Callable[[list[str]], list[str]]) -> None:
    path.write_text("".join(change(lines(path))))


def verify_fails(reason: str, seq: int, *args: str) -> str:
    result = run_inferno("audit", "verify", *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith(f"FAILED {reason}: "), result.stdout
    assert f"(seq {seq})" in result.stdout, result.stdout
    return result.stdout


def test_verify_reports_an_intact_log(log_file: Path, key: str) -> None:
    result = run_inferno("audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK 10 records, 3 checkpoints, 1 files, last seq 10")
    assert key not in result.stdout + result.stderr


def test_a_changed_byte_is_modified(log_file: Path) -> None:
    index = line_of(log_file, 3)

    def flip(found: list[str]) -> list[str]:
        record = json.loads(found[index])
        ct = record["ct"]
        record["ct"] = ct[:10] + ("A" if ct[10] != "A" else "B") + ct[11:]
        found[index] = json.dumps(record, separators=(",", ":")) + "\n"
        return found

    edit(log_file, flip)
    assert f"{log_file.name}:{index + 1}" in verify_fails("modified", 3)


def test_a_changed_byte_with_its_hashes_recomputed_is_still_modified(log_file: Path) -> None:
    from inferno.plugins.audit.records import chain_hash

    def forge(found: list[str]) -> list[str]:
        prev = None
        for index, text in enumerate(found):  # redo the whole chain, as anyone can
            record = json.loads(text)
            if "type" in record:
                continue
            if record["seq"] == 6:
                raw = bytearray(base64.b64decode(record["ct"]))
                raw[3] ^= 1
                record["ct"] = base64.b64encode(bytes(raw)).decode()
            record["prev"] = prev or record["prev"]
            record["hash"] = chain_hash(record["prev"], version=record["v"], seq=record["seq"],
                                        kid=record["kid"], nonce=record["nonce"], ct=record["ct"])
            prev = record["hash"]
            found[index] = json.dumps(record, separators=(",", ":")) + "\n"
        return found

    edit(log_file, forge)
    verify_fails("modified", 6)


def test_a_deleted_line_is_deleted(log_file: Path) -> None:
    index = line_of(log_file, 6)
    edit(log_file, lambda found: found[:index] + found[index + 1:])
    assert "record 6 is missing" in verify_fails("deleted", 6)


def test_two_swapped_lines_are_reordered(log_file: Path) -> None:
    first, second = line_of(log_file, 6), line_of(log_file, 7)
    assert second == first + 1

    def swap(found: list[str]) -> list[str]:
        found[first], found[second] = found[second], found[first]
        return found

    edit(log_file, swap)
    assert "record 7 comes before record 6" in verify_fails("reordered", 7)


def test_a_cut_tail_is_truncated(log_file: Path) -> None:
    edit(log_file, lambda found: found[:line_of(log_file, 9)])  # records 9, 10 and the end
    assert "written up to seq 10" in verify_fails("truncated", 9)


def test_a_tail_cut_mid_line_is_truncated(log_file: Path) -> None:
    keep = sum(len(text) for text in lines(log_file)[:line_of(log_file, 10)]) + 50
    log_file.write_bytes(log_file.read_bytes()[:keep])
    assert "the last line is incomplete" in verify_fails("truncated", 10)


def test_the_wrong_key_is_wrong_key(log_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = new_key()
    monkeypatch.setenv("INFERNO_AUDIT__KEY", other)
    output = verify_fails("wrong key", 1)
    assert other not in output


def test_the_wrong_key_under_the_same_key_id_is_wrong_key(tmp_path: Path, key: str,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    write_log(tmp_path / "data" / "audit", key, key_id="prod-1")
    monkeypatch.setenv("INFERNO_AUDIT__KEY", new_key())
    verify_fails("wrong key", 1, "--set", "audit.key_id='prod-1'")


def test_query_filters_by_principal_action_outcome_and_time(log_file: Path, key: str) -> None:
    def query(*args: str) -> list[dict[str, Any]]:
        result = run_inferno("audit", "query", *args)
        assert result.returncode == 0, result.stderr
        assert key not in result.stdout + result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    alice = query("--principal", "alice")
    assert [r["action"] for r in alice] == ["keys.create", "models.load", "keys.revoke",
                                            "models.update"]
    assert [r["seq"] for r in query("--action", "keys.*")] == [1, 5, 10]
    assert [r["principal"] for r in query("--outcome", "denied")] == ["bob", "carol"]
    assert len(query("--since", "1h")) == 10
    assert query("--until", "1h") == []
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert query("--since", tomorrow) == []
    assert len(query("--since", "2020-01-01", "--principal", "bob", "--action",
                     "auth.*")) == 2


def test_query_rejects_a_time_it_cannot_read(log_file: Path) -> None:
    result = run_inferno("audit", "query", "--since", "last tuesday")
    assert result.returncode == 2
    assert "neither an ISO date or time" in result.stderr


def test_export_writes_every_record_to_a_private_file(log_file: Path, tmp_path: Path,
                                                      key: str) -> None:
    target = tmp_path / "export.jsonl"
    result = run_inferno("audit", "export", "--output", str(target))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["principal"], r["action"], r["outcome"]) for r in records] == ACTIONS
    assert records[0]["source"] == "10.1.2.3"
    assert records[0]["request_id"] == "req-0"
    assert target.stat().st_mode & 0o077 == 0
    assert key not in result.stdout + result.stderr
    assert run_inferno("audit", "export").stdout == target.read_text()


def test_export_of_an_unreadable_record_says_to_verify(log_file: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERNO_AUDIT__KEY", new_key())
    result = run_inferno("audit", "export")
    assert result.returncode == 1
    assert "inferno audit verify" in result.stderr


def test_keygen_prints_a_fresh_32_byte_key() -> None:
    first, second = (run_inferno("audit", "keygen").stdout.strip() for _ in range(2))
    assert len(base64.b64decode(first, validate=True)) == 32
    assert first != second


def test_enabled_without_a_key_says_what_to_set(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.delenv("INFERNO_AUDIT__KEY", raising=False)
    valid = run_inferno("--set", "audit.enabled=true", "profile", "validate")
    assert valid.returncode == 0  # the key comes with the deployment, not the profile
    result = run_inferno("--set", "audit.enabled=true", "--set", "protocols.http.port=0",
                         "--set", f'kernel.data_dir="{tmp_path}"', "serve")
    assert result.returncode == 1
    for advice in ("audit.key", "INFERNO_AUDIT__KEY", "audit.key_file", "inferno audit keygen"):
        assert advice in result.stderr, result.stderr


def test_the_keys_are_masked_in_the_shown_profile(key: str) -> None:
    previous = new_key()
    result = run_inferno("profile", "show", "--set", f'audit.previous_keys=["{previous}"]')
    assert result.returncode == 0, result.stderr
    assert 'key = "********"' in result.stdout
    assert 'previous_keys = "********"' in result.stdout
    assert key not in result.stdout
    assert previous not in result.stdout


def test_commands_without_a_key_say_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERNO_AUDIT__KEY", raising=False)
    result = run_inferno("audit", "verify")
    assert result.returncode == 1
    assert "the audit log has no key" in result.stderr
