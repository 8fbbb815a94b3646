"""Small and broken model files, generated on demand for tests (plain functions, not fixtures).

Nothing here is committed as a binary: each function writes its file in a second or less. The
tiny GGUF is a real llama-architecture model that llama.cpp loads and generates from (random
weights, so the words are nonsense); the ONNX graph runs in onnxruntime; the SafeTensors and
PyTorch files have the byte layout of the real thing.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import gguf

# A llama (SentencePiece) vocabulary: the three special tokens, the 256 byte-fallback tokens
# that let llama.cpp spell any text, then a few word pieces.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
WORDS = ("▁hello", "▁world", "▁the", "▁a", "▁model", "▁Inferno", "▁is", "▁fast",
         "he", "ll", "lo", "wor", "ld", "▁")
BYTE_TOKENS = 256


def tiny_vocabulary(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a ``vocab_size`` llama vocabulary."""
    import gguf

    minimum = len(SPECIAL_TOKENS) + BYTE_TOKENS + len(WORDS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum}, got {vocab_size}")
    tokens = list(SPECIAL_TOKENS) + [f"<0x{byte:02X}>" for byte in range(BYTE_TOKENS)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * BYTE_TOKENS
    scores = [0.0] * len(tokens)
    filler = [f"▁w{index}" for index in range(vocab_size - minimum)]
    for rank, word in enumerate(WORDS + tuple(filler)):
        tokens.append(word)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-float(rank))  # the SentencePiece merge order: higher score merges first
    return tokens, scores, [int(kind) for kind in types]


def write_tiny_gguf(path: Path, *, arch: str = "llama", vocab_size: int = 320, n_embd: int = 256,
                    n_layer: int = 2, n_head: int = 4, n_head_kv: int = 2, n_ff: int = 256,
                    context_length: int = 512, chat_template: str | None = None,
                    file_type: str = "F32", pooling_type: str | None = None,
                    seed: int = 0) -> Path:
    """Write a tiny llama-architecture GGUF model that llama.cpp loads and generates from.

    ``n_embd`` and ``n_ff`` default to 256 so that every weight row is a whole K-quant block
    (llama.cpp's Q4_K_M needs rows that are multiples of 256). ``file_type`` is "F32" or "F16":
    the matrices are written in that type, the norms always in F32, as llama.cpp's converter does.
    ``pooling_type`` ("mean", "cls", "last") declares how an embedding model pools. With the
    defaults the file is about 4 MB. ``arch`` other than "llama" writes the same tensors under
    that architecture's keys, which llama.cpp refuses for an unknown name.
    """
    import gguf

    storage = {"F32": (np.float32, gguf.LlamaFileType.ALL_F32),
               "F16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}
    if file_type not in storage:
        raise ValueError(f"file_type must be one of {sorted(storage)}, got {file_type!r}")
    matrix_dtype, llama_file_type = storage[file_type]
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        # numpy's (rows, cols) is ggml's [cols, rows]: cols is the row length llama.cpp quantises
        return (rng.standard_normal((rows, cols)) * 0.02).astype(matrix_dtype)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_file_type(int(llama_file_type))
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    _add_llama_tokenizer(writer, vocab_size)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if pooling_type is not None:
        writer.add_pooling_type(gguf.PoolingType[pooling_type.upper()])

    writer.add_tensor("token_embd.weight", matrix(vocab_size, n_embd))
    for block in range(n_layer):
        prefix = f"blk.{block}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", norm())
        writer.add_tensor(f"{prefix}.attn_q.weight", matrix(n_embd, n_embd))
        writer.add_tensor(f"{prefix}.attn_k.weight", matrix(n_embd_kv, n_embd))
        writer.add_tensor(f"{prefix}.attn_v.weight", matrix(n_embd_kv, n_embd))
        writer.add_tensor(f"{prefix}.attn_output.weight", matrix(n_embd, n_embd))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", norm())
        writer.add_tensor(f"{prefix}.ffn_gate.weight", matrix(n_ff, n_embd))
        writer.add_tensor(f"{prefix}.ffn_up.weight", matrix(n_ff, n_embd))
        writer.add_tensor(f"{prefix}.ffn_down.weight", matrix(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", matrix(vocab_size, n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_llama_tokenizer(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    tokens, scores, token_types = tiny_vocabulary(vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def tiny_gguf_parameters(*, vocab_size: int = 320, n_embd: int = 256, n_layer: int = 2,
                         n_head: int = 4, n_head_kv: int = 2, n_ff: int = 256) -> int:
    """How many weights :func:`write_tiny_gguf` writes for these dimensions."""
    n_embd_kv = n_embd // n_head * n_head_kv
    per_block = 2 * n_embd + 2 * n_embd * n_embd + 2 * n_embd * n_embd_kv + 3 * n_embd * n_ff
    return 2 * vocab_size * n_embd + n_embd + n_layer * per_block


def write_tiny_onnx(path: Path) -> Path:
    """A small valid ONNX graph: ``logits = input @ W + b`` over int64 ids looked up in a table.

    Inputs ``input_ids`` (int64, [batch, sequence]); output ``logits`` (float32,
    [batch, sequence, 4]). Opset 17, so any recent onnxruntime runs it.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "table")
    weight = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(np.zeros(4, dtype=np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
         helper.make_node("MatMul", ["embedded", "weight"], ["projected"]),
         helper.make_node("Add", ["projected", "bias"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 4])],
        initializer=[table, weight, bias],
    )
    model = helper.make_model(graph, producer_name="inferno-tests", producer_version="1.0",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_float_matmul_onnx(path: Path, *, features: int = 64, outputs: int = 32) -> Path:
    """A float32 ONNX model, ``y = relu(x @ W1) @ W2``, with weights big enough to quantise.

    Input ``x`` (float32, [batch, features]); output ``y`` (float32, [batch, outputs]).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    hidden = 2 * features
    w1 = numpy_helper.from_array(
        (rng.standard_normal((features, hidden)) * 0.1).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(
        (rng.standard_normal((hidden, outputs)) * 0.1).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["h_relu"]),
         helper.make_node("MatMul", ["h_relu", "w2"], ["y"])],
        "float_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", outputs])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, producer_name="inferno-tests",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_safetensors(path: Path, *, metadata: dict[str, str] | None = None) -> Path:
    """A small valid SafeTensors file written by hand: 8-byte length, JSON header, data.

    Two tensors: ``embed.weight`` F32 [4, 3] and ``head.bias`` F16 [5]; 17 parameters.
    """
    tensors = {"embed.weight": np.arange(12, dtype=np.float32).reshape(4, 3),
               "head.bias": np.ones(5, dtype=np.float16)}
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header: dict[str, object] = {}
    data = bytearray()
    for name, array in tensors.items():
        begin = len(data)
        data += array.tobytes()
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [begin, len(data)]}
    if metadata is not None:
        header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes with spaces
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data))
    return path


