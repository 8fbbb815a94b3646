"""Converting model files: GGUF quantisation with llama.cpp, ONNX int8 with onnxruntime.

Each conversion writes to a temporary file beside the destination and renames it into place only
when it succeeded, so an interrupted conversion never leaves a half-written model under the name
a profile points at. The source file is only ever read.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import ModelFileError, RequestError
from .formats import ModelFile, describe

Progress = Callable[[str], None]

# "[   3/  21] token_embd.weight - [ 256, 320, 1, 1], type = f32, converting to q4_K .. size ="
TENSOR_LINE = re.compile(
    r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+).*?type\s*=\s*(\w+)(?:.*?converting to (\w+))?")
UNQUANTISED_GGUF = frozenset({"F32", "F16", "BF16"})


def gguf_quantizations() -> dict[str, int]:
    """The quantisation names llama.cpp accepts ("Q4_K_M", "Q8_0", "F16", ...) and their ftype."""
    import llama_cpp

    names = {}
    for constant in dir(llama_cpp):
        if constant.startswith("LLAMA_FTYPE_") and constant != "LLAMA_FTYPE_GUESSED":
            name = constant.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_")
            names[name.removeprefix("ALL_")] = int(getattr(llama_cpp, constant))
    return names


def quantize_gguf(src: Path, dst: Path, quantization: str, *, threads: int = 0,
                  progress: Progress | None = None, overwrite: bool = False,
                  allow_requantize: bool = False) -> Path:
    """Quantise the GGUF model ``src`` to ``quantization`` (e.g. "Q4_K_M") and write ``dst``.

    ``threads`` 0 lets llama.cpp use every core. ``progress`` receives a line when the work
    starts, one per tensor, and one with the sizes before and after. A model that is already
    quantised is refused unless ``allow_requantize``: quantising twice loses more quality than
    quantising the F16/F32 original once. Returns ``dst``.
    """
    import llama_cpp

    from inferno.plugins.backends.llama_log import capture

    choices = gguf_quantizations()
    name = quantization.strip().upper()
    ftype = choices.get(name)
    if ftype is None:
        raise RequestError(src, f"unknown GGUF quantisation {quantization!r}; choose one of: "
                                f"{', '.join(sorted(choices, key=choices.__getitem__))}")
    source = _require_format(src, "gguf")
    file_type = source.metadata.get("file_type")
    if file_type not in UNQUANTISED_GGUF and file_type is not None and not allow_requantize:
        raise ModelFileError(src, f"already quantised ({file_type}); quantise the F16 or F32 "
                                  "original, or allow requantising (inferno convert --requantize)")
    report = progress or _ignore
    report(f"quantising {src} ({_size(source.size)}, {file_type or 'unknown type'}) to {name} "
           f"with llama.cpp")
    started = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = allow_requantize
    with _staged(src, dst, overwrite) as staging, capture(_tensor_reporter(report)) as log:
        failed = llama_cpp.llama_model_quantize(
            os.fsencode(src), os.fsencode(staging), ctypes.byref(params))
        if failed:
            raise ModelFileError(src, f"llama.cpp could not quantise it: {log.reason()}")
        written = describe(staging)
    report(f"wrote {dst} ({_size(source.size)} -> {_size(written.size)}, "
           f"{written.metadata.get('file_type')}) in {time.perf_counter() - started:.1f} s")
    return dst


def quantize_onnx(src: Path, dst: Path, *, optimize: bool = False,
                  progress: Progress | None = None, overwrite: bool = False) -> Path:
    """Quantise the ONNX model ``src`` to int8 weights (dynamic quantisation) and write ``dst``.

    With ``optimize`` the graph is first simplified by onnxruntime's basic optimisations.
    Activations stay float and are quantised per batch at run time, so no calibration data is
    needed. Returns ``dst``.
    """
    source = _require_format(src, "onnx")
    report = progress or _ignore
    report(f"quantising {src} ({_size(source.size)}) to int8 weights with onnxruntime")
    started = time.perf_counter()
    with _staged(src, dst, overwrite) as staging:
        model_input = src
        if optimize:
            model_input = staging.with_name(staging.name + ".optimised.onnx")
            try:
                _optimise_onnx(src, model_input)
                report("optimised the graph (onnxruntime basic level)")
                _quantize_onnx(model_input, staging)
            finally:
                model_input.unlink(missing_ok=True)
        else:
            _quantize_onnx(src, staging)
        written = describe(staging)
    report(f"wrote {dst} ({_size(source.size)} -> {_size(written.size)}) "
           f"in {time.perf_counter() - started:.1f} s")
    return dst


# --------------------------------------------------------------------------- shared safety


FORMAT_NAMES = {"gguf": "GGUF", "onnx": "ONNX", "safetensors": "SafeTensors",
                "pytorch": "PyTorch"}


def _require_format(src: Path, expected: str) -> ModelFile:
    source = describe(src)
    if source.format != expected:
        raise ModelFileError(src, f"format is {FORMAT_NAMES[source.format]}, not "
                                  f"{FORMAT_NAMES[expected]}; this conversion needs a "
                                  f"{FORMAT_NAMES[expected]} model")
    return source


@contextlib.contextmanager
def _staged(src: Path, dst: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary path beside ``dst``, renamed to ``dst`` if the block succeeds."""
    dst = Path(dst)
    if dst.resolve() == Path(src).resolve() or (dst.exists() and os.path.samefile(src, dst)):
        raise ModelFileError(dst, "is the source file; write the converted model to another path")
    if dst.is_dir():
        raise ModelFileError(dst, "is a directory; give the path of the file to write")
    if dst.exists() and not overwrite:
        raise ModelFileError(dst, "already exists; choose another path or allow overwriting "
                                  "(inferno convert --overwrite)")
    if not dst.parent.is_dir():
        raise ModelFileError(dst, f"cannot be written: the folder {dst.parent} does not exist")
    # Named, not created: the converter creates it, with the permissions any new file gets
    staging = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.partial")
    try:
        yield staging
        if dst.exists() and not overwrite:  # written by someone else while we worked
            raise ModelFileError(dst, "appeared while converting; choose another path or "
                                      "allow overwriting (inferno convert --overwrite)")
        os.replace(staging, dst)
    finally:
        staging.unlink(missing_ok=True)


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _ignore(_line: str) -> None:
    pass


