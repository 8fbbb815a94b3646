"""Conversions write a new, loadable model file and never touch the source."""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from inferno.plugins.models.convert import quantize_gguf, quantize_onnx
from inferno.plugins.models.errors import ModelFileError, RequestError
from inferno.plugins.models.formats import describe

from .model_files import write_float_matmul_onnx, write_tiny_gguf, write_tiny_onnx


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


@pytest.fixture
def float_onnx(tmp_path: Path) -> Path:
    return write_float_matmul_onnx(tmp_path / "float.onnx")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generates(path: Path) -> bool:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    try:
        completion = llm.create_completion("hello", max_tokens=4, temperature=0.0)
        return completion["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".partial"))


# --------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize(("quantization", "tensor_type"),
                         [("Q8_0", "Q8_0"), ("Q4_0", "Q4_0"), ("Q4_K_M", "Q4_K")])
def test_quantised_gguf_loads_and_generates(tiny_gguf: Path, tmp_path: Path,
                                            quantization: str, tensor_type: str) -> None:
    before = sha256_of(tiny_gguf)
    dst = quantize_gguf(tiny_gguf, tmp_path / "out.gguf", quantization, threads=2)
    metadata = describe(dst).metadata
    assert metadata["file_type"] == quantization
    assert tensor_type in metadata["tensor_types"]
    assert dst.stat().st_size < tiny_gguf.stat().st_size / 3
    assert generates(dst)
    assert sha256_of(tiny_gguf) == before
    assert leftovers(tmp_path) == []


def test_quantisation_names_are_case_insensitive(tiny_gguf: Path, tmp_path: Path) -> None:
    dst = quantize_gguf(tiny_gguf, tmp_path / "out.gguf", "f16")
    assert describe(dst).metadata["file_type"] == "F16"


def test_progress_reports_start_each_tensor_and_sizes(tiny_gguf: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    quantize_gguf(tiny_gguf, tmp_path / "out.gguf", "Q8_0", progress=lines.append)
    assert lines[0] == f"quantising {tiny_gguf} (3.6 MiB, F32) to Q8_0 with llama.cpp"
    assert lines[1] == "[1/21] output.weight: f32 -> q8_0"
    assert "[2/21] output_norm.weight: f32, kept" in lines
    assert len([line for line in lines if line.startswith("[")]) == 21
    assert lines[-1].startswith(f"wrote {tmp_path / 'out.gguf'} (3.6 MiB -> 999.9 KiB, Q8_0) in ")


def test_llama_cpp_log_is_given_back_afterwards(tiny_gguf: Path, tmp_path: Path) -> None:
    import llama_cpp

    def current() -> int | None:
        callback, data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(data))
        return ctypes.cast(callback, ctypes.c_void_p).value

    before = current()
    quantize_gguf(tiny_gguf, tmp_path / "out.gguf", "Q8_0")
    assert current() == before


def test_an_error_in_the_progress_callback_fails_the_conversion(tiny_gguf: Path,
                                                                tmp_path: Path) -> None:
    def fail_on_tensors(line: str) -> None:
        if line.startswith("["):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(tiny_gguf, tmp_path / "out.gguf", "Q8_0", progress=fail_on_tensors)
    assert list(tmp_path.iterdir()) == []


