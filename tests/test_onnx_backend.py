"""The ONNX backend: a real sentence encoder (all-MiniLM-L6-v2, int8), and small graphs
built here for the classifier and generic kinds and for bad inputs."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from structlog.testing import capture_logs
from tokenizers import Tokenizer

from inferno.kernel import ConfigError, ModelSpec
from inferno.plugins.backends.hardware import physical_cores
from inferno.plugins.models.errors import ModelError, ModelFileError, RequestError

SENTENCES = ["a cat sits on the mat", "a kitten is on the rug", "stock markets fell today"]
UNEVEN = ["hi", "the quick brown fox jumps over the lazy dog by the river bank",
          "stock markets fell today", "ok then",
          "a much longer sentence about nothing in particular that goes on for a while"]
LABELS = {"0": "negative", "1": "neutral", "2": "positive"}

WithModel = Callable[..., Any]


@pytest.fixture
def with_model(make_kernel, run_kernel) -> WithModel:
    """``with_model(path, scenario, options=..., config=..., metadata=...)``: load the model
    through a running kernel's ``onnx`` backend, await ``scenario(model)`` and return its
    result."""

    def run(path: Path, scenario: Callable[[Any], Awaitable[Any]], *,
            options: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
            name: str = "model", metadata: Mapping[str, Any] | None = None) -> Any:
        kernel = make_kernel({"backends": {"onnx": dict(config or {})}})

        async def load_and_run(kernel: Any) -> Any:
            backend = kernel.drivers("backends")["onnx"]
            model = await backend.load(ModelSpec(name, Path(path), "onnx", options=options or {},
                                                 metadata=metadata or {}))
            try:
                return await scenario(model)
            finally:
                await model.close()

        return run_kernel(kernel, load_and_run)

    return run


@pytest.fixture(scope="module")
def tokenizer_option(minilm_files: Path) -> dict[str, str]:
    return {"tokenizer": str(minilm_files / "tokenizer.json")}


async def info_of(model: Any) -> dict[str, Any]:
    return dict(model.info)


# --------------------------------------------------------------------------- graphs


def save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def adder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generic graph: ``total = a + b``, float [batch, 3] each."""
    def tensor(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3])

    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["total"])], "adder",
                              [tensor("a"), tensor("b")], [tensor("total")])
    return save(graph, tmp_path_factory.mktemp("adder") / "adder.onnx")


CLASSIFIER_EMBEDDING = np.random.default_rng(7).normal(size=(30522, 4)).astype(np.float32)
CLASSIFIER_HEAD = np.random.default_rng(8).normal(size=(4, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory, minilm_files: Path) -> Path:
    """A tiny sequence classifier: masked mean of token embeddings, then a linear head to
    three logits; minilm's tokenizer and a config.json with id2label beside it."""
    folder = tmp_path_factory.mktemp("classifier")
    ints = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in ("input_ids", "attention_mask")]
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "sequence_axis"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "sequence_axis"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "head"], ["logits"]),
    ]
    constants = [numpy_helper.from_array(CLASSIFIER_EMBEDDING, "embedding"),
                 numpy_helper.from_array(CLASSIFIER_HEAD, "head"),
                 numpy_helper.from_array(np.array([2], dtype=np.int64), "last"),
                 numpy_helper.from_array(np.array([1], dtype=np.int64), "sequence_axis")]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    save(helper.make_graph(nodes, "classifier", ints, [logits], constants),
         folder / "model.onnx")
    shutil.copy(minilm_files / "tokenizer.json", folder / "tokenizer.json")
    (folder / "config.json").write_text(json.dumps({"id2label": LABELS}))
    return folder / "model.onnx"


def reference_scores(tokenizer_file: Path, text: str) -> np.ndarray:
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()  # this tokenizer.json pads to 128 on its own
    ids = tokenizer.encode(text).ids
    logits = CLASSIFIER_EMBEDDING[ids].mean(axis=0) @ CLASSIFIER_HEAD
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- text encoder


def test_a_text_encoder_makes_unit_vectors_and_describes_itself(with_model, minilm_onnx,
                                                                tokenizer_option):
    async def scenario(model):
        return await model.embed(SENTENCES), dict(model.info)

    vectors, info = with_model(minilm_onnx, scenario, options=tokenizer_option)
    array = np.array(vectors)
    assert array.shape == (3, 384)
    assert np.allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-5)
    assert {"name": "model", "format": "onnx", "backend": "onnx", "model_type": "text-encoder",
            "providers": ["CPUExecutionProvider"], "embedding_length": 384, "opset": 17,
            "batch_size": 32, "path": str(minilm_onnx)}.items() <= info.items()
    assert [tensor["name"] for tensor in info["inputs"]] == ["input_ids", "attention_mask",
                                                             "token_type_ids"]
    assert info["outputs"] == [{"name": "last_hidden_state", "shape": ["batch", "sequence", 384],
                                "type": "tensor(float)"}]
    assert info["load_seconds"] > 0


