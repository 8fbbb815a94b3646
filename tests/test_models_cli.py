"""The model commands, run as a user runs them: the installed ``inferno`` on real models."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.conftest import INFERNO, run_inferno
from tests.model_files import write_tiny_gguf


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def tiny_config(tmp_path: Path, tiny: Path) -> Path:
    config = tmp_path / "inferno.toml"
    config.write_text(f'[plugins.models.entries.tiny]\npath = "{tiny}"\n'
                      f'[backends.gguf]\ncontext_size = 256\n')
    return config


def test_the_demo_model_completes_out_of_the_box(gemma_path: Path) -> None:
    result = run_inferno("run", "gemma-3-270m", "The capital of France is",
                         "--temperature", "0", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" the capital of the country of France")
    assert "ready" not in result.stderr  # start-up lines stay out of a command's way


def test_the_demo_embedding_model_prints_a_unit_vector(minilm_onnx: Path) -> None:
    result = run_inferno("embed", "minilm", "hello", "good morning")
    assert result.returncode == 0, result.stderr
    vectors = [json.loads(line) for line in result.stdout.splitlines()]
    assert [len(v) for v in vectors] == [384, 384]
    assert math.isclose(math.fsum(x * x for x in vectors[0]), 1.0, abs_tol=1e-4)


def test_run_streams_a_chat_from_stdin_and_reports_usage(gemma_path: Path) -> None:
    process = subprocess.run(
        [str(INFERNO), "run", "gemma-3-270m", "-", "--chat", "--max-tokens", "5",
         "--temperature", "0", "--stats"], input="Say hello.", capture_output=True, text=True,
        timeout=60, check=False)
    assert process.returncode == 0, process.stderr
    usage = json.loads(process.stderr.strip().splitlines()[-1])
    assert usage["completion_tokens"] <= 5
    assert usage["finish_reason"] in ("stop", "length")
    assert usage["prompt_tokens"] > 5  # the chat template wrapped the message


def test_bad_sampling_and_unknown_models_are_clear_errors(tiny_config: Path) -> None:
    result = run_inferno("--config", str(tiny_config), "run", "tiny", "hi",
                         "--temperature", "-1")
    assert result.returncode == 1
    assert "temperature must be in [0, 100], got -1.0" in result.stderr
    result = run_inferno("--config", str(tiny_config), "embed", "nosuch", "hi")
    assert result.returncode == 1
    assert "nosuch: no such model" in result.stderr


def test_models_list_shows_formats_and_unavailable_models(tmp_path: Path, tiny: Path) -> None:
    config = tmp_path / "more.toml"
    config.write_text(f'[plugins.models.entries.tiny]\npath = "{tiny}"\n'
                      '[plugins.models.entries.ghost]\npath = "pkg:not_installed_pkg:build"\n')
    result = run_inferno("--config", str(config), "models", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["tiny"]["format"] == "gguf"
    assert rows["tiny"]["size"] == tiny.stat().st_size
    assert "not_installed_pkg" in rows["ghost"]["unavailable"]
    assert rows["minilm"]["format"] == "onnx"  # the edge profile's demo models too
    assert rows["minilm"]["description"].startswith("all-MiniLM-L6-v2")
    assert rows["tiny"]["description"] is None


def test_add_info_verify_remove(tmp_path: Path, tiny: Path) -> None:
    result = run_inferno("models", "add", "my-tiny", str(tiny), "--pin", "--alias", "wee")
    assert result.returncode == 0, result.stderr
    assert "added my-tiny: gguf" in result.stdout

    info = json.loads(run_inferno("models", "info", "wee", "--json").stdout)
    assert info["name"] == "my-tiny"
    assert info["metadata"]["architecture"] == "llama"
    assert info["sha256"] == hashlib.sha256(tiny.read_bytes()).hexdigest()

    result = run_inferno("models", "verify", "my-tiny")
    assert result.returncode == 0
    assert result.stdout.startswith("ok        my-tiny")

    write_tiny_gguf(tmp_path / "other.gguf", seed=5).replace(tiny)  # a different file now
    result = run_inferno("models", "verify", "my-tiny")
    assert result.returncode == 1
    assert "checksum mismatch" in result.stdout

    assert run_inferno("models", "remove", "my-tiny").returncode == 0
    assert "my-tiny" not in run_inferno("models", "list").stdout
    assert tiny.exists()  # removing a model never touches its file


def test_add_refuses_what_is_not_a_model(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("just some notes")
    result = run_inferno("models", "add", "notes", str(text))
    assert result.returncode == 1
    assert "not a GGUF, ONNX, SafeTensors or PyTorch file" in result.stderr
    result = run_inferno("models", "add", "../escape", str(text))
    assert result.returncode == 1
    assert "not a valid model name" in result.stderr


def test_convert_quantises_validates_and_leaves_the_source_alone(tmp_path: Path,
                                                                 tiny: Path) -> None:
    before = hashlib.sha256(tiny.read_bytes()).hexdigest()
    out = tmp_path / "tiny-q8.gguf"
    result = run_inferno("convert", str(tiny), str(out), "--quantize", "Q8_0")
    assert result.returncode == 0, result.stderr
    assert "validated" in result.stdout
    assert "generated" in result.stdout
    assert out.stat().st_size < tiny.stat().st_size
    assert hashlib.sha256(tiny.read_bytes()).hexdigest() == before
    assert run_inferno("models", "add", "q8", str(out)).returncode == 0
    info = json.loads(run_inferno("models", "info", "q8", "--json").stdout)
    assert info["metadata"]["file_type"] == "Q8_0"


def test_convert_names_an_unknown_quantisation(tmp_path: Path, tiny: Path) -> None:
    result = run_inferno("convert", str(tiny), str(tmp_path / "x.gguf"), "--quantize", "Q9_Z")
    assert result.returncode == 1
    assert "Q9_Z" in result.stderr
    assert "Q4_K_M" in result.stderr  # the accepted names are listed
    assert not (tmp_path / "x.gguf").exists()


def test_bench_reports_speed_as_json(tiny_config: Path) -> None:
    result = run_inferno("--config", str(tiny_config), "bench", "tiny", "--runs", "1",
                         "--tokens", "8", "--prompt-tokens", "32", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["load_seconds"] > 0
    assert figures["decode_tokens_per_second"] > 0
    assert figures["time_to_first_token_s"] > 0
    assert figures["info"]["format"] == "gguf"
