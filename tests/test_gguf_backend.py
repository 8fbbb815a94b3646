"""The gguf backend with real models: Gemma 3 270M and tiny generated GGUF files.

Gemma is loaded once for the module (about half a second) in a kernel configured as a profile
would; its tests are marked slow. Tests that need other load options build their own kernel
with ``make_kernel`` and load a tiny generated model, which takes milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
import pytest_asyncio

from inferno.kernel import Chunk, GenerationRequest, Kernel, ModelSpec
from inferno.kernel.config import Layers, profiles_dir
from inferno.plugins.backends import hardware
from inferno.plugins.backends.gguf import pooling
from inferno.plugins.backends.gguf_model import GgufModel, _join
from inferno.plugins.models.errors import ModelError, RequestError

from .model_files import truncate, write_garbage, write_tiny_gguf, write_wrong_magic


def on_gemma(test: Callable[..., Any]) -> Callable[..., Any]:
    """A test of Gemma: slow (a real model) and run on the module's loop, where Gemma lives."""
    return pytest.mark.slow(pytest.mark.asyncio(loop_scope="module")(test))


PROFILE = {"backends": {"gguf": {"context_size": 2048}}}
FRANCE = "The capital of France is"
FRANCE_GREEDY = " the capital of the country of France. It is the largest city"
FRANCE_GREEDY_TOKENS = 13
TINY_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
                 "[assistant]")


async def complete(model: GgufModel, prompt: str | None = None,
                   messages: Sequence[Mapping[str, Any]] | None = None,
                   **params: Any) -> tuple[str, list[Chunk]]:
    """The whole text of one generation and the chunks it came in."""
    request = GenerationRequest("test", prompt=prompt, messages=messages, params=params)
    chunks = [chunk async for chunk in model.generate(request)]
    return "".join(chunk.text for chunk in chunks), chunks


