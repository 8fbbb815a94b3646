"""A loaded ONNX model: the generic kind, whose ``infer`` takes tensors by input name and
checks them against the graph, and the base of the text kinds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnxruntime as ort

from inferno.kernel import Chunk, GenerationRequest, LoadedModel
from inferno.plugins.backends.onnx_session import TensorInfo, ort_reason
from inferno.plugins.models.errors import ModelError, RequestError


class OnnxModel(LoadedModel):
    """An ONNX graph run as it is: ``infer`` maps input names to arrays and returns the
    outputs by name. Every ONNX model has ``infer``; text models add ``embed`` or
    ``classify``."""

    model_type = "generic"

    def __init__(self, session: ort.InferenceSession, info: Mapping[str, Any]) -> None:
        self.name: str = info["name"]
        self.path = Path(info["path"])
        self._session: ort.InferenceSession | None = session
        self.inputs = tuple(info["inputs"])
        self.outputs = tuple(info["outputs"])
        self.batch_size: int = info["batch_size"]
        self._info: dict[str, Any] = {
            **info, "model_type": self.model_type,
            "inputs": [tensor.describe() for tensor in self.inputs],
            "outputs": [tensor.describe() for tensor in self.outputs],
        }

    @property
    def info(self) -> Mapping[str, Any]:
        return MappingProxyType(self._info)

    def note(self, **details: Any) -> None:
        """Add what the backend measured (load time ...) to ``info``."""
        self._info.update(details)

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            raise ModelError(self.name, "is closed; load it again to use it")
        return self._session

    # ----------------------------------------------------------------------- requests

    async def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the graph on ``feeds`` (arrays or nested lists by input name), after checking
        names, ranks, fixed dimensions and dtypes against the graph."""
        arrays = check_feeds(self.name, feeds, self.inputs)
        names = [tensor.name for tensor in self.outputs]
        results = await asyncio.to_thread(self.run, names, arrays)
        return dict(zip(names, results, strict=True))

    def run(self, outputs: Sequence[str] | None, feeds: Mapping[str, np.ndarray]
            ) -> list[Any]:
        """``session.run`` with onnxruntime's errors turned into Inferno's; blocking."""
        session = self.session
        try:
            return session.run(outputs, feeds)  # type: ignore[no-any-return]
        except Exception as exc:  # onnxruntime's errors share no base class worth naming
            reason = ort_reason(exc)
            if type(exc).__name__ in ("InvalidArgument", "InvalidShape"):
                raise RequestError(self.name, f"onnxruntime refused the inputs: {reason}"
                                   ) from exc
            raise ModelError(self.name, f"onnxruntime failed: {reason}") from exc

    async def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        raise RequestError(self.name, f"is a {self.model_type} ONNX model and does not make "
                                      f"embeddings{self._use_instead()}")

    async def classify(self, inputs: Sequence[str]) -> list[list[dict[str, Any]]]:
        raise RequestError(self.name, f"is a {self.model_type} ONNX model and does not "
                                      f"classify text{self._use_instead()}")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        raise RequestError(self.name, f"is a {self.model_type} ONNX model and does not "
                                      f"generate text{self._use_instead()}")
        yield Chunk(text="")  # unreachable: it makes this an async generator, as promised

    def _use_instead(self) -> str:
        return {"text-encoder": "; use embed", "classifier": "; use classify"}.get(
            self.model_type, "; use infer with its inputs: " + ", ".join(map(str, self.inputs)))

    async def close(self) -> None:
        """Drop the session; a run already under way keeps it until it finishes."""
        self._session = None


# --------------------------------------------------------------------------- feeds


def check_feeds(model: str, feeds: Any, inputs: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    """``feeds`` as arrays of the graph's dtypes, or a ``RequestError`` that names the input,
    what the graph expects and what it got.

    Nested lists are converted to the input's dtype when no kind changes (ints may fill a
    float input, floats may not fill an int one); arrays must already have it, since
    converting a large array is a cost the caller should choose.
    """
    if not isinstance(feeds, Mapping):
        raise RequestError(model, f"infer takes a mapping of input names to arrays, got "
                                  f"{type(feeds).__name__}")
    expected = {tensor.name: tensor for tensor in inputs}
    listing = ", ".join(map(str, inputs))
    for name in feeds:
        if name not in expected:
            raise RequestError(model, f"unknown input {name!r}; the model's inputs are: "
                                      f"{listing}")
    for tensor in inputs:
        if tensor.name not in feeds:
            raise RequestError(model, f"missing input {tensor}")
    arrays: dict[str, np.ndarray] = {}
    named_dims: dict[str, tuple[int, str]] = {}
    for tensor in inputs:
        array = _as_array(model, tensor, feeds[tensor.name])
        _check_shape(model, tensor, array, named_dims)
        arrays[tensor.name] = array
    return arrays


def _as_array(model: str, tensor: TensorInfo, value: Any) -> np.ndarray:
    want = tensor.dtype
    if isinstance(value, np.ndarray):
        if want is not None and value.dtype != want and not _both_text(value.dtype, want):
            raise RequestError(model, f"input {tensor.name!r} must be {_dtype_name(want)} "
                                      f"({tensor.type}), got an array of {value.dtype}")
        return value
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise RequestError(model, f"input {tensor.name!r} is not a rectangular array of "
                                  f"{_dtype_name(want)}: {exc}") from None
    if want is None or array.dtype == want:
        return array
    if _both_text(array.dtype, want):
        return array.astype(want)
    if array.dtype.kind in "OUS" or want.kind in "OUS" or \
            not np.can_cast(array.dtype, want, casting="same_kind"):
        raise RequestError(model, f"input {tensor.name!r} must be {_dtype_name(want)} "
                                  f"({tensor.type}), got values of {array.dtype}")
    return array.astype(want)


def _both_text(have: np.dtype[Any], want: np.dtype[Any]) -> bool:
    return want.kind == "O" and have.kind in "OU"


def _dtype_name(dtype: np.dtype[Any] | None) -> str:
    if dtype is None:
        return "numbers"
    return "strings" if dtype.kind == "O" else str(dtype)


def _check_shape(model: str, tensor: TensorInfo, array: np.ndarray,
                 named_dims: dict[str, tuple[int, str]]) -> None:
    if array.ndim != len(tensor.shape):
        raise RequestError(model, f"input {tensor.name!r} must have {len(tensor.shape)} "
                                  f"dimensions ({tensor}), got {array.ndim} "
                                  f"(shape {list(array.shape)})")
    for axis, (want, got) in enumerate(zip(tensor.shape, array.shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise RequestError(model, f"input {tensor.name!r} must have {want} in dimension "
                                      f"{axis} ({tensor}), got shape {list(array.shape)}")
        if isinstance(want, str):
            size, first = named_dims.setdefault(want, (got, tensor.name))
            if size != got:
                raise RequestError(model, f"input {tensor.name!r} has {got} in dimension "
                                          f"{axis} ({want!r}), but input {first!r} has "
                                          f"{size} there")
