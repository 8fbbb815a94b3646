"""Model formats are recognised by content, and describe() reports what their headers say."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from inferno.plugins.models.errors import ModelFileError
from inferno.plugins.models.formats import ModelFile, describe, detect_format

from .model_files import (
    tiny_gguf_parameters,
    truncate,
    write_garbage,
    write_pytorch_legacy,
    write_pytorch_zip,
    write_safetensors,
    write_tiny_gguf,
    write_tiny_onnx,
    write_wrong_magic,
)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def reason(path: Path) -> str:
    with pytest.raises(ModelFileError) as caught:
        describe(path)
    assert caught.value.subject == str(path)
    return caught.value.reason


# --------------------------------------------------------------------------- generated files


def test_tiny_gguf_loads_and_generates_in_llama_cpp(tiny_gguf: Path) -> None:
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=str(tiny_gguf), n_ctx=256, n_threads=2, verbose=False)
    assert time.perf_counter() - started < 1.0
    try:
        completion = llm.create_completion("hello", max_tokens=4, temperature=0.0)
        assert completion["usage"]["completion_tokens"] >= 1
        assert isinstance(completion["choices"][0]["text"], str)
    finally:
        llm.close()


def test_tiny_gguf_of_unknown_architecture_is_refused_by_llama_cpp(tmp_path: Path) -> None:
    from llama_cpp import Llama

    path = write_tiny_gguf(tmp_path / "odd.gguf", arch="notanarch", n_layer=1)
    with pytest.raises(ValueError, match="Failed to load model"):
        Llama(model_path=str(path), verbose=False)


def test_tiny_onnx_runs_in_onnxruntime(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime

    path = write_tiny_onnx(tmp_path / "tiny.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": np.array([[1, 2, 3]], dtype=np.int64)})
    assert logits.shape == (1, 3, 4)


def test_hand_written_safetensors_reads_back_with_numpy(tmp_path: Path) -> None:
    import numpy as np

    path = write_safetensors(tmp_path / "small.safetensors")
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    begin, end = header["embed.weight"]["data_offsets"]
    weights = np.frombuffer(data[8 + length + begin:8 + length + end], dtype=np.float32)
    assert weights.reshape(header["embed.weight"]["shape"]).tolist()[1] == [3.0, 4.0, 5.0]


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(("writer", "expected"), [
    (write_tiny_onnx, "onnx"),
    (write_safetensors, "safetensors"),
    (write_pytorch_zip, "pytorch"),
    (write_pytorch_legacy, "pytorch"),
])
def test_generated_files_are_detected_by_content_whatever_their_name(
        tmp_path: Path, writer: Callable[[Path], Path], expected: str) -> None:
    path = writer(tmp_path / "model.gguf")  # a misleading extension on purpose
    assert detect_format(path) == expected


def test_gguf_is_detected_under_any_name(tiny_gguf: Path, tmp_path: Path) -> None:
    renamed = shutil.copy(tiny_gguf, tmp_path / "weights.onnx")
    assert detect_format(Path(renamed)) == "gguf"


def test_real_files_are_detected(gemma_path: Path, minilm_onnx: Path,
                                 minilm_files: Path) -> None:
    assert detect_format(gemma_path) == "gguf"
    assert detect_format(minilm_onnx) == "onnx"
    assert detect_format(minilm_files / "model.safetensors") == "safetensors"


def test_a_json_file_beside_a_model_is_not_a_model(minilm_files: Path) -> None:
    assert reason(minilm_files / "config.json").startswith(
        "not a GGUF, ONNX, SafeTensors or PyTorch file (starts with 0x")


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    assert reason(tmp_path / "absent.gguf") == "missing: no such file; check the path"


def test_directory(minilm_files: Path) -> None:
    assert reason(minilm_files).startswith("is a directory")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod cannot lock root out, so the operating system's refusal is staged
    path = write_safetensors(tmp_path / "locked.safetensors")

    def refuse(file: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr("builtins.open", refuse)
    assert reason(path).startswith("unreadable: permission denied")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.touch()
    assert reason(path).startswith("empty")


def test_garbage_names_its_first_bytes(tmp_path: Path) -> None:
    path = write_garbage(tmp_path / "garbage.bin", 4096)
    expected_start = path.read_bytes()[:8].hex()
    assert reason(path) == (
        f"not a GGUF, ONNX, SafeTensors or PyTorch file (starts with 0x{expected_start})")


def test_wrong_magic_is_an_unknown_format(tmp_path: Path) -> None:
    path = write_wrong_magic(tmp_path / "model.gguf")
    assert reason(path).startswith("not a GGUF, ONNX, SafeTensors or PyTorch file "
                                   "(starts with 0x47475558")


def test_unsupported_gguf_version_is_named(tiny_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = (1).to_bytes(4, "little")
    path = tmp_path / "v1.gguf"
    path.write_bytes(bytes(data))
    assert reason(path).startswith("GGUF version 1 is not supported (Inferno reads versions "
                                   "2 and 3)")


@pytest.mark.parametrize("keep_bytes", [16, 200, 4000])
def test_gguf_cut_inside_its_header_is_truncated(tiny_gguf: Path, tmp_path: Path,
                                                 keep_bytes: int) -> None:
    path = truncate(tiny_gguf, tmp_path / "cut.gguf", keep_bytes)
    assert reason(path).startswith("truncated: ")


def test_gguf_cut_inside_its_tensor_data_is_truncated(tiny_gguf: Path, tmp_path: Path) -> None:
    keep = tiny_gguf.stat().st_size - 1000
    path = truncate(tiny_gguf, tmp_path / "cut.gguf", keep)
    assert reason(path) == (f"truncated: the GGUF tensor data needs {keep + 1000} bytes but "
                            f"the file ends at byte {keep}; download or copy it again")


def test_gemma_cut_in_half_is_truncated(gemma_path: Path, tmp_path: Path) -> None:
    path = truncate(gemma_path, tmp_path / "half.gguf", 1_000_000)
    assert reason(path).startswith("truncated: the GGUF header lists 33 metadata entries and "
                                   "236 tensors")


def test_onnx_that_does_not_parse(tmp_path: Path) -> None:
    source = write_tiny_onnx(tmp_path / "tiny.onnx")
    path = truncate(source, tmp_path / "cut.onnx", source.stat().st_size // 2)
    assert reason(path).startswith("not a valid ONNX model: it does not parse")


def test_truncated_safetensors(minilm_files: Path, tmp_path: Path) -> None:
    path = truncate(minilm_files / "model.safetensors", tmp_path / "cut.safetensors", 100_000)
    assert reason(path).startswith("truncated: the SafeTensors header places tensor data up to")


def test_safetensors_header_longer_than_the_file(tmp_path: Path) -> None:
    source = write_safetensors(tmp_path / "small.safetensors")
    path = truncate(source, tmp_path / "cut.safetensors", 20)
    assert reason(path).startswith("truncated: the SafeTensors header says it is")


def test_safetensors_entry_without_dtype(tmp_path: Path) -> None:
    header = b'{"w":{"shape":[1],"data_offsets":[0,4]}}'
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    assert reason(path) == "corrupt SafeTensors header: tensor 'w' has no dtype"


def test_truncated_pytorch_zip(tmp_path: Path) -> None:
    source = write_pytorch_zip(tmp_path / "model.pt")
    path = truncate(source, tmp_path / "cut.pt", source.stat().st_size - 30)
    assert reason(path).startswith("truncated or corrupt zip archive")


def test_zip_without_a_pickle_is_not_pytorch(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    assert "a zip archive without a data.pkl" in reason(path)


# --------------------------------------------------------------------------- metadata


def test_tiny_gguf_metadata(tiny_gguf: Path) -> None:
    described = describe(tiny_gguf)
    assert described == ModelFile(tiny_gguf, "gguf", tiny_gguf.stat().st_size, {
        "gguf_version": 3, "tensor_count": 21, "architecture": "llama", "name": "tiny-llama",
        "parameters": tiny_gguf_parameters(), "file_type": "F32", "tensor_types": {"F32": 21},
        "context_length": 512, "embedding_length": 256, "block_count": 2, "head_count": 4,
        "head_count_kv": 2, "has_chat_template": False, "chat_template": None,
        "tokenizer_model": "llama", "vocab_size": 320,
    })


def test_gguf_metadata_agrees_with_the_gguf_package(tiny_gguf: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(tiny_gguf)
    metadata = describe(tiny_gguf).metadata
    assert metadata["parameters"] == sum(tensor.n_elements for tensor in reader.tensors)
    assert metadata["tensor_count"] == len(reader.tensors)
    for key in ("context_length", "embedding_length", "block_count"):
        assert metadata[key] == reader.fields[f"llama.{key}"].contents()


def test_gguf_chat_template_is_reported(tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    path = write_tiny_gguf(tmp_path / "chat.gguf", chat_template=template, n_layer=1)
    metadata = describe(path).metadata
    assert metadata["has_chat_template"] is True
    assert metadata["chat_template"] == template


def test_gguf_pooling_type_is_reported_by_name(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "embed.gguf", pooling_type="mean", n_layer=1)
    assert describe(path).metadata["pooling_type"] == "mean"


def test_gguf_f16_file_type(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "f16.gguf", file_type="F16", n_layer=1)
    metadata = describe(path).metadata
    assert metadata["file_type"] == "F16"
    assert metadata["tensor_types"] == {"F16": 9, "F32": 3}


def test_gguf_of_unknown_architecture_is_still_described(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "odd.gguf", arch="notanarch", n_layer=1)
    metadata = describe(path).metadata
    assert metadata["architecture"] == "notanarch"
    assert metadata["block_count"] == 1


def test_gemma_metadata(gemma_path: Path) -> None:
    metadata = describe(gemma_path).metadata
    assert metadata["architecture"] == "gemma3"
    assert metadata["name"] == "Gemma 3 270m"
    assert metadata["file_type"] == "Q4_K_M"
    assert metadata["context_length"] == 32768
    assert metadata["embedding_length"] == 640
    assert metadata["block_count"] == 18
    assert metadata["head_count"] == 4
    assert metadata["head_count_kv"] == 1
    assert metadata["sliding_window"] == 512
    assert metadata["has_chat_template"] is False
    assert metadata["chat_template"] is None
    assert metadata["tokenizer_model"] == "llama"
    assert metadata["vocab_size"] == 262144
    assert metadata["gguf_version"] == 3
    assert metadata["tensor_count"] == 236
    assert metadata["parameters"] == 268_098_176
    assert "pooling_type" not in metadata


def test_gemma_is_described_in_well_under_a_second(gemma_path: Path) -> None:
    describe(gemma_path)  # imports and the page cache are warm from here on
    started = time.perf_counter()
    describe(gemma_path)
    assert time.perf_counter() - started < 0.5


def test_minilm_onnx_metadata(minilm_onnx: Path) -> None:
    metadata = describe(minilm_onnx).metadata
    assert metadata["ir_version"] > 0
    assert metadata["opset"] == 17
    assert metadata["producer_name"] == "pytorch"
    ids = {"shape": ["batch", "sequence"], "type": "int64"}
    assert metadata["inputs"] == [{"name": name, **ids} for name in
                                  ("input_ids", "attention_mask", "token_type_ids")]
    assert metadata["outputs"] == [{"name": "last_hidden_state",
                                    "shape": ["batch", "sequence", 384], "type": "float32"}]


def test_tiny_onnx_metadata(tmp_path: Path) -> None:
    metadata = describe(write_tiny_onnx(tmp_path / "tiny.onnx")).metadata
    assert metadata == {
        "ir_version": 8, "opset": 17, "producer_name": "inferno-tests", "producer_version": "1.0",
        "inputs": [{"name": "input_ids", "shape": ["batch", "sequence"], "type": "int64"}],
        "outputs": [{"name": "logits", "shape": ["batch", "sequence", 4], "type": "float32"}],
    }


def test_minilm_safetensors_metadata(minilm_files: Path) -> None:
    described = describe(minilm_files / "model.safetensors")
    assert described.size == (minilm_files / "model.safetensors").stat().st_size
    assert described.metadata["tensor_count"] == 104
    assert described.metadata["dtypes"] == {"F32": 103, "I64": 1}
    assert described.metadata["parameters"] == pytest.approx(22.7e6, rel=0.01)
    assert described.metadata["__metadata__"] == {"format": "pt"}


def test_small_safetensors_metadata(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "small.safetensors", metadata={"source": "tests"})
    assert describe(path).metadata == {"tensor_count": 2, "dtypes": {"F32": 1, "F16": 1},
                                       "parameters": 17, "__metadata__": {"source": "tests"}}


def test_pytorch_zip_metadata(tmp_path: Path) -> None:
    metadata = describe(write_pytorch_zip(tmp_path / "model.pt")).metadata
    assert metadata == {"container": "zip", "pickle": "archive/data.pkl", "entries": 3}


def test_pytorch_legacy_metadata(tmp_path: Path) -> None:
    metadata = describe(write_pytorch_legacy(tmp_path / "model.bin")).metadata
    assert metadata == {"container": "legacy pickle", "pickle_protocol": 2, "torch_magic": True}


def test_pytorch_files_are_never_unpickled(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    zipped = write_pytorch_zip(tmp_path / "a.pt")
    legacy = write_pytorch_legacy(tmp_path / "b.pt")
    assert describe(zipped).format == describe(legacy).format == "pytorch"


@pytest.mark.parametrize("name", ["gguf", "onnx", "safetensors"])
def test_metadata_is_json_serialisable(name: str, tiny_gguf: Path, gemma_path: Path,
                                       minilm_onnx: Path, minilm_files: Path) -> None:
    path = {"gguf": gemma_path, "onnx": minilm_onnx,
            "safetensors": minilm_files / "model.safetensors"}[name]
    metadata = describe(path).metadata
    assert json.loads(json.dumps(metadata, allow_nan=False)) == metadata
