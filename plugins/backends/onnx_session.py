"""Opening an onnxruntime session the way the backend's settings say, and describing it."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from inferno.plugins.backends.hardware import threads
from inferno.plugins.backends.onnx_options import OnnxOptions
from inferno.plugins.models.errors import ModelError

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


def session_options(options: OnnxOptions, optimized_path: Path | None) -> ort.SessionOptions:
    """onnxruntime's ``SessionOptions`` for ``options``."""
    session = ort.SessionOptions()
    session.graph_optimization_level = OPTIMIZATION_LEVELS[options.graph_optimization_level]
    session.intra_op_num_threads = threads(options.intra_op_threads)
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
