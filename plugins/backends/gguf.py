"""The ``gguf`` backend: GGUF models through llama-cpp-python.

Enabled with ``[backends.gguf]``; its keys are the load options every GGUF
model gets, and a model entry's ``options`` override them for that model.
Loading happens in a worker thread, one at a time, with llama.cpp's own log
captured so a refused file is reported with llama.cpp's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

try:
    # A CUDA build of llama.cpp, once loaded, makes the later first import of ml_dtypes
    # (which onnx imports) crash the process; importing it first avoids that.
    with contextlib.suppress(ImportError):
        import ml_dtypes  # noqa: F401
    import llama_cpp
except ImportError as exc:  # the profile names this backend, so say how to get it
    raise ImportError(f"the gguf backend needs llama-cpp-python ({exc.msg}): "
                      f"pip install 'inferno[gguf]'") from exc

from dynaconf import Validator

from inferno.kernel import Backend, ConfigSpec, ModelSpec, hookimpl
from inferno.plugins.models.errors import ModelError
from inferno.plugins.models.formats import describe

from . import hardware, llama_log
from .gguf_model import GgufModel


class _KeepStreams(contextlib.nullcontext[None]):
    """Stands in for llama-cpp-python's ``suppress_stdout_stderr``, which points file
    descriptors 1 and 2 at /dev/null for a whole load, process-wide, from the loading thread:
    every other request's output written meanwhile (a stdin pipeline's answers, log lines)
    would be lost, and two loads at once can leave them pointing there for good. llama.cpp's
    own messages reach Inferno through its log callback (``llama_log``) instead."""

    def __init__(self, disable: bool = True) -> None:
        super().__init__()


for _module in (llama_cpp.llama, llama_cpp._internals, llama_cpp.llama_chat_format):
    _module.suppress_stdout_stderr = _KeepStreams  # type: ignore[attr-defined,misc]

KV_TYPES = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16,
            "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
KV_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
POOLING = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
           "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}

DEFAULTS: dict[str, Any] = {
    # Tokens of context per model; 0 means the model's trained length. Capped at that length.
    "context_size": 4096,
    # Decode threads; 0 means one per physical core.
    "threads": 0,
    # Prompt-processing threads; 0 means the same as threads.
    "threads_batch": 0,
    # Prompt tokens evaluated per decode. With parallel > 1, a step's prompt budget: a long
    # prompt is evaluated in chunks of this size while the other requests keep generating.
    "batch_size": 512,
    "ubatch_size": 512,
    # "auto" (every layer when this llama.cpp build can offload, else none), "all", or a number.
    "gpu_layers": "auto",
    "main_gpu": 0,
    # Share of the model per GPU, for example [0.5, 0.5]; empty means llama.cpp decides.
    "tensor_split": [],
    # "auto" (llama.cpp turns it on where the device supports it: always on CPUs), true, false.
    "flash_attention": "auto",
    "mmap": True,
    "mlock": False,
    # KV cache element type: f32, f16, q8_0 or q4_0.
    "kv_cache_type": "f16",
    # Full-size sliding-window cache: needed to reuse a prompt prefix on SWA models (Gemma 3).
    "swa_full": False,
    # Reuse the KV cache of the prefix a request shares with the one before: faster multi-turn
    # chat, but llama.cpp's logits for a prompt evaluated in pieces differ slightly from one
    # evaluated whole, so greedy output could change with the requests that came before. Off,
    # every prompt is evaluated from scratch and the same request gives the same answer.
    "prompt_cache": False,
    # Requests decoded together in one batch (continuous batching): sequence slots of one
    # llama.cpp context. 1 keeps one request at a time on a plain context.
    "parallel": 4,
    # Tokens of KV cache the slots share; 0 means context_size (as llama.cpp's server does). A
    # request starts when its prompt plus max_tokens fits beside the running requests'.
    "kv_cache_size": 0,
    # Seed of requests that give none; -1 means a fresh random seed per request.
    "seed": -1,
    # Embedding pooling: "" means what the model declares, else mean; or mean, cls, last.
    "pooling": "",
}


#: Smallest value of each integer option.
MINIMUM = {"context_size": 0, "threads": 0, "threads_batch": 0, "batch_size": 1,
           "ubatch_size": 1, "main_gpu": 0, "seed": -1, "parallel": 1, "kv_cache_size": 0}
#: llama.cpp's own limit on sequences in one context.
MAX_PARALLEL = int(llama_cpp.llama_max_parallel_sequences())
CHOICES = {"kv_cache_type": frozenset(KV_TYPES), "pooling": frozenset({"", *POOLING}),
           "flash_attention": frozenset({"auto", True, False})}
#: llama.cpp's setting for each ``flash_attention`` value.
FLASH_ATTENTION = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                   True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                   False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}


def _is_choice(choices: frozenset[Any], value: Any) -> bool:
    """By type too: 1 is not true, and a list is no choice at all."""
    return any(type(value) is type(choice) and value == choice for choice in choices)


def _choice_of(choices: frozenset[Any]) -> Callable[[Any], bool]:
    def is_choice(value: Any) -> bool:  # dynaconf names a failed condition by its function
        return _is_choice(choices, value)
    return is_choice


def _gpu_layers(value: Any) -> bool:
    return value in ("auto", "all") or (isinstance(value, int) and not isinstance(value, bool)
                                        and value >= 0)


VALIDATORS = [
    *(Validator(key, gte=low) for key, low in MINIMUM.items()),
    Validator("parallel", lte=MAX_PARALLEL),
    Validator("gpu_layers", condition=_gpu_layers,
              messages={"condition": "gpu_layers must be 'auto', 'all' or a number of layers "
                                     "≥ 0, got {value!r}"}),
    *(Validator(key, condition=_choice_of(choices),
                messages={"condition": f"{key} must be one of "
                                       f"{', '.join(sorted(map(json.dumps, choices)))}, "
                                       f"got {{value!r}}"})
      for key, choices in CHOICES.items()),
    # llama.cpp quantises the V cache only inside its flash-attention kernels.
    Validator("kv_cache_type", is_in=["f16", "f32"], when=Validator("flash_attention", eq=False),
              messages={"operations": "a quantised KV cache ({value}) needs flash_attention = "
                                      "true or \"auto\""}),
]


def option_problem(key: str, value: Any) -> str | None:
    """What is wrong with a model entry's load option, checked as the config's validators do."""
    default = DEFAULTS[key]
    if key == "gpu_layers":
        ok = _gpu_layers(value)
    elif key in CHOICES:
        ok = _is_choice(CHOICES[key], value)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= MINIMUM[key]
        ok = ok and (key != "parallel" or value <= MAX_PARALLEL)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in value)
    else:
        ok = True
    return None if ok else f"option {key} = {value!r} is invalid (default {default!r})"


class GgufBackend(Backend):
    """Loads GGUF files with llama-cpp-python."""

    formats = frozenset({"gguf"})

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, validators=VALIDATORS)

    async def start(self) -> None:
        self.log.debug("llama.cpp ready", gpu_offload=llama_cpp.llama_supports_gpu_offload(),
                       physical_cores=hardware.physical_cores())

    def options(self, spec: ModelSpec) -> dict[str, Any]:
        """The driver's defaults with the model entry's overrides, checked."""
        known = set(DEFAULTS) | GgufModel.ENTRY_OPTIONS
        unknown = sorted(set(spec.options) - known)
        if unknown:
            raise ModelError(spec.name, f"unknown gguf option {unknown[0]!r} "
                                        f"(known: {', '.join(sorted(known))})")
        for key in sorted(set(spec.options) & set(DEFAULTS)):
            if problem := option_problem(key, spec.options[key]):
                raise ModelError(spec.name, problem)
        options = {**self.config, **spec.options}
        if KV_BYTES[options["kv_cache_type"]] < 2 and options["flash_attention"] is False:
            raise ModelError(spec.name, f"kv_cache_type {options['kv_cache_type']!r} needs "
                                        f"flash_attention = true or \"auto\": llama.cpp "
                                        f"quantises the KV cache only with flash attention")
        kv_size = int(options["kv_cache_size"])
        if kv_size and kv_size < (context := context_size(options, file_metadata(spec))):
            raise ModelError(spec.name, f"kv_cache_size {kv_size} is smaller than the context "
                                        f"size of {context} tokens: one request could not fit; "
                                        f"use 0 or at least {context}")
        return options

    def estimate_memory(self, spec: ModelSpec) -> int:
        """Weights (the file) plus the KV cache for the configured context."""
        options = self.options(spec)
        meta = file_metadata(spec)
        layers = int(meta.get("block_count") or 0)
        heads = int(meta.get("head_count") or 1)
        kv_heads = int(meta.get("head_count_kv") or heads)
        head_width = int(meta.get("embedding_length") or 0) // max(heads, 1)
        key_width = int(meta.get("key_length") or head_width)  # Gemma 3: 256, not 640 / 4
        value_width = int(meta.get("value_length") or key_width)
        context = kv_tokens(options, meta)
        per_token = layers * kv_heads * (key_width + value_width)
        kv_bytes = context * per_token * KV_BYTES[options["kv_cache_type"]]
        return spec.path.stat().st_size + int(kv_bytes)

    async def load(self, spec: ModelSpec) -> GgufModel:
        options = self.options(spec)
        started = time.perf_counter()
        spec = dataclasses.replace(spec, metadata=await asyncio.to_thread(file_metadata, spec))
        # Every llama.cpp call for this model runs on this one thread: llama.cpp's OpenMP
        # keeps a team of compute threads per calling thread, and two teams on the same
        # cores (one from the loading thread, one from a generating thread) slow decoding.
        thread = ThreadPoolExecutor(1, thread_name_prefix=f"llama-{spec.name}")
        try:
            llama, offloaded = await asyncio.get_running_loop().run_in_executor(
                thread, functools.partial(self._open, spec, options, embedding=False))
        except BaseException:
            thread.shutdown(wait=False)
            raise
        info = {
            "load_seconds": round(time.perf_counter() - started, 3),
            "gpu_layers_offloaded": offloaded[0] if offloaded else 0,
            "layers": llama_cpp.llama_model_n_layer(llama.model),
        }
        self.log.debug("loaded", model=spec.name, **info)
        return GgufModel(self, spec, options, llama, info, thread=thread)

    def open_embedder(self, spec: ModelSpec, options: Mapping[str, Any]) -> llama_cpp.Llama:
        """A second context on the same (memory-mapped) weights, computing embeddings."""
        llama, _ = self._open(spec, options, embedding=True)
        return llama

    def _open(self, spec: ModelSpec, options: Mapping[str, Any], *, embedding: bool
              ) -> tuple[llama_cpp.Llama, tuple[int, int] | None]:
        context = context_size(options, spec.metadata)
        kwargs: dict[str, Any] = {
            "model_path": str(spec.path), "n_ctx": context, "verbose": False,
            "n_threads": hardware.threads(int(options["threads"])),
            "n_threads_batch": hardware.threads(int(options["threads_batch"]
                                                    or options["threads"])),
            "n_batch": int(options["batch_size"]), "n_ubatch": int(options["ubatch_size"]),
            "n_gpu_layers": gpu_layers(options["gpu_layers"]),
            "main_gpu": int(options["main_gpu"]),
            "tensor_split": list(options["tensor_split"]) or None,
            # "auto" is set on the context made again below; on until then, so that the
            # first context takes a quantised KV cache
            "flash_attn": options["flash_attention"] is not False,
            "use_mmap": bool(options["mmap"]), "use_mlock": bool(options["mlock"]),
            "type_k": KV_TYPES[options["kv_cache_type"]],
            "type_v": KV_TYPES[options["kv_cache_type"]],
            "swa_full": bool(options["swa_full"]),
        }
        if int(options["seed"]) >= 0:
            kwargs["seed"] = int(options["seed"])
        if embedding:
            kwargs.update(embedding=True, n_batch=context, n_ubatch=context,
                          pooling_type=pooling(options, spec.metadata))
        slots = 1 if embedding else int(options["parallel"])
        count_offload, offloaded = llama_log.offload_counter()
        with llama_log.capture(count_offload) as log:
            try:
                llama = llama_cpp.Llama(**kwargs)
                if slots > 1:
                    _remake_context(llama, FLASH_ATTENTION[options["flash_attention"]],
                                    slots=slots, kv_size=kv_tokens(options, spec.metadata),
                                    batch=int(options["batch_size"]) + slots,
                                    ubatch=int(options["ubatch_size"]))
                elif options["flash_attention"] == "auto":
                    _remake_context(llama, llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO)
            except (ValueError, RuntimeError, OSError) as exc:
                raise ModelError(spec.name, f"llama.cpp could not load {spec.path}: "
                                            f"{log.reason()} ({exc})") from None
        return llama, offloaded()


def _remake_context(llama: llama_cpp.Llama, flash_attention: int, *, slots: int = 1,
                    kv_size: int = 0, batch: int = 0, ubatch: int = 0) -> None:
    """Replace the context ``Llama`` made with one it has no options for: flash attention
    left to llama.cpp ("auto"), and with ``slots`` > 1, that many sequences sharing one KV
    cache of ``kv_size`` tokens. A step's batch (its prompt budget and one token per slot)
    is decoded whole."""
    params = llama.context_params
    params.flash_attn_type = flash_attention
    if slots > 1:
        params.n_ctx, params.n_seq_max, params.kv_unified = kv_size, slots, True
        params.n_batch, params.n_ubatch = batch, min(ubatch, batch)
    llama._ctx.close()
    try:
        llama._ctx = llama_cpp._internals.LlamaContext(model=llama._model, params=params,
                                                       verbose=False)
    except BaseException:
        llama.close()
        raise


def file_metadata(spec: ModelSpec) -> Mapping[str, Any]:
    """What the model manager read from the file's header, read here if it gave none.

    The context length is what caps the context size. A file the header reader refuses is
    left to llama.cpp, whose own reason the load error then carries.
    """
    if "context_length" in spec.metadata:
        return spec.metadata
    try:
        return {**describe(spec.path).metadata, **spec.metadata}
    except ModelError:
        return spec.metadata


def context_size(options: Mapping[str, Any], metadata: Mapping[str, Any]) -> int:
    trained = int(metadata.get("context_length") or 0)
    wanted = int(options["context_size"]) or trained or 4096
    return min(wanted, trained) if trained else wanted


def kv_tokens(options: Mapping[str, Any], metadata: Mapping[str, Any]) -> int:
    """Tokens of KV cache the slots share: kv_cache_size, or else one context's worth (and
    always that with one slot, which runs on a plain context)."""
    if int(options["parallel"]) == 1:
        return context_size(options, metadata)
    return int(options["kv_cache_size"]) or context_size(options, metadata)


def gpu_layers(value: Any) -> int:
    if value == "all":
        return -1
    if value == "auto":
        return -1 if llama_cpp.llama_supports_gpu_offload() else 0
    return int(value)


def pooling(options: Mapping[str, Any], metadata: Mapping[str, Any]) -> int:
    if options["pooling"]:
        return POOLING[options["pooling"]]
    declared = metadata.get("pooling_type")  # the model manager reads it as a name
    if declared in POOLING:
        return POOLING[declared]
    return llama_cpp.LLAMA_POOLING_TYPE_MEAN
