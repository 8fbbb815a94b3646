"""Reading a GGUF file's header: metadata keys and tensor shapes, never the weights.

The ``gguf`` package's reader builds an array per vocabulary entry (seconds for a
262k-token vocabulary); this reads the same header from a memory map and keeps only
what ``describe`` reports. The ``gguf`` package supplies the constants.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from .errors import ModelFileError, truncated

GGUF_VERSIONS = (2, 3)


def gguf_version(path: Path, head: bytes) -> tuple[int, str]:
    """The GGUF version and the file's byte order ("<" or ">")."""
    if len(head) < 24:
        raise ModelFileError(path, truncated("a GGUF header is 24 bytes at least", len(head)))
    (version,) = struct.unpack_from("<I", head, 4)
    order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine
        (version,) = struct.unpack_from(">I", head, 4)
        order = ">"
    if version not in GGUF_VERSIONS:
        raise ModelFileError(path, f"GGUF version {version} is not supported (Inferno reads "
                                   f"versions 2 and 3); convert the model with a current llama.cpp")
    return version, order


class _GgufCursor:
    """Reads a GGUF header from a memory map, keeping only what describe() reports."""

    SCALARS: Mapping[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f",
                                  7: "?", 10: "Q", 11: "q", 12: "d"}
    STRING, ARRAY = 8, 9
    KEPT_ARRAY_LENGTH = 4096  # per-layer values (head counts) are kept; vocabularies are counted

    def __init__(self, buffer: mmap.mmap, order: str, offset: int) -> None:
        self.buffer, self.order, self.offset = buffer, order, offset

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(self.order + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(self.order + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        self.skip(length)
        return self.buffer[self.offset - length:self.offset].decode("utf-8", "replace")

    def skip(self, length: int) -> None:
        self.offset += length
        if self.offset > len(self.buffer):
            raise struct.error("past the end")

    def value(self, kind: int) -> Any:
        """The value of type ``kind``, or for a long or string array its length only."""
        if kind == self.STRING:
            return self.string()
        if kind in self.SCALARS:
            return self.unpack(self.SCALARS[kind])[0]
        if kind != self.ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item_kind, count = self.unpack("IQ")
        item_format = self.SCALARS.get(item_kind)
        if item_format is not None and count <= self.KEPT_ARRAY_LENGTH:
            return list(self.unpack(f"{count}{item_format}"))
        if item_format is not None:
            self.skip(count * struct.calcsize(self.order + item_format))
        elif item_kind == self.STRING:
            for _ in range(count):
                self.skip(self.unpack("Q")[0])
        else:
            for _ in range(count):
                self.value(item_kind)
        return _ArrayLength(count)


class _ArrayLength(int):
    """The length of an array that was skipped rather than read."""


def gguf_metadata(path: Path, file: IO[bytes], size: int, parsed: tuple[int, str]
                  ) -> dict[str, Any]:
    """Everything describe() reports of a GGUF file, read from its header."""
    import gguf

    version, order = parsed
    with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        cursor = _GgufCursor(buffer, order, 8)
        tensor_count, kv_count = cursor.unpack("QQ")
        try:
            kv = {}
            for _ in range(kv_count):
                key = cursor.string()
                kv[key] = cursor.value(cursor.unpack("I")[0])
            tensors = [_gguf_tensor_info(cursor) for _ in range(tensor_count)]
        except struct.error:
            raise ModelFileError(path, truncated(
                f"the GGUF header lists {kv_count} metadata entries and {tensor_count} "
                "tensors", size)) from None
        except ValueError as error:
            raise ModelFileError(path, f"corrupt GGUF header: {error}") from None
        header_end = cursor.offset
    alignment = kv.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(path, f"corrupt GGUF header: alignment {alignment!r} is not a "
                                   "power of two")
    data_start = header_end + (-header_end % alignment)
    data_end, parameters = data_start, 0
    tensor_types: dict[str, int] = {}
    for count, kind, offset in tensors:
        parameters += count
        try:
            quant = gguf.GGMLQuantizationType(kind)
            block, type_size = gguf.GGML_QUANT_SIZES[quant]
            data_end = max(data_end, data_start + offset + count // block * type_size)
            type_name = quant.name
        except (ValueError, KeyError):  # a type newer than the gguf package: size unknown
            type_name = f"type {kind}"
        tensor_types[type_name] = tensor_types.get(type_name, 0) + 1
    if data_end > size:
        raise ModelFileError(path, truncated(
            f"the GGUF tensor data needs {data_end} bytes", size))

    arch = kv.get("general.architecture")
    keys = gguf.Keys

    def arch_value(key: str) -> Any:
        return kv.get(key.format(arch=arch)) if isinstance(arch, str) else None

    template = kv.get(keys.Tokenizer.CHAT_TEMPLATE)
    metadata = {
        "gguf_version": version,
        "tensor_count": tensor_count,
        "architecture": arch,
        "name": kv.get(keys.General.NAME),
        "parameters": parameters,
        "file_type": _gguf_file_type(kv.get(keys.General.FILE_TYPE)),
        "tensor_types": tensor_types,
        "context_length": arch_value(keys.LLM.CONTEXT_LENGTH),
        "embedding_length": arch_value(keys.LLM.EMBEDDING_LENGTH),
        "block_count": arch_value(keys.LLM.BLOCK_COUNT),
        "head_count": arch_value(keys.Attention.HEAD_COUNT),
        "head_count_kv": arch_value(keys.Attention.HEAD_COUNT_KV),
        "has_chat_template": isinstance(template, str) and bool(template),
        "chat_template": template if isinstance(template, str) else None,
        "tokenizer_model": kv.get(keys.Tokenizer.MODEL),
        "vocab_size": _length(kv.get(keys.Tokenizer.LIST)),
    }
    optional = {"sliding_window": arch_value(keys.Attention.SLIDING_WINDOW),
                "key_length": arch_value(keys.Attention.KEY_LENGTH),
                "value_length": arch_value(keys.Attention.VALUE_LENGTH),
                "pooling_type": _gguf_pooling_type(arch_value(keys.LLM.POOLING_TYPE))}
    metadata.update({key: value for key, value in optional.items() if value is not None})
    return {key: _json_safe(value) for key, value in metadata.items()}


def _gguf_tensor_info(cursor: _GgufCursor) -> tuple[int, int, int]:
    """(element count, ggml type, offset in the data section) of the next tensor."""
    name = cursor.string()
    (n_dims,) = cursor.unpack("I")
    if n_dims > 8:
        raise ValueError(f"tensor {name!r} claims {n_dims} dimensions")
    dims = cursor.unpack(f"{n_dims}Q")
    kind, offset = cursor.unpack("IQ")
    return math.prod(dims), kind, offset


def _gguf_file_type(value: Any) -> str | None:
    """``general.file_type`` as the name llama.cpp's tools use: 15 -> "Q4_K_M", 0 -> "F32"."""
    if not isinstance(value, int):
        return None
    import gguf

    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _gguf_pooling_type(value: Any) -> str | None:
    if not isinstance(value, int):
        return None
    import gguf

    try:
        return gguf.PoolingType(value).name.lower()
    except ValueError:
        return f"unknown ({value})"


def _length(value: Any) -> int | None:
    if isinstance(value, list):
        return len(value)
    return int(value) if isinstance(value, _ArrayLength) else None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, _ArrayLength):
        return int(value)
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    return value