async def greedy(model: GgufModel, prompt: str, max_tokens: int) -> str:
    text, _ = await complete(model, prompt, temperature=0, max_tokens=max_tokens)
    return text


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gemma(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[GgufModel]:
    """Gemma 3 270M, loaded once, in a running kernel (``make_kernel`` is per test)."""
    data_dir = json.dumps(str(tmp_path_factory.mktemp("inferno-data")))
    kernel = Kernel(Layers(files=[profiles_dir() / "base.toml"],
                           sets=(f"kernel.data_dir={data_dir}",), overrides=PROFILE))
    async with kernel.configure().running():
        model = await kernel.drivers("backends")["gguf"].load(
            ModelSpec("gemma", gemma_path, "gguf", {}, {}))
        yield model
        await model.close()


@pytest.fixture
def load(make_kernel: Callable[..., Kernel], run_kernel: Callable[..., Any]
         ) -> Callable[..., Any]:
    """``load(path, scenario, config=..., options=...)``: load the file in a fresh kernel whose
    ``[backends.gguf]`` is ``config``, await ``scenario(model)`` and return its result."""

    def run(path: Path, scenario: Callable[[GgufModel], Awaitable[Any]], *,
            config: Mapping[str, Any] | None = None,
            options: Mapping[str, Any] | None = None) -> Any:
        kernel = make_kernel({"backends": {"gguf": {"context_size": 2048, **(config or {})}}})

        async def scenario_in_kernel(kernel: Kernel) -> Any:
            backend = kernel.drivers("backends")["gguf"]
            model = await backend.load(ModelSpec(path.stem, path, "gguf", options or {}, {}))
            try:
                return await scenario(model)
            finally:
                await model.close()

        return run_kernel(kernel, scenario_in_kernel)

    return run


async def settings(model: GgufModel) -> dict[str, Any]:
    """What llama.cpp was given, read while the model is loaded."""
    context, params = model.llama.context_params, model.llama.model_params
    ctx = model.llama._ctx.ctx
    return {"n_ctx": model.llama.n_ctx(), "n_threads": context.n_threads,
            "n_threads_batch": context.n_threads_batch, "n_batch": llama_cpp.llama_n_batch(ctx),
            "n_ubatch": llama_cpp.llama_n_ubatch(ctx),
            "n_seq_max": llama_cpp.llama_n_seq_max(ctx), "kv_unified": context.kv_unified,
            "type_k": context.type_k, "type_v": context.type_v,
            "flash_attn_type": context.flash_attn_type, "swa_full": context.swa_full,
            "n_gpu_layers": params.n_gpu_layers, "info": dict(model.info)}


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


# --------------------------------------------------------------------------- load options


def test_threads_default_to_one_per_physical_core(load: Callable[..., Any], tiny: Path) -> None:
    given = load(tiny, settings)
    assert given["n_threads"] == given["n_threads_batch"] == hardware.physical_cores()
    assert given["info"]["threads"] == hardware.physical_cores()


def test_load_options_from_the_config_reach_llama_cpp(load: Callable[..., Any],
                                                      tiny: Path) -> None:
    given = load(tiny, settings, config={
        "context_size": 256, "threads": 1, "threads_batch": 2, "batch_size": 128,
        "ubatch_size": 64, "kv_cache_type": "q8_0", "flash_attention": True,
        "swa_full": True, "gpu_layers": 3, "parallel": 1})
    assert given["n_ctx"] == 256
    assert (given["n_threads"], given["n_threads_batch"]) == (1, 2)
    assert (given["n_batch"], given["n_ubatch"]) == (128, 64)
    assert given["type_k"] == given["type_v"] == llama_cpp.GGML_TYPE_Q8_0
    assert given["flash_attn_type"] == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert given["swa_full"]
    assert given["n_gpu_layers"] == 3


def test_a_model_entrys_options_override_the_config(load: Callable[..., Any],
                                                    tiny: Path) -> None:
    given = load(tiny, settings, config={"context_size": 512, "threads": 1},
                 options={"context_size": 256, "threads": 2, "parallel": 1})
    assert (given["n_ctx"], given["n_threads"]) == (256, 2)


def test_parallel_slots_share_one_kv_cache_of_context_size_each(load: Callable[..., Any],
                                                                tiny: Path) -> None:
    given = load(tiny, settings, config={"context_size": 256, "batch_size": 64,
                                         "ubatch_size": 512, "parallel": 3})
    # three sequences in one unified cache of one context's size, as llama.cpp's server
    assert (given["n_ctx"], given["n_seq_max"], given["kv_unified"]) == (256, 3, True)
    assert given["info"]["context_size"] == 256
    assert (given["info"]["parallel"], given["info"]["kv_cache_tokens"]) == (3, 256)
    # a step decodes its prompt budget plus one token per slot, whole
    assert (given["n_batch"], given["n_ubatch"]) == (67, 67)
    sized = load(tiny, settings, config={"context_size": 256, "parallel": 3,
                                         "kv_cache_size": 512})
    assert sized["n_ctx"] == sized["info"]["kv_cache_tokens"] == 512


@pytest.mark.parametrize("configured", [2048, 0])
def test_the_context_size_is_capped_at_the_trained_length(load: Callable[..., Any],
                                                          tmp_path: Path,
                                                          configured: int) -> None:
    path = write_tiny_gguf(tmp_path / "short.gguf", context_length=512)
    given = load(path, settings, config={"context_size": configured, "parallel": 1})
    assert given["n_ctx"] == given["info"]["context_size"] == 512


EVERY_LAYER = 0x7FFFFFFF  # llama-cpp-python's spelling of llama.cpp's -1, "all layers"


@pytest.mark.parametrize(("gpu_layers", "expected"), [
    ("auto", EVERY_LAYER if llama_cpp.llama_supports_gpu_offload() else 0),
    ("all", EVERY_LAYER), (5, 5)])
def test_gpu_layers_auto_all_or_a_number(load: Callable[..., Any], tiny: Path,
                                         gpu_layers: Any, expected: int) -> None:
    assert load(tiny, settings, options={"gpu_layers": gpu_layers})["n_gpu_layers"] == expected


def test_the_configured_seed_makes_unseeded_sampling_repeatable(load: Callable[..., Any],
                                                                tiny: Path) -> None:
    async def twice(model: GgufModel) -> list[str]:
        return [(await complete(model, "hello world", temperature=1.0, max_tokens=12))[0]
                for _ in range(2)]

    first, second = load(tiny, twice, config={"seed": 7})
    assert first == second


def test_a_quantised_kv_cache_without_flash_attention_says_what_to_set(
        load: Callable[..., Any], tiny: Path) -> None:
    with pytest.raises(ModelError, match=r"^tiny: kv_cache_type 'q4_0' needs flash_attention"
                                         r" = true or \"auto\""):
        load(tiny, settings, options={"kv_cache_type": "q4_0", "flash_attention": False})


@pytest.mark.parametrize("parallel", [1, 4])
def test_flash_attention_is_left_to_llama_cpp_by_default(load: Callable[..., Any], tiny: Path,
                                                         parallel: int) -> None:
    """llama.cpp's "auto" (as its own server has it): on wherever the device supports it,
    which a quantised KV cache needs."""
    given = load(tiny, settings, config={"parallel": parallel, "kv_cache_type": "q8_0"})
    assert given["flash_attn_type"] == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    assert given["type_k"] == given["type_v"] == llama_cpp.GGML_TYPE_Q8_0
    assert given["n_seq_max"] == parallel
    off = load(tiny, settings, config={"parallel": parallel, "flash_attention": False})
    assert off["flash_attn_type"] == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


@pytest.mark.parametrize(("options", "problem"), [
    ({"thread": 2}, r"unknown gguf option 'thread' \(known: .*threads"),
    ({"kv_cache_type": "q3"}, r"option kv_cache_type = 'q3' is invalid"),
    ({"gpu_layers": "most"}, r"option gpu_layers = 'most' is invalid"),
    ({"threads": -2}, r"option threads = -2 is invalid"),
    ({"swa_full": "yes"}, r"option swa_full = 'yes' is invalid"),
    ({"flash_attention": 1}, r"option flash_attention = 1 is invalid"),
])
def test_a_bad_model_entry_option_is_a_model_error(load: Callable[..., Any], tiny: Path,
                                                   options: dict[str, Any],
                                                   problem: str) -> None:
    with pytest.raises(ModelError, match=r"^tiny: " + problem):
        load(tiny, settings, options=options)


def test_the_memory_estimate_adds_a_kv_cache_sized_from_the_files_header(
        make_kernel: Callable[..., Kernel], run_kernel: Callable[..., Any], tiny: Path) -> None:
    async def estimates(kernel: Kernel) -> list[int]:
        backend = kernel.drivers("backends")["gguf"]
        return [backend.estimate_memory(ModelSpec("tiny", tiny, "gguf", {
            "kv_cache_type": kind, "parallel": slots, "kv_cache_size": kv}))
            for kind, slots, kv in (("f16", 1, 0), ("f32", 1, 0), ("f16", 3, 0),
                                    ("f16", 3, 1536), ("f16", 1, 1536))]

    half, full, shared, sized, plain = (
        estimate - tiny.stat().st_size
        for estimate in run_kernel(make_kernel(PROFILE), estimates))
    # 2 layers x (K and V) x 512 tokens (the trained length) x 128 wide (2 of 4 heads of 256)
    assert (half, full) == (2 * 2 * 512 * 128 * 2, 2 * 2 * 512 * 128 * 4)
    assert shared == half  # three slots share one context's worth by default
    assert sized == 3 * half  # unless kv_cache_size says more
    assert plain == half  # one slot runs on a plain context, whatever kv_cache_size says


@pytest.mark.parametrize(("configured", "declared", "expected"), [
    ("", {}, llama_cpp.LLAMA_POOLING_TYPE_MEAN),
    ("", {"pooling_type": "cls"}, llama_cpp.LLAMA_POOLING_TYPE_CLS),
    ("", {"pooling_type": "none"}, llama_cpp.LLAMA_POOLING_TYPE_MEAN),
    ("last", {"pooling_type": "cls"}, llama_cpp.LLAMA_POOLING_TYPE_LAST),
])
def test_pooling_is_the_configured_else_the_declared_else_mean(configured: str,
                                                               declared: dict[str, Any],
                                                               expected: int) -> None:
    assert pooling({"pooling": configured}, declared) == expected


def test_the_configured_pooling_reaches_the_embeddings(load: Callable[..., Any],
                                                       tiny: Path) -> None:
    async def embed(model: GgufModel) -> list[float]:
        return (await model.embed(["hello world model"]))[0]

    mean, last = (load(tiny, embed, options={"pooling": kind}) for kind in ("mean", "last"))
    assert math.isclose(math.hypot(*last), 1.0, abs_tol=1e-5)
    assert mean != last


def test_a_closed_model_raises_instead_of_crashing(load: Callable[..., Any],
                                                   tiny: Path) -> None:
    async def scenario(model: GgufModel) -> bool:
        await model.close()
        with pytest.raises(ModelError, match=r"^tiny: the model was closed"):
            await complete(model, "hello", max_tokens=1)
        with pytest.raises(ModelError, match=r"^tiny: the model was closed"):
            await model.embed(["hello"])
        return True

    assert load(tiny, scenario)


async def test_a_second_cancellation_still_waits_for_the_decode_thread() -> None:
    release = threading.Event()
    worker = asyncio.ensure_future(asyncio.to_thread(release.wait))
    try:
        waiter = asyncio.create_task(_join(worker))
        for _ in range(2):
            await asyncio.sleep(0)  # let the waiter reach its await, then cancel it there
            waiter.cancel()
        await asyncio.sleep(0)
        assert not waiter.done()
    finally:
        release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert worker.done()


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(("make", "reason"), [
    (lambda tiny, path: truncate(tiny, path, 2000), "failed to read key-value pairs"),
    (lambda tiny, path: truncate(tiny, path, tiny.stat().st_size - 1000),
     "not within the file bounds"),
    (lambda tiny, path: write_wrong_magic(path), "invalid magic characters: 'GGUX'"),
    (lambda tiny, path: write_garbage(path, 4096), "invalid magic characters"),
    (lambda tiny, path: write_tiny_gguf(path, arch="mamba9"),
     "unknown model architecture: 'mamba9'"),
])
def test_a_bad_file_is_a_model_error_with_the_path_and_llama_cpps_reason(
        load: Callable[..., Any], tiny: Path, tmp_path: Path,
        make: Callable[[Path, Path], Path], reason: str) -> None:
    bad = make(tiny, tmp_path / "bad.gguf")
    with pytest.raises(ModelError, match=r"^bad: llama.cpp could not load ") as caught:
        load(bad, settings)
    assert str(bad) in str(caught.value)
    assert reason in str(caught.value)


def test_the_backend_loads_a_good_file_after_refusing_a_bad_one(make_kernel: Callable[..., Any],
                                                                run_kernel: Callable[..., Any],
                                                                tiny: Path,
                                                                tmp_path: Path) -> None:
    bad = write_wrong_magic(tmp_path / "bad.gguf")

    async def scenario(kernel: Kernel) -> str:
        backend = kernel.drivers("backends")["gguf"]
        with pytest.raises(ModelError):
            await backend.load(ModelSpec("bad", bad, "gguf"))
        model = await backend.load(ModelSpec("tiny", tiny, "gguf"))
        _, chunks = await complete(model, "hello", temperature=0, max_tokens=3)
        await model.close()
        return str(chunks[-1].finish_reason)

    assert run_kernel(make_kernel(PROFILE), scenario) == "length"


# --------------------------------------------------------------------------- chat templates


def test_the_files_own_chat_template_renders_the_prompt(load: Callable[..., Any],
                                                        tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "templated.gguf", chat_template=TINY_TEMPLATE)

    async def scenario(model: GgufModel) -> tuple[Any, list[int], list[int]]:
        request = GenerationRequest("t", messages=[{"role": "user", "content": "hi"}])
        expected = [model.llama.token_bos(),
                    *model.tokenize("[user]hi\n[assistant]", special=True, add_bos=False)]
        return model.info["chat_template"], model.prompt_tokens(request), expected

    source, tokens, expected = load(path, scenario)
    assert source == "model file"
    assert tokens == expected


@pytest.mark.parametrize(("template", "rendered"), [
    ("chatml", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    ("{{ messages[0].content | upper }}!", "HI!"),
])
def test_a_model_entry_may_override_the_chat_template(load: Callable[..., Any],
                                                      tmp_path: Path, template: str,
                                                      rendered: str) -> None:
    path = write_tiny_gguf(tmp_path / "templated.gguf", chat_template=TINY_TEMPLATE)

    async def scenario(model: GgufModel) -> tuple[list[int], list[int]]:
        request = GenerationRequest("t", messages=[{"role": "user", "content": "hi"}])
        expected = [model.llama.token_bos(),
                    *model.tokenize(rendered, special=True, add_bos=False)]
        return model.prompt_tokens(request), expected

    tokens, expected = load(path, scenario, options={"chat_template": template})
    assert tokens == expected


def test_an_unknown_architecture_without_a_template_fails_chat_and_still_completes(
        load: Callable[..., Any], tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "unusual.gguf", arch="baichuan")  # llama.cpp knows it

    async def scenario(model: GgufModel) -> str:
        with pytest.raises(ModelError, match=r"^unusual: .*'baichuan'.*set chat_template"):
            await complete(model, messages=[{"role": "user", "content": "hi"}])
        _, chunks = await complete(model, "hello", temperature=0, max_tokens=2)
        return str(chunks[-1].finish_reason)

    assert load(path, scenario) == "length"


def test_a_template_reaching_for_python_internals_fails_the_chat_not_the_model(
        load: Callable[..., Any], tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "hostile.gguf",
                           chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")

    async def scenario(model: GgufModel) -> str:
        with pytest.raises(ModelError, match=r"^hostile: chat template failed: .*not allowed"):
            await complete(model, messages=[{"role": "user", "content": "hi"}])
        _, chunks = await complete(model, "hello", temperature=0, max_tokens=2)
        return str(chunks[-1].finish_reason)

    assert load(path, scenario) == "length"


# --------------------------------------------------------------------------- Gemma: completion


@on_gemma
async def test_info_describes_the_loaded_model(gemma: GgufModel) -> None:
    info = gemma.info
    assert info["architecture"] == "gemma3"
    assert (info["context_size"], info["trained_context"]) == (2048, 32768)
    assert info["layers"] == 18
    assert info["threads"] == hardware.physical_cores()
    assert info["chat_template"] == "built-in 'gemma' (architecture gemma3)"
    assert 0 < info["load_seconds"] < 30


@on_gemma
async def test_greedy_completion_continues_the_prompt(gemma: GgufModel) -> None:
    text, chunks = await complete(gemma, FRANCE, temperature=0,
                                  max_tokens=FRANCE_GREEDY_TOKENS)
    assert text == FRANCE_GREEDY
    assert chunks[-1].finish_reason == "length"


@on_gemma
async def test_usage_counts_real_tokens_and_times_the_generation(gemma: GgufModel) -> None:
    _, chunks = await complete(gemma, FRANCE, temperature=0, max_tokens=10)
    usage = chunks[-1].usage or {}
    assert usage["completion_tokens"] == 10 == sum(chunk.tokens for chunk in chunks)
    assert usage["prompt_tokens"] == len(gemma.tokenize(FRANCE))
    assert usage["total_tokens"] == usage["prompt_tokens"] + 10
    assert usage["time_to_first_token"] > 0
    assert usage["decode_tokens_per_second"] > 0


@on_gemma
async def test_temperature_zero_is_deterministic_whatever_came_before(gemma: GgufModel) -> None:
    prompt = "Once upon a time"
    first = await greedy(gemma, prompt, 10)
    again = await greedy(gemma, prompt, 10)  # the whole prompt was the previous one
    await greedy(gemma, "Once upon a midnight dreary", 2)  # a shared prefix
    assert first == again == await greedy(gemma, prompt, 10)


@on_gemma
async def test_a_seed_makes_sampling_at_temperature_one_repeatable(gemma: GgufModel) -> None:
    async def sample(seed: int) -> str:
        text, _ = await complete(gemma, "Once upon a time", temperature=1.0, seed=seed,
                                 max_tokens=10)
        return text

    assert await sample(1) == await sample(1)
    assert len({await sample(seed) for seed in (1, 2, 3)}) > 1


@on_gemma
async def test_penalties_reach_the_sampler(gemma: GgufModel) -> None:
    plain = await greedy(gemma, FRANCE, 16)
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                    {"repeat_penalty": 1.5}):
        text, _ = await complete(gemma, FRANCE, temperature=0, max_tokens=16, **penalty)
        assert text != plain, penalty


@on_gemma
async def test_top_k_top_p_and_min_p_are_accepted(gemma: GgufModel) -> None:
    _, chunks = await complete(gemma, FRANCE, temperature=0.7, top_k=5, top_p=0.9, min_p=0.1,
                               seed=3, max_tokens=4)
    assert chunks[-1].finish_reason == "length"


@on_gemma
async def test_a_stop_string_ends_the_text_before_it(gemma: GgufModel) -> None:
    text, chunks = await complete(gemma, FRANCE, temperature=0, max_tokens=20, stop=["France."])
    assert text == " the capital of the country of "
    assert chunks[-1].finish_reason == "stop"


@on_gemma
async def test_a_stop_string_split_across_tokens_is_never_emitted(gemma: GgufModel) -> None:
    # " capital", " of", " the", " country" are four tokens; the stop string cuts two of them
    text, chunks = await complete(gemma, FRANCE, temperature=0, max_tokens=20,
                                  stop="ital of the coun")
    assert text == " the cap"
    assert chunks[-1].finish_reason == "stop"


@on_gemma
async def test_a_strong_positive_logit_bias_makes_a_token_appear(gemma: GgufModel) -> None:
    [banana] = gemma.tokenize(" banana", add_bos=False)
    text, _ = await complete(gemma, FRANCE, temperature=0, max_tokens=3,
                             logit_bias={banana: 30})
    assert "banana" in text


@on_gemma
async def test_a_logit_bias_of_minus_100_bans_the_greedy_choice(gemma: GgufModel) -> None:
    [the] = gemma.tokenize(" the", add_bos=False)
    _, chunks = await complete(gemma, FRANCE, temperature=0, max_tokens=1,
                               logit_bias={str(the): -100})
    assert chunks[0].text != " the"
    assert FRANCE_GREEDY.startswith(" the")


@on_gemma
async def test_characters_spread_over_byte_tokens_stream_out_whole(gemma: GgufModel) -> None:
    prompt = "🦩🦩🦩🦩🦩🦩"
    assert len(gemma.tokenize(prompt, add_bos=False)) == 24  # four byte tokens per flamingo
    _, chunks = await complete(gemma, prompt, temperature=0, max_tokens=12)
    pieces = [chunk for chunk in chunks if chunk.text]
    assert [chunk.text for chunk in pieces] == ["🦩"] * 3
    assert [chunk.tokens for chunk in pieces] == [4] * 3


@on_gemma
async def test_cjk_text_streams_without_replacement_characters(gemma: GgufModel) -> None:
    text, _ = await complete(gemma, "日本語: 東京は日本の首都です。大阪は", temperature=0,
                             max_tokens=6)
    assert text.startswith("大阪")
    assert "\ufffd" not in text


# --------------------------------------------------------------------------- Gemma: chat


@on_gemma
async def test_chat_renders_gemmas_turns_with_its_special_tokens(gemma: GgufModel) -> None:
    request = GenerationRequest("t", messages=[{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi there"}])
    tokens = gemma.prompt_tokens(request)
    assert gemma.llama.detokenize(tokens, special=True).decode() == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\n")
    [start_of_turn] = gemma.tokenize("<start_of_turn>", special=True, add_bos=False)
    assert tokens.count(start_of_turn) == 2
    assert tokens.count(gemma.llama.token_bos()) == 1


@on_gemma
async def test_chat_generates_and_counts_the_rendered_prompt(gemma: GgufModel) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    text, chunks = await complete(gemma, messages=messages, temperature=0, max_tokens=8)
    usage = chunks[-1].usage or {}
    assert text
    assert usage["prompt_tokens"] == len(gemma.prompt_tokens(
        GenerationRequest("t", messages=messages)))


# --------------------------------------------------------------------------- Gemma: JSON


@on_gemma
async def test_json_mode_output_parses(gemma: GgufModel) -> None:
    text, chunks = await complete(
        gemma, 'A city as JSON: {"city": "Paris", "country": "France"}\nA city as JSON:',
        temperature=0, max_tokens=30, response_format="json")
    assert isinstance(json.loads(text), dict)
    assert chunks[-1].finish_reason == "stop"


@on_gemma
async def test_json_schema_output_has_the_required_keys_and_types(gemma: GgufModel) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "age": {"type": "integer"}}}
    text, _ = await complete(
        gemma, 'A person as JSON: {"name": "Ann", "age": 31}\nAnother person as JSON:',
        temperature=0, max_tokens=30, response_format="json_schema", schema=schema)
    person = json.loads(text)
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str)
    assert isinstance(person["age"], int)


@pytest.mark.parametrize(("schema", "problem"), [
    ({"type": "bogus"}, "invalid JSON Schema: schema.type must be one of"),
    ({"type": "object", "required": "name"}, "invalid JSON Schema: schema.required must be"),
    ({"$ref": "#/$defs/missing"}, "JSON Schema not supported: "),
])
@on_gemma
async def test_an_invalid_json_schema_is_a_request_error(gemma: GgufModel,
                                                         schema: dict[str, Any],
                                                         problem: str) -> None:
    with pytest.raises(RequestError, match=r"^gemma: " + problem):
        await complete(gemma, "x", response_format="json_schema", schema=schema)
    assert await greedy(gemma, FRANCE, 3) == " the capital of"


# --------------------------------------------------------------------------- Gemma: tokens


@on_gemma
async def test_tokens_round_trip_and_count(gemma: GgufModel) -> None:
    text = "Inferno runs Gemma: 東京, naïve café, 🦩!"
    tokens = gemma.tokenize(text, add_bos=False)
    assert gemma.detokenize(tokens) == text
    assert gemma.count_tokens(text) == len(gemma.tokenize(text)) == len(tokens) + 1  # <bos>


# --------------------------------------------------------------------------- Gemma: limits


@on_gemma
async def test_prompt_plus_max_tokens_beyond_the_context_is_a_request_error(
        gemma: GgufModel) -> None:
    prompt_tokens = len(gemma.tokenize(FRANCE))
    with pytest.raises(RequestError, match=(
            rf"prompt of {prompt_tokens} tokens plus max_tokens 2045 is {prompt_tokens + 2045}"
            r", more than the context size of 2048 tokens")):
        await complete(gemma, FRANCE, max_tokens=2045)
    assert await greedy(gemma, FRANCE, 3) == " the capital of"


@on_gemma
async def test_a_prompt_longer_than_the_context_is_a_request_error(gemma: GgufModel) -> None:
    with pytest.raises(RequestError, match="more than the context size of 2048 tokens"):
        await complete(gemma, "hello " * 2100, max_tokens=1)


@pytest.mark.parametrize(("params", "named"), [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"creativity": 3}, "creativity"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logit_bias": {"999999999": 5}}, "logit_bias token 999999999"),
])
@on_gemma
async def test_invalid_sampling_values_are_request_errors_and_the_model_keeps_serving(
        gemma: GgufModel, params: dict[str, Any], named: str) -> None:
    with pytest.raises(RequestError, match=r"^gemma: ") as caught:
        await complete(gemma, FRANCE, **params)
    assert named in str(caught.value)
    assert await greedy(gemma, FRANCE, 3) == " the capital of"


@on_gemma
async def test_a_request_without_prompt_or_messages_is_a_request_error(gemma: GgufModel) -> None:
    with pytest.raises(RequestError, match="needs a prompt"):
        await complete(gemma)


# --------------------------------------------------------------------------- Gemma: cancel


@on_gemma
async def test_closing_the_stream_stops_generation_within_a_decode_step(
        gemma: GgufModel) -> None:
    first = gemma.decoded_tokens
    stream = gemma.generate(GenerationRequest("t", prompt=FRANCE,
                                              params={"temperature": 0, "max_tokens": 2000}))
    for _ in range(3):
        await anext(stream)
    at_close = gemma.decoded_tokens
    started = time.perf_counter()
    await stream.aclose()
    assert time.perf_counter() - started < 1.0
    assert not gemma.busy
    assert gemma.decoded_tokens - at_close <= 2
    assert gemma.decoded_tokens - first < 20
    assert await greedy(gemma, FRANCE, FRANCE_GREEDY_TOKENS) == FRANCE_GREEDY


@on_gemma
async def test_cancelling_the_consumer_stops_generation_within_a_decode_step(
        gemma: GgufModel) -> None:
    three_chunks = asyncio.Event()
    first = gemma.decoded_tokens

    async def consume() -> None:
        request = GenerationRequest("t", prompt=FRANCE,
                                    params={"temperature": 0, "max_tokens": 2000})
        async for count, _ in aenumerate(gemma.generate(request), start=1):
            if count == 3:
                three_chunks.set()

    task = asyncio.create_task(consume())
    await three_chunks.wait()
    at_cancel = gemma.decoded_tokens
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not gemma.busy
    assert gemma.decoded_tokens - at_cancel <= 2
    assert gemma.decoded_tokens - first < 20
    assert await greedy(gemma, FRANCE, FRANCE_GREEDY_TOKENS) == FRANCE_GREEDY


async def aenumerate(iterator: AsyncIterator[Any], start: int) -> AsyncIterator[Any]:
    count = start
    async for item in iterator:
        yield count, item
        count += 1


# --------------------------------------------------------------------------- Gemma: concurrency


@on_gemma
async def test_concurrent_requests_each_get_their_own_greedy_answer(gemma: GgufModel) -> None:
    # decoded in one batch, logits differ from a lone decode's in the last bits (see
    # test_batching): these prompts' greedy tokens win by wide margins, so they agree
    prompts = ["1, 2, 3, 4, 5, 6,", "A, B, C, D, E,", "10, 20, 30, 40,"]
    alone = [await greedy(gemma, prompt, 8) for prompt in prompts]
    together = await asyncio.gather(*(greedy(gemma, prompt, 8) for prompt in prompts))
    assert together == alone
    assert not gemma.busy


# --------------------------------------------------------------------------- Gemma: embeddings


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@on_gemma
async def test_embeddings_are_unit_length_and_identical_for_identical_inputs(
        gemma: GgufModel) -> None:
    first, second = await gemma.embed(["hello world", "hello world"])
    assert len(first) == gemma.info["embedding_length"]
    assert math.isclose(math.hypot(*first), 1.0, abs_tol=1e-5)
    # two sequences of one batch: the same text, the same vector but for float rounding
    assert max(abs(a - b) for a, b in zip(first, second, strict=True)) < 1e-6


@on_gemma
async def test_a_batch_embeds_as_its_inputs_one_by_one(gemma: GgufModel) -> None:
    texts = ["a cat sat on the mat", "The stock market fell sharply today", "hello world"]
    batch = await gemma.embed(texts)
    alone = [(await gemma.embed([text]))[0] for text in texts]
    # evaluated together, llama.cpp's kernels add in another order: the third decimal moves
    assert all(cosine(a, b) > 0.9995 for a, b in zip(batch, alone, strict=True))
    assert cosine(batch[0], alone[1]) < 0.99  # and each vector is its own text's


@on_gemma
async def test_similar_texts_embed_closer_than_unrelated_ones(gemma: GgufModel) -> None:
    cat, kitten, market = await gemma.embed(["a cat sat on the mat", "a kitten sat on the rug",
                                             "The stock market fell sharply today"])
    assert cosine(cat, kitten) > cosine(cat, market)


@on_gemma
async def test_an_embedding_input_longer_than_the_context_is_a_request_error(
        gemma: GgufModel) -> None:
    with pytest.raises(RequestError, match=r"^gemma: input 1 has \d+ tokens, more than the "
                                           r"context size of 2048"):
        await gemma.embed(["short", "hello " * 2100])
    assert len((await gemma.embed(["short"]))[0]) == gemma.info["embedding_length"]


@on_gemma
async def test_embedding_inputs_must_be_a_list_of_strings(gemma: GgufModel) -> None:
    with pytest.raises(RequestError, match="list of strings"):
        await gemma.embed("hello")  # type: ignore[arg-type]


def test_the_offload_count_survives_the_log_lines_after_it() -> None:
    from inferno.plugins.backends import llama_log

    count, offloaded = llama_log.offload_counter()
    with llama_log.capture(count) as log:
        log.callback(1, b"load_tensors: offloaded 17/17 layers to GPU\n", None)
        for index in range(1000):  # a CUDA load logs hundreds of lines after the count
            log.callback(1, f"llama_context: line {index}\n".encode(), None)
    assert offloaded() == (17, 17)
    assert len(log.lines) == 1001


def test_a_capture_keeps_this_threads_lines_and_restores_the_previous_callback() -> None:
    import ctypes

    from inferno.plugins.backends import llama_log

    def current() -> int | None:
        callback = llama_cpp.llama_log_callback()
        llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(ctypes.c_void_p()))
        return ctypes.cast(callback, ctypes.c_void_p).value

    before = current()
    with llama_log.capture() as log:
        assert current() != before
        log.callback(3, b"llama_model_load: error loading model: bad magic\n", None)
        other = threading.Thread(target=log.callback, args=(1, b"another load\n", None))
        other.start()
        other.join()
    assert current() == before
    assert log.lines == ["llama_model_load: error loading model: bad magic"]
    assert log.reason() == "llama_model_load: error loading model: bad magic"