def test_output_gets_ordinary_permissions(tiny_gguf: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.touch()
    dst = quantize_gguf(tiny_gguf, tmp_path / "out.gguf", "Q8_0")
    assert dst.stat().st_mode == reference.stat().st_mode


def test_unknown_quantisation_lists_the_names(tiny_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(RequestError) as caught:
        quantize_gguf(tiny_gguf, tmp_path / "out.gguf", "Q9_X")
    assert caught.value.reason.startswith("unknown GGUF quantisation 'Q9_X'; choose one of: F32, "
                                          "F16, Q4_0, Q4_1, Q8_0")
    assert "Q4_K_M" in caught.value.reason


def test_existing_destination_is_kept(tiny_gguf: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"precious")
    with pytest.raises(ModelFileError, match="already exists"):
        quantize_gguf(tiny_gguf, dst, "Q8_0")
    assert dst.read_bytes() == b"precious"


def test_existing_destination_is_replaced_when_allowed(tiny_gguf: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"old")
    quantize_gguf(tiny_gguf, dst, "Q8_0", overwrite=True)
    assert describe(dst).metadata["file_type"] == "Q8_0"


def test_destination_cannot_be_the_source(tiny_gguf: Path) -> None:
    before = sha256_of(tiny_gguf)
    with pytest.raises(ModelFileError, match="is the source file"):
        quantize_gguf(tiny_gguf, tiny_gguf, "Q8_0", overwrite=True)
    assert sha256_of(tiny_gguf) == before


def test_destination_folder_must_exist(tiny_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        quantize_gguf(tiny_gguf, tmp_path / "absent" / "out.gguf", "Q8_0")


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="missing"):
        quantize_gguf(tmp_path / "absent.gguf", tmp_path / "out.gguf", "Q8_0")


def test_onnx_source_is_not_quantised_as_gguf(tmp_path: Path) -> None:
    src = write_tiny_onnx(tmp_path / "model.onnx")
    with pytest.raises(ModelFileError, match="format is ONNX, not GGUF; this conversion needs"):
        quantize_gguf(src, tmp_path / "out.gguf", "Q8_0")


def test_already_quantised_model_is_refused(gemma_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"already quantised \(Q4_K_M\)"):
        quantize_gguf(gemma_path, tmp_path / "out.gguf", "Q4_0")


def test_llama_cpp_refusal_is_reported_and_nothing_is_left(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "odd.gguf", arch="notanarch", n_layer=1)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError) as caught:
        quantize_gguf(src, out / "odd-q8.gguf", "Q8_0")
    assert caught.value.reason.startswith("llama.cpp could not quantise it: ")
    assert "notanarch" in caught.value.reason
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- ONNX


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def integer_initializers(path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(path))
    return {init.name for init in model.graph.initializer
            if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}


@pytest.mark.parametrize("optimize", [False, True])
def test_quantised_onnx_has_int8_weights_and_close_outputs(float_onnx: Path, tmp_path: Path,
                                                           optimize: bool) -> None:
    before = sha256_of(float_onnx)
    dst = quantize_onnx(float_onnx, tmp_path / "int8.onnx", optimize=optimize)
    assert integer_initializers(float_onnx) == set()
    assert len(integer_initializers(dst)) >= 2
    assert dst.stat().st_size < float_onnx.stat().st_size / 2
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    expected, actual = run_onnx(float_onnx, x), run_onnx(dst, x)
    assert actual.shape == expected.shape == (4, 32)
    assert np.abs(actual - expected).max() < 0.05 * np.abs(expected).max()
    assert sha256_of(float_onnx) == before
    assert leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["float.onnx", "int8.onnx"]


def test_onnx_progress_reports_start_and_sizes(float_onnx: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    quantize_onnx(float_onnx, tmp_path / "int8.onnx", optimize=True, progress=lines.append)
    assert lines[0] == f"quantising {float_onnx} (48.2 KiB) to int8 weights with onnxruntime"
    assert lines[1] == "optimised the graph (onnxruntime basic level)"
    assert lines[2].startswith(f"wrote {tmp_path / 'int8.onnx'} (48.2 KiB -> ")


def test_onnx_existing_destination_is_kept(float_onnx: Path, tmp_path: Path) -> None:
    dst = tmp_path / "int8.onnx"
    dst.write_bytes(b"precious")
    with pytest.raises(ModelFileError, match="already exists"):
        quantize_onnx(float_onnx, dst)
    assert dst.read_bytes() == b"precious"


def test_gguf_source_is_not_quantised_as_onnx(tiny_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="format is GGUF, not ONNX"):
        quantize_onnx(tiny_gguf, tmp_path / "out.onnx")


def test_onnx_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="missing"):
        quantize_onnx(tmp_path / "absent.onnx", tmp_path / "out.onnx")
