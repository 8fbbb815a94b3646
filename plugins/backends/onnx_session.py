"""Opening an onnxruntime session the way the backend's settings say, and describing it."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnxruntime as ort

from inferno.plugins.backends.onnx_options import OnnxOptions
from inferno.plugins.models.errors import ModelError, ModelFileError

OPTIMIZATION_LEVELS: Mapping[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
EXECUTION_MODES: Mapping[str, ort.ExecutionMode] = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}
#: numpy's dtype for each onnxruntime tensor type; absent ones (bfloat16 ...) go unchecked.
DTYPES: Mapping[str, np.dtype[Any]] = {
    f"tensor({name})": np.dtype(dtype) for name, dtype in {
        "float": np.float32, "double": np.float64, "float16": np.float16,
        "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
        "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
        "bool": np.bool_, "string": np.object_,
    }.items()
}
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : ")


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: ``shape`` holds ints for fixed dimensions and names (or
    ``None``) for dynamic ones."""

    name: str
    shape: tuple[int | str | None, ...]
    type: str

    @property
    def dtype(self) -> np.dtype[Any] | None:
        return DTYPES.get(self.type)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "type": self.type}

    def __str__(self) -> str:
        dims = ", ".join("?" if dim is None else str(dim) for dim in self.shape)
        return f"{self.name} ({self.type} [{dims}])"


def tensors(args: Sequence[Any]) -> tuple[TensorInfo, ...]:
    """``session.get_inputs()`` or ``get_outputs()`` as :class:`TensorInfo`."""
    return tuple(TensorInfo(arg.name, tuple(_dim(dim) for dim in arg.shape or ()), arg.type)
                 for arg in args)


def _dim(dim: Any) -> int | str | None:
    if isinstance(dim, int):
        return dim if dim >= 0 else None
    return dim or None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on; threads on a core's sibling
    hyperthreads only slow an onnxruntime thread pool down."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus) or os.cpu_count() or 1


def read_opset(path: Path) -> int | None:
    """The default-domain opset of an ONNX file, reading only the protobuf's top level (the
    graph is skipped, never parsed). Raises ``ModelFileError`` when the file is not a
    ModelProto at all, which is the clearest thing to say about a garbage file."""
    size = path.stat().st_size
    opset: int | None = None
    seen = set()
    with path.open("rb") as file:
        while file.tell() < size:
            field, wire = divmod(_varint(path, file), 8)
            if field == 0 or wire not in (0, 1, 2, 5):
                raise ModelFileError(path, "is not an ONNX model (not a protobuf ModelProto)")
            seen.add(field)
            if wire == 0:
                _varint(path, file)
            elif wire == 2:
                length = _varint(path, file)
                if file.tell() + length > size:
                    raise ModelFileError(path, f"is truncated or not an ONNX model: a field "
                                               f"runs {file.tell() + length - size} bytes "
                                               f"past the end of the file")
                if field == 8:  # opset_import: domain (1) and version (2)
                    domain, version = _opset_entry(file.read(length))
                    if domain in ("", "ai.onnx"):
                        opset = version
                else:
                    file.seek(length, os.SEEK_CUR)
            else:
                file.seek(8 if wire == 1 else 4, os.SEEK_CUR)
    if 7 not in seen:  # a ModelProto without a graph
        raise ModelFileError(path, "is not an ONNX model: it has no graph")
    return opset


def _varint(path: Path, file: BinaryIO) -> int:
    value = shift = 0
    while True:
        byte = file.read(1)
        if not byte:
            raise ModelFileError(path, "is truncated or not an ONNX model")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ModelFileError(path, "is not an ONNX model (bad protobuf varint)")


def _opset_entry(data: bytes) -> tuple[str, int | None]:
    domain, version, at = "", None, 0
    while at < len(data):
        tag, at = _buffer_varint(data, at)
        if tag == (1 << 3 | 2):
            length, at = _buffer_varint(data, at)
            domain, at = data[at:at + length].decode("utf-8", "replace"), at + length
        elif tag == (2 << 3 | 0):
            version, at = _buffer_varint(data, at)
        else:
            break
    return domain, version


def _buffer_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while at < len(data):
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    return value, at


def session_options(options: OnnxOptions, optimized_path: Path | None) -> ort.SessionOptions:
    """onnxruntime's ``SessionOptions`` for ``options``."""
    session = ort.SessionOptions()
    session.graph_optimization_level = OPTIMIZATION_LEVELS[options.graph_optimization_level]
    session.intra_op_num_threads = options.intra_op_threads or physical_cores()
    session.inter_op_num_threads = options.inter_op_threads
    session.execution_mode = EXECUTION_MODES[options.execution_mode]
    spinning = "1" if options.allow_spinning else "0"
    session.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    session.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    session.log_severity_level = 3  # errors only: onnxruntime prints to stderr, not our log
    if optimized_path is not None:
        session.optimized_model_filepath = str(optimized_path)
    return session


def choose_providers(model: str, options: OnnxOptions, available: Sequence[str],
                     warn: Callable[..., Any]) -> tuple[list[str], list[dict[str, str]]]:
    """The requested providers this onnxruntime has, in order, with their options."""
    chosen = []
    for provider in options.providers:
        if provider in available:
            chosen.append(provider)
        else:
            warn("execution provider not available; skipped", model=model, provider=provider,
                 available=list(available))
    if not chosen:
        raise ModelError(model, f"none of the execution providers {list(options.providers)} "
                                f"is available in this onnxruntime (available: "
                                f"{', '.join(available)}); add CPUExecutionProvider to "
                                f"`providers` to fall back to the CPU")
    return chosen, [{key: _option_text(value)
                     for key, value in options.provider_options.get(name, {}).items()}
                    for name in chosen]


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def open_session(model: str, path: Path, options: OnnxOptions, optimized_path: Path | None,
                 warn: Callable[..., Any]) -> ort.InferenceSession:
    """A session for ``path``, or an error naming the model, the file and onnxruntime's
    reason."""
    providers, provider_options = choose_providers(
        model, options, ort.get_available_providers(), warn)
    try:
        return ort.InferenceSession(str(path), session_options(options, optimized_path),
                                    providers=providers, provider_options=provider_options)
    except Exception as exc:  # onnxruntime's errors share no base class worth naming
        raise ModelError(model, f"onnxruntime cannot load {path}: {ort_reason(exc)}") from exc


def ort_reason(exc: BaseException) -> str:
    """onnxruntime's message without its ``[ONNXRuntimeError] : 2 :`` prefix."""
    return _ORT_PREFIX.sub("", str(exc)).strip()