def test_a_quantised_kv_cache_without_flash_attention_is_a_configuration_error(
        make_kernel: Callable[..., Kernel]) -> None:
    from inferno.kernel import ConfigError

    with pytest.raises(ConfigError, match=r"backends.gguf.kv_cache_type: a quantised KV cache "
                                          r"\(q8_0\) needs flash_attention = true or"):
        make_kernel({"backends": {"gguf": {"kv_cache_type": "q8_0", "flash_attention": False}}})
    with pytest.raises(ConfigError, match=r"backends.gguf.flash_attention"):
        make_kernel({"backends": {"gguf": {"flash_attention": "sometimes"}}})
    make_kernel({"backends": {"gguf": {"kv_cache_type": "q8_0", "flash_attention": True}}})
    make_kernel({"backends": {"gguf": {"kv_cache_type": "q8_0"}}})  # "auto", the default


def test_a_load_leaves_stdout_and_stderr_where_they_are(load: Callable[..., Any],
                                                        gemma_path: Path) -> None:
    """llama-cpp-python would point fds 1 and 2 at /dev/null for the length of a load, from
    the loading thread, losing what other requests write meanwhile (a stdin pipeline's
    answers)."""
    import os

    before = (os.fstat(1), os.fstat(2))
    moved: list[bool] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            now = (os.fstat(1), os.fstat(2))
            moved.append(not all(os.path.samestat(a, b) for a, b in zip(now, before,
                                                                        strict=True)))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    async def nothing(model: GgufModel) -> None:
        return None

    try:
        load(gemma_path, nothing)
    finally:
        done.set()
        watcher.join()
    assert len(moved) > 10  # it watched while the model loaded
    assert not any(moved)