def _tensor_reporter(report: Progress) -> Callable[[str], None]:
    def on_line(line: str) -> None:
        match = TENSOR_LINE.match(line)
        if match:
            index, total, tensor, source_type, target_type = match.groups()
            change = f"{source_type} -> {target_type}" if target_type else f"{source_type}, kept"
            report(f"[{index}/{total}] {tensor}: {change}")
    return on_line


# --------------------------------------------------------------------------- onnxruntime


def _optimise_onnx(src: Path, dst: Path) -> None:
    """Save the graph as onnxruntime optimises it when creating a session.

    The basic level only folds constants and removes or merges redundant standard-ONNX nodes,
    so the saved file runs on any execution provider. The extended level fuses nodes into
    onnxruntime's own com.microsoft operators (FusedMatMul, SkipLayerNormalization, ...), some
    implemented for one provider only, and onnxruntime documents that such an optimised model
    should be run only where it was optimised: not a file to convert once and ship.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    try:
        onnxruntime.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise ModelFileError(src, f"onnxruntime could not load it to optimise: {error}") from None


def _quantize_onnx(src: Path, dst: Path) -> None:
    """Dynamic quantisation: int8 weights, activations quantised per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    except Exception as error:  # onnx and onnxruntime raise many unrelated types here
        raise ModelFileError(src, f"onnxruntime could not quantise it: {error}") from None
