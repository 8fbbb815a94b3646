"""Text models in ONNX: sentence encoders (``embed``) and sequence classifiers
(``classify``), told apart by their graph's inputs and outputs, with the tokenizer found
beside the model or where its options say."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from inferno.plugins.backends.onnx_models import OnnxModel
from inferno.plugins.backends.onnx_options import OnnxOptions
from inferno.plugins.backends.onnx_session import TensorInfo
from inferno.plugins.models.errors import ModelFileError, RequestError

R = TypeVar("R")
TEXT_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})
#: Where a tokenizer's usable length is written, most specific first; beside the tokenizer
#: or the model.
LENGTH_SOURCES = (("sentence_bert_config.json", "max_seq_length"),
                  ("tokenizer_config.json", "model_max_length"),
                  ("config.json", "max_position_embeddings"))
DEFAULT_MAX_LENGTH = 512
#: What a session run costs beyond the tokens it reads, in tokens' worth of work: a batch
#: is split where that saves more padding than the extra runs cost. For MiniLM int8 on two
#: cores, 8 to 32 gave the same throughput, 1.35 times that of one run padded to the
#: longest of 32 sentences of 4 to 40 words.
RUN_COST_TOKENS = 16


def detect_model_type(inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]) -> str:
    """``text-encoder``, ``classifier`` or ``generic``, from the graph's names and ranks."""
    by_name = {tensor.name: tensor for tensor in inputs}
    ids = by_name.get("input_ids")
    if ids is None or len(ids.shape) != 2 or set(by_name) - TEXT_INPUTS:
        return "generic"
    logits = next((tensor for tensor in outputs if tensor.name == "logits"), None)
    if logits is not None and len(logits.shape) == 2:
        return "classifier"
    if embedding_output(outputs) is not None:
        return "text-encoder"
    return "generic"


def embedding_output(outputs: Sequence[TensorInfo]) -> TensorInfo | None:
    """The output to pool: a ready sentence embedding, else the token states."""
    by_name = {tensor.name: tensor for tensor in outputs}
    pooled = by_name.get("sentence_embedding")
    if pooled is not None and len(pooled.shape) == 2:
        return pooled
    states = by_name.get("last_hidden_state")
    if states is not None and len(states.shape) == 3:
        return states
    floats = [tensor for tensor in outputs
              if len(tensor.shape) == 3 and tensor.type.startswith("tensor(float")]
    return floats[0] if len(floats) == 1 else None


def find_tokenizer(model: str, path: Path, option: str) -> Path:
    """The tokenizer file: ``option`` (a file, or a folder holding tokenizer.json; relative
    to the model's folder), else tokenizer.json beside the model."""
    wanted = path.parent / option if option else path.parent
    candidate = wanted / "tokenizer.json" if wanted.is_dir() else wanted
    if not candidate.is_file():
        looked = (f"the `tokenizer` option points to {candidate}, which does not exist"
                  if option else f"looked for {candidate}, beside the model")
        raise ModelFileError(model, f"needs a tokenizer and none was found: {looked}; set the "
                                    f"model's `tokenizer` option to its tokenizer.json (or "
                                    f"the folder holding it)")
    return candidate


def load_tokenizer(model: str, path: Path, option: str) -> tuple[Tokenizer, Path]:
    """The tokenizer and the file it came from."""
    file = find_tokenizer(model, path, option)
    try:
        return Tokenizer.from_file(str(file)), file
    except Exception as exc:  # tokenizers raises its own untyped Exception
        raise ModelFileError(file, f"is not a tokenizer the tokenizers package can read "
                                   f"({exc})") from exc