def test_similar_sentences_embed_closer_than_unrelated_ones(with_model, minilm_onnx,
                                                            tokenizer_option):
    cat, kitten, markets = np.array(with_model(
        minilm_onnx, lambda model: model.embed(SENTENCES), options=tokenizer_option))
    assert cat @ kitten > cat @ markets + 0.3


def test_batches_give_the_same_vectors_in_input_order(with_model, minilm_onnx,
                                                      tokenizer_option):
    async def scenario(model):
        return (await model.embed(UNEVEN),
                [(await model.embed([text]))[0] for text in UNEVEN])

    batched, one_by_one = with_model(minilm_onnx, scenario,
                                     options={**tokenizer_option, "batch_size": 2})
    assert np.allclose(batched, one_by_one, atol=1e-5)


def test_embeddings_match_raw_onnxruntime_and_tokenizers(with_model, minilm_onnx,
                                                         tokenizer_option):
    tokenizer = Tokenizer.from_file(tokenizer_option["tokenizer"])
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(UNEVEN)
    feeds = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
             "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
             "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
    session = ort.InferenceSession(str(minilm_onnx), providers=["CPUExecutionProvider"])
    (states,) = session.run(["last_hidden_state"], feeds)
    mask = feeds["attention_mask"][..., None].astype(np.float32)
    pooled = (states * mask).sum(axis=1) / mask.sum(axis=1)
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    vectors = with_model(minilm_onnx, lambda model: model.embed(UNEVEN), options=tokenizer_option)
    assert np.allclose(vectors, expected, atol=1e-5)


def test_no_texts_give_no_vectors(with_model, minilm_onnx, tokenizer_option):
    assert with_model(minilm_onnx, lambda model: model.embed([]), options=tokenizer_option) == []


@pytest.mark.parametrize(("texts", "message"), [
    ("a single string", "expects a list of strings, got str"),
    (["fine", 3], "input 1 is int, not a string"),
    ([None], "input 0 is NoneType, not a string"),
])
def test_texts_that_are_not_strings_are_request_errors(with_model, minilm_onnx,
                                                       tokenizer_option, texts, message):
    with pytest.raises(RequestError, match=message):
        with_model(minilm_onnx, lambda model: model.embed(texts), options=tokenizer_option)


def test_an_encoder_neither_generates_nor_classifies(with_model, minilm_onnx,
                                                     tokenizer_option):
    async def scenario(model):
        with pytest.raises(RequestError, match="does not generate text; use embed"):
            async for _ in model.generate(object()):
                pass
        with pytest.raises(RequestError, match="does not classify text; use embed"):
            await model.classify(["text"])

    with_model(minilm_onnx, scenario, options=tokenizer_option)


def test_sessions_run_in_worker_threads(with_model, minilm_onnx, tokenizer_option):
    threads = []

    async def scenario(model):
        original = model.run

        def recording_run(*args):
            threads.append(threading.get_ident())
            return original(*args)

        model.run = recording_run
        await model.embed(UNEVEN)
        await model.embed(UNEVEN * 3)
        return threading.get_ident()

    loop_thread = with_model(minilm_onnx, scenario, options={**tokenizer_option,
                                                             "batch_size": 4})
    assert len(threads) == 2 + 5  # ceil(5 / 4), then 15 in five runs of similar lengths
    assert loop_thread not in threads


def test_a_closed_model_says_so(with_model, minilm_onnx, tokenizer_option):
    async def scenario(model):
        await model.close()
        await model.embed(["text"])

    with pytest.raises(ModelError, match="model: is closed"):
        with_model(minilm_onnx, scenario, options=tokenizer_option)


# --------------------------------------------------------------------------- load errors


def test_a_missing_tokenizer_names_the_model_and_where_it_looked(with_model, minilm_onnx):
    with pytest.raises(ModelFileError) as caught:
        with_model(minilm_onnx, info_of, name="minilm")
    message = str(caught.value)
    assert message.startswith("minilm: needs a tokenizer and none was found: looked for ")
    assert str(minilm_onnx.parent / "tokenizer.json") in message
    assert "`tokenizer` option" in message


