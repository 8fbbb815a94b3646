"""SHA-256 digests are computed once per file version and remembered in a shared SQLite file."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from inferno.plugins.models.errors import ModelFileError
from inferno.plugins.models.integrity import ChecksumCache

from .model_files import write_garbage, write_tiny_onnx


@pytest.fixture
def cache(tmp_path: Path) -> ChecksumCache:
    return ChecksumCache(tmp_path / "db" / "checksums.sqlite")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_onnx(tmp_path / "tiny.onnx")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(db_path: Path) -> list[tuple[str, int, int, str]]:
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT path, size, mtime_ns, sha256 FROM checksums").fetchall()


def rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    stat = path.stat()
    assert len(data) == stat.st_size
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_digest_is_the_files_sha256(cache: ChecksumCache, model: Path) -> None:
    assert cache.sha256(model) == sha256_of(model)


def test_digest_of_a_file_larger_than_one_block(cache: ChecksumCache, tmp_path: Path) -> None:
    path = write_garbage(tmp_path / "big.bin", 3 * 1024 * 1024 + 17)
    assert cache.sha256(path) == sha256_of(path)


def test_digest_of_a_real_model(cache: ChecksumCache, minilm_onnx: Path) -> None:
    assert cache.sha256(minilm_onnx) == sha256_of(minilm_onnx)


def test_digest_is_stored_with_resolved_path_size_and_mtime(cache: ChecksumCache,
                                                            model: Path) -> None:
    digest = cache.sha256(model)
    stat = model.stat()
    assert rows(cache.db_path) == [(str(model.resolve()), stat.st_size, stat.st_mtime_ns, digest)]


def test_second_call_is_served_from_the_cache_without_reading(cache: ChecksumCache,
                                                              model: Path) -> None:
    first = cache.sha256(model)
    # Same size, same mtime, other bytes: only a cache that does not read the file says `first`
    rewrite_keeping_size_and_mtime(model, bytes(model.stat().st_size))
    assert cache.sha256(model) == first != sha256_of(model)


def test_cache_outlives_the_object(tmp_path: Path, model: Path) -> None:
    db_path = tmp_path / "checksums.sqlite"
    first = ChecksumCache(db_path).sha256(model)
    rewrite_keeping_size_and_mtime(model, bytes(model.stat().st_size))
    assert ChecksumCache(db_path).sha256(model) == first


def test_a_new_mtime_is_hashed_again(cache: ChecksumCache, model: Path) -> None:
    cache.sha256(model)
    rewrite_keeping_size_and_mtime(model, bytes(model.stat().st_size))
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.sha256(model) == sha256_of(model)
    assert len(rows(cache.db_path)) == 1


def test_a_new_size_is_hashed_again(cache: ChecksumCache, model: Path) -> None:
    cache.sha256(model)
    stat = model.stat()
    model.write_bytes(model.read_bytes() + b"\0")
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.sha256(model) == sha256_of(model)


def test_other_spellings_of_a_path_share_one_entry(cache: ChecksumCache, model: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    link = model.with_name("link.onnx")
    link.symlink_to(model)
    monkeypatch.chdir(model.parent)
    digests = {cache.sha256(model), cache.sha256(link), cache.sha256(Path("tiny.onnx"))}
    assert digests == {sha256_of(model)}
    assert len(rows(cache.db_path)) == 1


def test_database_runs_in_wal_mode(cache: ChecksumCache) -> None:
    with sqlite3.connect(cache.db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_two_processes_share_one_database(tmp_path: Path) -> None:
    files = [write_garbage(tmp_path / f"model{index}.bin", 64 * 1024 + index)
             for index in range(20)]
    db_path = tmp_path / "checksums.sqlite"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from inferno.plugins.models.integrity import ChecksumCache
        cache = ChecksumCache(Path({str(db_path)!r}))
        for name in {[str(path) for path in files]!r}:
            cache.sha256(Path(name))
    """)
    workers = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    errors = [worker.communicate(timeout=60)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], errors
    stored = {path: digest for path, _, _, digest in rows(db_path)}
    assert stored == {str(path.resolve()): sha256_of(path) for path in files}


def test_missing_file_is_a_model_file_error(cache: ChecksumCache, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="missing"):
        cache.sha256(tmp_path / "absent.gguf")


def test_verify_accepts_the_right_digest(cache: ChecksumCache, model: Path) -> None:
    cache.verify(model, sha256_of(model))


def test_verify_accepts_a_prefix_and_upper_case(cache: ChecksumCache, model: Path) -> None:
    cache.verify(model, "SHA256:" + sha256_of(model).upper())


def test_verify_names_both_digests_on_a_mismatch(cache: ChecksumCache, model: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(ModelFileError) as caught:
        cache.verify(model, f"sha256:{wrong}")
    assert caught.value.subject == str(model)
    assert caught.value.reason == f"checksum mismatch: expected {wrong}, got {sha256_of(model)}"


@pytest.mark.parametrize("expected", ["", "abc", "g" * 64, "0" * 63, "md5:" + "0" * 64])
def test_verify_rejects_a_malformed_expected_digest(cache: ChecksumCache, model: Path,
                                                   expected: str) -> None:
    with pytest.raises(ModelFileError, match="malformed expected checksum"):
        cache.verify(model, expected)


def test_verify_after_the_file_changed(cache: ChecksumCache, model: Path) -> None:
    original = sha256_of(model)
    cache.verify(model, original)
    model.write_bytes(model.read_bytes() + b"tampered")
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        cache.verify(model, original)