def max_length(tokenizer: Tokenizer, folders: Sequence[Path]) -> int:
    """The length texts are truncated to when no option says: what the files beside the
    tokenizer or model say, else the tokenizer's own truncation, else 512."""
    for name, key in LENGTH_SOURCES:
        for folder in folders:
            value = read_json(folder / name).get(key)
            if isinstance(value, int) and 0 < value < 100_000:  # 1e30 means "no limit"
                return value
    truncation = tokenizer.truncation
    return int(truncation["max_length"]) if truncation else DEFAULT_MAX_LENGTH


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` when it is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(path, f"is not readable JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _check_unicode(model: str, index: int, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(model, f"input {index} is not valid Unicode: character "
                                  f"{exc.start} is a lone surrogate "
                                  f"(U+{ord(text[exc.start]):04X})") from None


def plan_runs(widths: Sequence[int], most: int, budget: int) -> list[range]:
    """Session runs for texts of ascending padded ``widths``: consecutive ranges of at most
    ``most`` texts and ``budget`` padded tokens (a wider text runs alone), chosen for the
    least work, counted as padded tokens plus ``RUN_COST_TOKENS`` a run. Short texts thus
    run with short ones instead of padded to the longest of the call."""
    # cost[end]: the least work for the first ``end`` texts, whose last run starts at
    # first[end]. Each run is padded to its last (widest) text.
    cost = [0] * (len(widths) + 1)
    first = [0] * (len(widths) + 1)
    for end in range(1, len(widths) + 1):
        width = widths[end - 1]
        best, best_start = cost[end - 1] + RUN_COST_TOKENS + width, end - 1
        for start in range(end - 2, max(end - most, 0) - 1, -1):
            if (end - start) * width > budget:
                break
            work = cost[start] + RUN_COST_TOKENS + (end - start) * width
            if work < best:
                best, best_start = work, start
        cost[end], first[end] = best, best_start
    runs = []
    end = len(widths)
    while end:
        runs.append(range(first[end], end))
        end = first[end]
    return runs[::-1]


def _in_order(runs: Sequence[Sequence[int]], batches: Sequence[Sequence[R]], count: int
              ) -> list[R]:
    """The results of ``batches`` (one per run of indexes) in the order of the indexes."""
    results: list[Any] = [None] * count
    for run, batch in zip(runs, batches, strict=True):
        for index, result in zip(run, batch, strict=True):
            results[index] = result
    return results


class TextModel(OnnxModel):
    """What encoders and classifiers share: tokenising, padding and batching."""

    def __init__(self, session: ort.InferenceSession, info: Mapping[str, Any], *,
                 tokenizer: Tokenizer, length: int) -> None:
        by_name = {tensor.name: tensor for tensor in info["inputs"]}
        self.feed_types = {name: by_name[name].dtype or np.dtype(np.int64) for name in by_name}
        width = by_name["input_ids"].shape[1]
        # A graph exported with a fixed sequence length takes exactly that many tokens.
        self.fixed_width = width if isinstance(width, int) else None
        length = min(length, self.fixed_width or length)
        self.max_batch_tokens: int = info["max_batch_tokens"]
        padding = tokenizer.padding
        self.pad_id = int(padding["pad_id"]) if padding else 0
        tokenizer.no_padding()  # each batch is padded to its own longest text
        tokenizer.enable_truncation(length)
        self.tokenizer = tokenizer
        super().__init__(session, {**info, "max_length": length})

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes as this model reads it (after truncation), for usage counts."""
        return len(self.tokenizer.encode(text).ids)

    def texts(self, inputs: Any) -> list[str]:
        """``inputs`` as a list of strings, or a ``RequestError`` saying which is not one."""
        if isinstance(inputs, str | bytes) or not isinstance(inputs, Sequence):
            raise RequestError(self.name, f"expects a list of strings, got "
                                          f"{type(inputs).__name__}")
        for index, text in enumerate(inputs):
            if not isinstance(text, str):
                raise RequestError(self.name, f"input {index} is {type(text).__name__}, "
                                              f"not a string")
            if not text.isascii():  # JSON's \ud800 escapes reach here; the tokenizer balks
                _check_unicode(self.name, index, text)
        return list(inputs)

    async def batched(self, inputs: Any, compute: Callable[[list[Encoding]], list[R]]
                      ) -> list[R]:
        """``compute`` over ``inputs`` in runs of similar lengths (see :func:`plan_runs`), in
        a worker thread; results in the order of ``inputs``."""
        texts = self.texts(inputs)
        if not texts:
            return []
        if len(texts) <= self.batch_size:  # one trip to a worker thread for all its runs
            return await asyncio.to_thread(self._compute_all, texts, compute)
        encodings, runs = await asyncio.to_thread(self._plan, texts)
        batches = [await asyncio.to_thread(compute, [encodings[index] for index in run])
                   for run in runs]  # a trip each: a long call lets the model close between
        return _in_order(runs, batches, len(texts))

    def _compute_all(self, texts: list[str], compute: Callable[[list[Encoding]], list[R]]
                     ) -> list[R]:
        encodings, runs = self._plan(texts)
        batches = [compute([encodings[index] for index in run]) for run in runs]
        return _in_order(runs, batches, len(texts))

    def _plan(self, texts: list[str]) -> tuple[list[Encoding], list[list[int]]]:
        """The encodings of ``texts`` and the runs to compute them in, as lists of indexes
        into ``texts``."""
        encodings = self.tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda index: len(encodings[index]))
        widths = [self.fixed_width or len(encodings[index]) for index in order]
        return encodings, [order[run.start:run.stop]
                           for run in plan_runs(widths, self.batch_size, self.max_batch_tokens)]

    def feeds(self, encodings: Sequence[Encoding]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The graph's text inputs for ``encodings``, padded to the longest (or the graph's
        fixed width), and the attention mask."""
        width = self.fixed_width or max(len(encoding) for encoding in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            length = len(encoding)
            ids[row, :length] = encoding.ids
            mask[row, :length] = 1
            types[row, :length] = encoding.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feeds = {name: arrays[name] if dtype == np.int64 else arrays[name].astype(dtype)
                 for name, dtype in self.feed_types.items()}
        return feeds, mask


class TextEncoder(TextModel):
    """Sentence embeddings: mean of the token states over the attention mask (or the graph's
    own pooled output), L2-normalised."""

    model_type = "text-encoder"

    def __init__(self, session: ort.InferenceSession, info: Mapping[str, Any], *,
                 tokenizer: Tokenizer, length: int) -> None:
        output = embedding_output(info["outputs"])
        assert output is not None, "detect_model_type chose this class"
        self.output = output
        dimension = output.shape[-1]
        super().__init__(session, {
            **info, "embedding_output": output.name,
            "embedding_length": dimension if isinstance(dimension, int) else None,
        }, tokenizer=tokenizer, length=length)

    async def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        """One unit vector per text, in the order given."""
        return await self.batched(inputs, self.embed_encodings)

    async def embed_counted(self, inputs: Sequence[str]
                            ) -> tuple[list[list[float]], list[int] | None]:
        """The vectors, and each input's tokens (after truncation) counted from the
        encodings ``embed`` makes anyway."""

        def compute(encodings: list[Encoding]) -> list[tuple[list[float], int]]:
            vectors = self.embed_encodings(encodings)
            return [(vector, len(encoding)) for vector, encoding in zip(vectors, encodings,
                                                                         strict=True)]

        pairs = await self.batched(inputs, compute)
        return [vector for vector, _ in pairs], [count for _, count in pairs]

    def embed_encodings(self, encodings: list[Encoding]) -> list[list[float]]:
        feeds, mask = self.feeds(encodings)
        (states,) = self.run([self.output.name], feeds)
        states = np.asarray(states, dtype=np.float32)
        if states.ndim == 3:
            weights = mask.astype(np.float32)
            summed = np.matmul(weights[:, None, :], states)[:, 0, :]
            states = summed / np.maximum(weights.sum(axis=1, keepdims=True), 1.0)
        norms = np.linalg.norm(states, axis=1, keepdims=True)
        return (states / np.maximum(norms, 1e-12)).tolist()  # type: ignore[no-any-return]


class TextClassifier(TextModel):
    """Sequence classification: each text's labels with their probabilities, most likely
    first. Labels come from ``config.json``'s ``id2label`` beside the model or its tokenizer."""

    model_type = "classifier"

    def __init__(self, session: ort.InferenceSession, info: Mapping[str, Any], *,
                 tokenizer: Tokenizer, length: int, config: Mapping[str, Any]) -> None:
        logits = next(tensor for tensor in info["outputs"] if tensor.name == "logits")
        count = logits.shape[-1]
        id2label = config.get("id2label") or {}
        known = {int(key): str(value) for key, value in id2label.items() if str(key).isdigit()}
        size = count if isinstance(count, int) else (max(known) + 1 if known else 0)
        self.labels = [known.get(index, f"LABEL_{index}") for index in range(size)]
        # Multi-label heads score each label on its own; the rest share one softmax.
        self.multi_label = config.get("problem_type") == "multi_label_classification"
        super().__init__(session, {**info, "labels": list(self.labels)},
                         tokenizer=tokenizer, length=length)

    async def classify(self, inputs: Sequence[str]) -> list[list[dict[str, Any]]]:
        """For each text, every label and its score, highest first."""
        return await self.batched(inputs, self.classify_encodings)

    def classify_encodings(self, encodings: list[Encoding]) -> list[list[dict[str, Any]]]:
        feeds, _ = self.feeds(encodings)
        (logits,) = self.run(["logits"], feeds)
        logits = np.asarray(logits, dtype=np.float64)
        if self.multi_label:
            scores = 1.0 / (1.0 + np.exp(-logits))
        else:
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            scores = shifted / shifted.sum(axis=1, keepdims=True)
        return [[{"label": self.label(index), "score": float(row[index])}
                 for index in np.argsort(-row, kind="stable")] for row in scores]

    def label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else f"LABEL_{index}"


def open_text_model(model_type: str, session: ort.InferenceSession, info: Mapping[str, Any],
                    options: OnnxOptions) -> TextModel:
    """A text encoder or classifier for ``session``, with its tokenizer, truncation length
    and (for classifiers) labels read from the files beside the model or tokenizer."""
    name, path = info["name"], Path(info["path"])
    tokenizer, file = load_tokenizer(name, path, options.tokenizer)
    folders = list(dict.fromkeys([file.parent, path.parent]))
    length = options.max_length or max_length(tokenizer, folders)
    info = {**info, "tokenizer": str(file)}
    if model_type == "classifier":
        config = next((read_json(folder / "config.json") for folder in folders
                       if "id2label" in read_json(folder / "config.json")), {})
        return TextClassifier(session, info, tokenizer=tokenizer, length=length, config=config)
    return TextEncoder(session, info, tokenizer=tokenizer, length=length)