def test_a_tokenizer_option_that_points_nowhere_says_so(with_model, minilm_onnx, tmp_path):
    with pytest.raises(ModelFileError, match="the `tokenizer` option points to"):
        with_model(minilm_onnx, info_of, options={"tokenizer": str(tmp_path / "none.json")})


@pytest.mark.parametrize(("content", "message"), [
    (np.random.default_rng(1).bytes(4096), "ONNX"),
    (b"", "empty"),
])
def test_a_file_that_is_not_onnx_names_the_file(with_model, tmp_path, content, message):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message) as caught:
        with_model(path, info_of)
    assert caught.value.subject == str(path)


def test_a_truncated_model_names_the_file(with_model, minilm_onnx, tmp_path):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(minilm_onnx.read_bytes()[:100_000])
    with pytest.raises(ModelFileError, match="not a valid ONNX model") as caught:
        with_model(path, info_of)
    assert caught.value.subject == str(path)


def test_a_missing_file_names_the_file(with_model, tmp_path):
    with pytest.raises(ModelFileError, match=r"absent.onnx: missing"):
        with_model(tmp_path / "absent.onnx", info_of)


def test_a_model_of_another_format_is_turned_away(with_model, minilm_files):
    with pytest.raises(ModelFileError, match=r"is a safetensors file, not an ONNX model "
                                             r"\(model 'model'\)"):
        with_model(minilm_files / "model.safetensors", info_of)


def test_what_the_model_manager_read_is_not_read_again(with_model, adder, monkeypatch):
    from inferno.plugins.models import formats

    def read_again(path):
        raise AssertionError(f"{path} read twice")

    monkeypatch.setattr(formats, "describe", read_again)
    assert with_model(adder, info_of, metadata={"opset": 17})["opset"] == 17


# --------------------------------------------------------------------------- settings


def test_an_unavailable_provider_is_skipped_with_a_warning(with_model, adder):
    with capture_logs() as logs:
        info = with_model(adder, info_of, config={
            "providers": ["NoSuchExecutionProvider", "CPUExecutionProvider"]})
    assert info["providers"] == ["CPUExecutionProvider"]
    warning = next(log for log in logs if log["log_level"] == "warning" and "provider" in log)
    assert warning["provider"] == "NoSuchExecutionProvider"
    assert "CPUExecutionProvider" in warning["available"]


def test_no_available_provider_is_an_error_that_says_how_to_fall_back(with_model, adder):
    with pytest.raises(ModelError, match="add CPUExecutionProvider"):
        with_model(adder, info_of, options={"providers": ["NoSuchExecutionProvider"]})


def test_session_settings_follow_the_config(with_model, adder):
    async def scenario(model):
        options = model.session.get_session_options()
        return (options.intra_op_num_threads, options.graph_optimization_level,
                options.get_session_config_entry("session.intra_op.allow_spinning"),
                options.get_session_config_entry("session.inter_op.allow_spinning"))

    assert with_model(adder, scenario, config={"intra_op_threads": 1,
                                               "graph_optimization_level": "basic"}) == (
        1, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "0", "0")


def test_zero_threads_means_one_per_physical_core(with_model, adder):
    assert with_model(adder, info_of)["intra_op_threads"] == physical_cores()


def test_model_options_override_the_driver_config(with_model, adder):
    info = with_model(adder, info_of, config={"batch_size": 8}, options={"batch_size": 4})
    assert info["batch_size"] == 4


def test_the_optimised_graph_is_saved_under_the_data_dir(with_model, adder, inferno_data_dir):
    info = with_model(adder, info_of, name="team/adder:v1",
                      options={"optimized_model_dir": "optimised"})
    saved = inferno_data_dir / "backends" / "onnx" / "optimised" / "team_adder_v1.onnx"
    assert info["optimized_model"] == str(saved)
    assert saved.is_file()


def test_bad_model_options_are_all_named_at_once(with_model, adder):
    with pytest.raises(ModelError) as caught:
        with_model(adder, info_of, options={"batch_sise": 4, "execution_mode": "fast"})
    message = str(caught.value)
    assert "unknown option 'batch_sise'; did you mean 'batch_size'?" in message
    assert "option execution_mode must be one of sequential, parallel, got 'fast'" in message


def test_what_a_model_entry_says_about_generation_is_ignored(with_model, adder):
    info = with_model(adder, info_of, options={"system_prompt": "Be brief.", "parameters": {
        "temperature": 0.2}, "chat_template": "{{ messages }}", "batch_size": 3})
    assert info["batch_size"] == 3