def write_pytorch_zip(path: Path) -> Path:
    """A zip laid out like ``torch.save``'s: ``archive/data.pkl`` (a pickled plain dict),
    ``archive/version`` and ``archive/byteorder``. Nothing in it needs torch to read."""
    state = {"weight": [[0.0, 1.0], [2.0, 3.0]], "bias": [0.5, 0.5]}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(state, protocol=2))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path


def write_pytorch_legacy(path: Path) -> Path:
    """A raw pickle stream as the pre-1.6 ``torch.save`` wrote: protocol 2, starting 0x80 0x02."""
    buffer = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, buffer, protocol=2)  # torch's legacy magic number
    pickle.dump({"weight": [1.0, 2.0]}, buffer, protocol=2)
    path.write_bytes(buffer.getvalue())
    return path


def truncate(path: Path, dst: Path, keep_bytes: int) -> Path:
    """Copy the first ``keep_bytes`` bytes of ``path`` to ``dst``."""
    with path.open("rb") as source:
        dst.write_bytes(source.read(keep_bytes))
    return dst


def write_garbage(path: Path, size: int) -> Path:
    """``size`` random bytes that are no model format (the first byte is never 0x80)."""
    data = bytearray(np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes())
    if data:
        data[0] = 0x5A
    path.write_bytes(bytes(data))
    return path


def write_wrong_magic(path: Path) -> Path:
    """A GGUF-shaped file whose magic is ``GGUX``: version, counts, then nothing useful."""
    path.write_bytes(b"GGUX" + struct.pack("<IQQ", 3, 0, 0) + b"\0" * 32)
    return path
