"""What a model file is, judged by its content, and what its header says about it.

Four formats are known: GGUF, ONNX, SafeTensors and PyTorch checkpoints. The extension is never
consulted: a GGUF renamed ``model.bin`` is still GGUF, and a text file named ``model.gguf`` is an
error that says what the file starts with. Nothing is unpickled and no weights are loaded; only
headers are read, so describing a 250 MB GGUF takes a fraction of a second.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import REDOWNLOAD, ModelFileError, truncated
from .gguf_header import gguf_metadata, gguf_version

FORMATS = ("gguf", "onnx", "safetensors", "pytorch")
UNKNOWN_FORMAT = "not a GGUF, ONNX, SafeTensors or PyTorch file"

GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80
# The first tag byte of a serialised onnx.ModelProto: protobuf writes fields in number order,
# so real files start with ir_version (0x08); the rest are the other fields a writer may put first.
ONNX_FIRST_TAGS = frozenset({0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA})
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
SAFETENSORS_ITEM_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "U16": 16,
                         "I16": 16, "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32,
                         "U64": 64, "I64": 64, "F64": 64}
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class ModelFile:
    """A model file and what its header says: ``metadata`` holds JSON-serialisable values only."""

    path: Path
    format: str
    size: int
    metadata: Mapping[str, Any] = field(hash=False)


def detect_format(path: Path) -> str:
    """The format of the model file at ``path``: "gguf", "onnx", "safetensors" or "pytorch".

    Raises :class:`ModelFileError` saying why when the file is missing, unreadable, empty,
    of an unsupported GGUF version or of no known format. It reads only what it needs to be
    sure of the format (a GGUF's first bytes, a SafeTensors header, a whole ONNX protobuf), so
    a GGUF cut short in its metadata or tensor data is found by :func:`describe`.
    """
    with open_model_file(path) as file:
        return _identify(path, file).format


def describe(path: Path) -> ModelFile:
    """The format, size and header metadata of the model file at ``path``.

    Raises :class:`ModelFileError` for the same reasons as :func:`detect_format`, and for a
    file whose header or tensor data is cut short or corrupt.
    """
    with open_model_file(path) as file:
        found = _identify(path, file)
        readers = {"gguf": _gguf_header, "onnx": _onnx_metadata,
                   "safetensors": _safetensors_metadata, "pytorch": _pytorch_metadata}
        metadata = readers[found.format](path, file, found)
        return ModelFile(Path(path), found.format, found.size, metadata)


@contextmanager
def open_model_file(path: Path) -> Iterator[IO[bytes]]:
    """Open a model file for reading, turning each way that fails into a ModelFileError."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ModelFileError(path, "missing: no such file; check the path") from None
    except OSError as error:
        raise ModelFileError(path, f"unreadable: {error.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ModelFileError(path, "is a directory; give the path of the model file inside it")
    if not stat.S_ISREG(mode):
        raise ModelFileError(path, "not a regular file (a device, pipe or socket)")
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed below, after the caller is done
    except PermissionError:
        raise ModelFileError(
            path, "unreadable: permission denied; check the file's owner and mode") from None
    except OSError as error:
        raise ModelFileError(path, f"unreadable: {error.strerror}") from None
    with file:
        yield file


# --------------------------------------------------------------------------- identification


@dataclass
class _Found:
    format: str
    size: int
    head: bytes
    parsed: Any = None  # what identifying the format already parsed, for describe() to reuse


def _identify(path: Path, file: IO[bytes]) -> _Found:
    size = os.fstat(file.fileno()).st_size
    if size == 0:
        raise ModelFileError(path, "empty: the file has no bytes; " + REDOWNLOAD)
    head = file.read(64)
    if head.startswith(GGUF_MAGIC):
        return _Found("gguf", size, head, gguf_version(path, head))
    if head.startswith(ZIP_MAGIC):
        return _Found("pytorch", size, head, _zip_checkpoint(path, file))
    if head[0] == PICKLE_PROTO and len(head) > 1 and 2 <= head[1] <= 5:
        return _Found("pytorch", size, head, _legacy_checkpoint(head))
    header = _safetensors_header(path, file, head, size)
    if header is not None:
        return _Found("safetensors", size, head, header)
    if head[0] in ONNX_FIRST_TAGS:
        return _Found("onnx", size, head, _onnx_model(path, file, head))
    raise ModelFileError(path, f"{UNKNOWN_FORMAT} (starts with 0x{head[:8].hex()})")


def _gguf_header(path: Path, file: IO[bytes], found: _Found) -> dict[str, Any]:
    return gguf_metadata(path, file, found.size, found.parsed)


# --------------------------------------------------------------------------- SafeTensors


def _safetensors_header(path: Path, file: IO[bytes], head: bytes,
                        size: int) -> dict[str, Any] | None:
    """The parsed header when the file starts like SafeTensors; None when it does not."""
    if len(head) < 10 or head[8:10] not in (b'{"', b"{}"):
        return None
    (length,) = struct.unpack_from("<Q", head)
    if length < 2 or length > SAFETENSORS_MAX_HEADER:
        return None
    if 8 + length > size:
        raise ModelFileError(path, truncated(
            f"the SafeTensors header says it is {length} bytes long", size))
    file.seek(8)
    try:
        header = json.loads(file.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(path, f"corrupt SafeTensors header: not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "corrupt SafeTensors header: not a JSON object")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = _safetensors_entry_problem(entry)
        if problem:
            raise ModelFileError(path, f"corrupt SafeTensors header: tensor {name!r} {problem}")
        data_end = max(data_end, entry["data_offsets"][1])
    if 8 + length + data_end > size:
        raise ModelFileError(path, truncated(
            f"the SafeTensors header places tensor data up to byte {8 + length + data_end}",
            size))
    return header


def _safetensors_entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "is not described by an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return "has no dtype"
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return "has no valid shape"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        return "has no valid data_offsets"
    bits = SAFETENSORS_ITEM_BITS.get(dtype)
    if bits is not None and math.prod(shape) * bits != (offsets[1] - offsets[0]) * 8:
        return f"has {offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape}"
    return None


def _safetensors_metadata(path: Path, file: IO[bytes], found: _Found) -> dict[str, Any]:
    header: dict[str, Any] = found.parsed
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    dtypes: dict[str, int] = {}
    for entry in tensors.values():
        dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + 1
    metadata: dict[str, Any] = {
        "tensor_count": len(tensors),
        "dtypes": dtypes,
        "parameters": sum(math.prod(entry["shape"]) for entry in tensors.values()),
    }
    if isinstance(header.get("__metadata__"), dict):
        metadata["__metadata__"] = header["__metadata__"]
    return metadata


# --------------------------------------------------------------------------- ONNX


def _onnx_model(path: Path, file: IO[bytes], head: bytes) -> Any:
    """The file parsed as an onnx.ModelProto; external data files are not read."""
    import onnx
    from google.protobuf.message import DecodeError

    file.seek(0)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(file.read())
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ModelFileError(path, f"not a valid ONNX model: it does not parse ({error}); "
                                   f"{REDOWNLOAD} or export it again") from None
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelFileError(path, f"{UNKNOWN_FORMAT}: it parses as protobuf but has no ONNX "
                                   f"IR version or graph (starts with 0x{head[:8].hex()})")
    return model


def _onnx_metadata(path: Path, file: IO[bytes], found: _Found) -> dict[str, Any]:
    model = found.parsed
    opset = next((entry.version for entry in model.opset_import
                  if entry.domain in ("", "ai.onnx")), None)
    return {
        "ir_version": model.ir_version,
        "opset": opset,
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "inputs": [_onnx_value_info(value) for value in model.graph.input],
        "outputs": [_onnx_value_info(value) for value in model.graph.output],
    }


def _onnx_value_info(value: Any) -> dict[str, Any]:
    import onnx

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": value.name, "shape": None, "type": kind}
    tensor = value.type.tensor_type
    try:
        type_name = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, ValueError, TypeError):
        type_name = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    if tensor.elem_type == onnx.TensorProto.STRING:
        type_name = "string"
    shape = None
    if tensor.HasField("shape"):
        shape = [dim.dim_value if dim.HasField("dim_value")
                 else dim.dim_param if dim.HasField("dim_param") else None
                 for dim in tensor.shape.dim]
    return {"name": value.name, "shape": shape, "type": type_name}


# --------------------------------------------------------------------------- PyTorch


def _zip_checkpoint(path: Path, file: IO[bytes]) -> dict[str, Any]:
    """Metadata of a torch.save zip: the archive is listed, its pickle never opened."""
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, EOFError) as error:
        raise ModelFileError(path, f"truncated or corrupt zip archive ({error}); "
                                   f"{REDOWNLOAD}") from None
    pickles = [name for name in names if name == "data.pkl" or name.endswith("/data.pkl")]
    if not pickles:
        raise ModelFileError(path, f"{UNKNOWN_FORMAT}: a zip archive without a data.pkl, so "
                                   "not a PyTorch checkpoint")
    return {"container": "zip", "pickle": pickles[0], "entries": len(names)}


def _legacy_checkpoint(head: bytes) -> dict[str, Any]:
    """Metadata of a pre-1.6 torch.save pickle stream, read from its first bytes only."""
    # torch wrote its magic number first: LONG1 (0x8a) of 10 bytes, little-endian
    magic = head[2:4] == b"\x8a\x0a" and int.from_bytes(head[4:14], "little") == TORCH_LEGACY_MAGIC
    return {"container": "legacy pickle", "pickle_protocol": head[1], "torch_magic": magic}


def _pytorch_metadata(path: Path, file: IO[bytes], found: _Found) -> dict[str, Any]:
    return dict(found.parsed)