def test_bad_profile_values_stop_configuration(make_kernel):
    with pytest.raises(ConfigError) as caught:
        make_kernel({"backends": {"onnx": {"graph_optimization_level": "max",
                                           "providers": [], "batch_size": 0}}})
    keys = {problem.key for problem in caught.value.problems}
    assert keys == {"backends.onnx.graph_optimization_level", "backends.onnx.providers",
                    "backends.onnx.batch_size"}


# --------------------------------------------------------------------------- classifier


def test_a_classifier_scores_every_label_most_likely_first(with_model, classifier):
    texts = ["what a wonderful day", "terrible service", "fine"]

    async def scenario(model):
        return await model.classify(texts), dict(model.info)

    results, info = with_model(classifier, scenario, options={"batch_size": 2})
    assert info["model_type"] == "classifier"
    assert info["labels"] == ["negative", "neutral", "positive"]
    for text, scored in zip(texts, results, strict=True):
        expected = reference_scores(classifier.parent / "tokenizer.json", text)
        assert [entry["label"] for entry in scored] == \
            [info["labels"][index] for index in np.argsort(-expected)]
        assert [entry["score"] for entry in scored] == pytest.approx(sorted(expected)[::-1],
                                                                     abs=1e-5)


def test_a_classifier_without_id2label_numbers_its_labels(with_model, classifier, tmp_path):
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copy(classifier.parent / name, tmp_path / name)
    results = with_model(tmp_path / "model.onnx", lambda model: model.classify(["text"]))
    assert sorted(entry["label"] for entry in results[0]) == ["LABEL_0", "LABEL_1", "LABEL_2"]


# --------------------------------------------------------------------------- generic


def test_a_generic_graph_runs_with_arrays_or_lists(with_model, adder):
    async def scenario(model):
        return (await model.infer({"a": np.ones((2, 3), np.float32), "b": [[1, 2, 3]] * 2}),
                model.info["model_type"])

    outputs, model_type = with_model(adder, scenario)
    assert model_type == "generic"
    assert outputs["total"].tolist() == [[2.0, 3.0, 4.0]] * 2


@pytest.mark.parametrize(("feeds", "message"), [
    ({"a": [[0.0] * 3], "b": [[0.0] * 3], "c": [1]}, r"unknown input 'c'; the model's inputs "
                                                     r"are: a \(tensor\(float\) \[batch, 3\]\)"),
    ({"a": [[0.0] * 3]}, r"missing input b \(tensor\(float\) \[batch, 3\]\)"),
    ({"a": np.zeros((1, 3)), "b": [[0.0] * 3]},
     "input 'a' must be float32 \\(tensor\\(float\\)\\), got an array of float64"),
    ({"a": [["x"] * 3], "b": [[0.0] * 3]}, "input 'a' must be float32 .* got values of <U1"),
    ({"a": [0.0] * 3, "b": [[0.0] * 3]}, "input 'a' must have 2 dimensions .* got 1"),
    ({"a": [[0.0] * 4], "b": [[0.0] * 3]}, "input 'a' must have 3 in dimension 1"),
    ({"a": [[0.0] * 3] * 2, "b": [[0.0] * 3]},
     "input 'b' has 1 in dimension 0 \\('batch'\\), but input 'a' has 2 there"),
    ({"a": [[0.0] * 3, [0.0]], "b": [[0.0] * 3]}, "input 'a' is not a rectangular array"),
    ([1, 2], "infer takes a mapping of input names to arrays, got list"),
])
def test_feeds_that_do_not_fit_the_graph_are_request_errors(with_model, adder, feeds, message):
    with pytest.raises(RequestError, match=message):
        with_model(adder, lambda model: model.infer(feeds))


def test_a_generic_model_points_to_infer(with_model, adder):
    with pytest.raises(RequestError, match=r"generic ONNX model and does not make embeddings; "
                                           r"use infer with its inputs: a \("):
        with_model(adder, lambda model: model.embed(["text"]))


def test_the_backend_closes_what_is_still_open_when_it_stops(make_kernel, run_kernel, adder):
    async def scenario(kernel):
        return await kernel.drivers("backends")["onnx"].load(ModelSpec("adder", adder, "onnx"))

    model = run_kernel(make_kernel({"backends": {"onnx": {}}}), scenario)
    with pytest.raises(ModelError, match="adder: is closed"):
        asyncio.run(model.infer({"a": [[0.0] * 3], "b": [[0.0] * 3]}))
