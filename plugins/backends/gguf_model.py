"""A loaded GGUF model: generation, chat, embeddings and tokens.

With ``parallel`` > 1 (the default) generations run in the model's batching engine
(``gguf_engine``): up to ``parallel`` of them are decoded together, one batch per step.
With ``parallel = 1`` requests take turns on a plain context (one lock per model), each
in a worker thread that hands text pieces to the event loop as they are decoded and
checks, before every decode step, whether the request was cancelled.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

from inferno.kernel import Chunk, GenerationRequest, LoadedModel, ModelSpec
from inferno.plugins.models.errors import ModelError, RequestError

from . import chat_templates
from .gguf_engine import DONE, BatchEngine, Job, end_tokens, grammar_parts
from .sampling import Sampling, parse_sampling
from .streaming import TextStream

if TYPE_CHECKING:
    from .gguf import GgufBackend

_DONE = object()
T = TypeVar("T")


@dataclass
class _Run:
    """One generation's shared state between the worker thread and the event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    finish_reason: str = "length"
    error: BaseException | None = None

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class GgufModel(LoadedModel):
    """One GGUF file loaded in llama.cpp."""

    #: Keys of a model entry's options that are not load options.
    ENTRY_OPTIONS = frozenset({"chat_template", "system_prompt", "parameters"})

    def __init__(self, backend: GgufBackend, spec: ModelSpec, options: Mapping[str, Any],
                 llama: llama_cpp.Llama, load_info: Mapping[str, Any], *,
                 thread: ThreadPoolExecutor | None = None) -> None:
        self.backend = backend
        #: The one thread every llama.cpp call of this model runs on (see GgufBackend.load).
        self.thread = thread or ThreadPoolExecutor(1, thread_name_prefix=f"llama-{spec.name}")
        self.spec = spec
        self.options = options
        self.llama = llama
        self.name = spec.name
        self._lock = asyncio.Lock()
        self._embed_lock = asyncio.Lock()
        self._embedder: llama_cpp.Llama | None = None
        self._decoded = 0
        self._closed = False
        meta = llama.metadata
        from .gguf import context_size  # gguf imports this module

        #: Tokens one request may hold (prompt and output); the KV cache may hold more.
        self.context_size = context_size(options, spec.metadata)
        self.concurrency = int(options["parallel"])  # the gateway queues the others
        self.engine: BatchEngine | None = None
        if int(options["parallel"]) > 1:
            self.engine = BatchEngine(
                self.name, llama, slots=int(options["parallel"]),
                kv_tokens=llama.n_ctx(), step_tokens=int(options["batch_size"]),
                prefix_reuse=bool(options["prompt_cache"]) and reusable_prefix(
                    llama, swa_full=bool(options["swa_full"])),
                thread=self.thread, on_error=self._engine_failed)
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") != "false"
        self.bos_text = self._piece(llama.token_bos())
        self.eos_text = self._piece(llama.token_eos())
        self._template: Any = None
        self._template_source = ""
        try:
            self._template_source, source = chat_templates.choose(
                self.name, meta, str(options.get("chat_template") or ""))
            self._template = chat_templates.compile_template(self.name, source)
        except ModelError as exc:
            self._template_error: ModelError | None = exc
        else:
            self._template_error = None
        self._info = {
            "name": self.name, "format": "gguf", "backend": backend.name,
            "path": str(spec.path), "architecture": meta.get("general.architecture"),
            "context_size": self.context_size, "trained_context": llama._model.n_ctx_train(),
            "embedding_length": llama.n_embd(), "vocab_size": llama.n_vocab(),
            "threads": llama.context_params.n_threads,
            "device": "gpu" if load_info.get("gpu_layers_offloaded") else "cpu",
            "chat_template": self._template_source or None,
            "memory_bytes": backend.estimate_memory(spec), **load_info,
            "parallel": int(options["parallel"]), "kv_cache_tokens": llama.n_ctx(),
        }

    @property
    def info(self) -> Mapping[str, Any]:
        return self._info

    @property
    def busy(self) -> bool:
        """Whether a generation holds (or waits for) the llama.cpp context now."""
        return self._lock.locked() or (self.engine is not None and self.engine.busy)

    @property
    def decoded_tokens(self) -> int:
        """Tokens decoded over the model's life: shows that a cancelled generation stopped."""
        return self._decoded + (self.engine.decoded_tokens if self.engine is not None else 0)

    def batching(self) -> dict[str, Any] | None:
        """The engine's slots, queue and step counters; ``None`` without batching."""
        engine = self.engine
        if engine is None:
            return None
        stats = engine.stats
        return {"slots": len(engine.slots), "slots_busy": engine.busy_slots,
                "waiting": engine.waiting, "steps": stats.steps,
                "batch_tokens": stats.batch_tokens, "prompt_tokens": stats.prompt_tokens,
                "cached_prompt_tokens": stats.cached_prompt_tokens,
                "largest_prompt_chunk": stats.largest_prompt_chunk,
                "finished": stats.finished,
                "sequences_per_step": stats.sequences_per_step.as_dict(),
                "tokens_per_step": stats.tokens_per_step.as_dict()}

    def _engine_failed(self, exc: BaseException) -> None:
        self.backend.log.error("batching engine stopped", model=self.name,
                               error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ tokens

    def _check_open(self) -> None:
        # llama.cpp's freed context would crash the process, not raise
        if self._closed:
            raise ModelError(self.name, "the model was closed (unloaded); load it again")

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = True) -> list[int]:
        self._check_open()
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos and self.add_bos,
                                        special=special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        self._check_open()
        return self.llama.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def _piece(self, token: int) -> str:
        return self.llama.detokenize([token], special=True).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ generation

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The request's prompt as tokens: chat messages through the chat template."""
        if request.messages is not None:
            if self._template_error is not None:
                raise self._template_error
            text = chat_templates.render(
                self.name, self._template, request.messages, bos_token=self.bos_text,
                eos_token=self.eos_text, system_prompt=str(self.options.get("system_prompt", "")))
            tokens = self.tokenize(text, special=True, add_bos=False)
            if self.add_bos and (not tokens or tokens[0] != self.llama.token_bos()):
                tokens.insert(0, self.llama.token_bos())
            return tokens
        if not isinstance(request.prompt, str):
            raise RequestError(self.name, "a request needs a prompt (a string) or messages")
        return self.tokenize(request.prompt)

    def check_request(self, request: GenerationRequest) -> tuple[list[int], Sampling, int]:
        """Validate before any work: the prompt, the sampling values and the context room."""
        sampling = parse_sampling(self.name, request.params,
                                  self.options.get("parameters") or {})
        tokens = self.prompt_tokens(request)
        if not tokens:
            raise RequestError(self.name, "the prompt is empty: it has no tokens to continue")
        vocab = self.llama.n_vocab()
        for token in sampling.logit_bias:
            if token >= vocab:
                raise RequestError(self.name, f"logit_bias token {token} is not in this model's "
                                              f"vocabulary of {vocab} tokens")
        context = self.context_size
        room = context - len(tokens)
        wanted = sampling.max_tokens if sampling.max_tokens is not None else room
        if len(tokens) + wanted > context or room < 1:
            raise RequestError(self.name, f"prompt of {len(tokens)} tokens plus max_tokens "
                                          f"{wanted} is {len(tokens) + wanted}, more than the "
                                          f"context size of {context} tokens")
        return tokens, sampling, wanted

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        tokens, sampling, max_tokens = self.check_request(request)
        grammar = self._grammar(sampling)
        if self.engine is not None:
            async with aclosing(self._generate_batched(request, tokens, sampling, max_tokens,
                                                       grammar)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        queued = time.perf_counter()
        async with self._lock:
            self._check_open()  # closed while this request waited for its turn
            started = time.perf_counter()
            run = _Run(asyncio.get_running_loop(), asyncio.Queue())
            worker = asyncio.ensure_future(run.loop.run_in_executor(
                self.thread, self._decode, run, tokens, sampling, max_tokens, grammar))
            try:
                while (item := await run.queue.get()) is not _DONE:
                    yield Chunk(text=item[0], tokens=item[1])
            finally:
                run.cancel.set()  # the consumer left early: stop at the next decode step
                await _join(worker)
        if run.error is not None:
            raise run.error
        yield Chunk(text="", finish_reason=run.finish_reason,
                    usage=self._usage(run, len(tokens), queued, started))

    async def _generate_batched(self, request: GenerationRequest, tokens: list[int],
                                sampling: Sampling, max_tokens: int,
                                grammar: LlamaGrammar | None) -> AsyncGenerator[Chunk, None]:
        assert self.engine is not None
        self._check_open()
        job = Job(tokens, sampling, max_tokens,
                  sampling.seed if sampling.seed is not None else self._seed(),
                  grammar_parts(grammar) if grammar is not None else None,
                  owner=request.owner, loop=asyncio.get_running_loop())
        self.engine.submit(job)
        done = False
        try:
            while (item := await job.queue.get()) is not DONE:
                yield Chunk(text=item[0], tokens=item[1])
            done = True
        finally:
            if not done:  # the consumer left early: free the slot, and wait until it is
                self.engine.cancel(job)
                await _until_done(job)
        if job.error is not None:
            raise job.error
        usage = self._usage(job, len(tokens), job.submitted_at,
                            job.started_at or job.finished_at)
        if job.cached_tokens:  # the speed of the tokens evaluated, not of those reused
            prompt_seconds = max(float(usage["time_to_first_token"]), 1e-9)
            usage["prompt_tokens_per_second"] = round(
                (len(tokens) - job.cached_tokens) / prompt_seconds, 2)
        yield Chunk(text="", finish_reason=job.finish_reason,
                    usage={**usage, "cached_tokens": job.cached_tokens})

    def _decode(self, run: _Run, tokens: list[int], sampling: Sampling, max_tokens: int,
                grammar: LlamaGrammar | None) -> None:
        llama = self.llama
        vocab = llama._model.vocab
        stream = TextStream(sampling.stop)
        llama.set_seed(sampling.seed if sampling.seed is not None else self._seed())
        bias = dict(sampling.logit_bias)
        if sampling.ignore_eos:  # banned, so the model cannot end before max_tokens
            bias.update((token, -100.0) for token in end_tokens(vocab))
        if not self.options["prompt_cache"]:
            llama.reset()  # forget the previous prompt: no prefix of it is reused
        held = 0  # tokens whose text is held back (a possible stop string, a partial character)
        try:
            for token in llama.generate(
                    tokens, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                    temp=sampling.temperature, repeat_penalty=sampling.repeat_penalty,
                    presence_penalty=sampling.presence_penalty,
                    frequency_penalty=sampling.frequency_penalty, grammar=grammar,
                    logits_processor=_bias(bias)):
                self._decoded += 1
                if not run.first_token_at:
                    run.first_token_at = time.perf_counter()
                if run.cancel.is_set():
                    run.finish_reason = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token) and not sampling.ignore_eos:
                    run.finish_reason = "stop"
                    break
                run.completion_tokens += 1
                held += 1
                text = stream.feed(llama.detokenize([token]))
                if text:
                    run.put((text, held))
                    held = 0
                if stream.stopped:
                    run.finish_reason = "stop"
                    break
                if run.completion_tokens >= max_tokens:
                    break
            rest = stream.flush()
            if rest or held:
                run.put((rest, held))
        except BaseException as exc:  # handed to the event loop and raised there
            run.error = exc if isinstance(exc, ModelError) else ModelError(
                self.name, f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            run.finished_at = time.perf_counter()
            run.put(_DONE)

    def _grammar(self, sampling: Sampling) -> LlamaGrammar | None:
        if sampling.response_format == "json":
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        if sampling.response_format == "json_schema":
            # The schema's structure is checked already; what is left is what the converter
            # does not support (a $ref it cannot resolve, an unusual pattern).
            try:
                return LlamaGrammar.from_string(json_schema_to_gbnf(json.dumps(sampling.schema)),
                                                verbose=False)
            except Exception as exc:
                raise RequestError(self.name, f"JSON Schema not supported: {exc}") from None
        return None

    def _seed(self) -> int:
        configured = int(self.options["seed"])
        return configured if configured >= 0 else int.from_bytes(np.random.bytes(4), "little")

    def _usage(self, run: _Run | Job, prompt_tokens: int, queued: float, started: float
               ) -> dict[str, Any]:
        first = run.first_token_at or run.finished_at
        decode_seconds = max(run.finished_at - first, 0.0)
        decoded = max(run.completion_tokens - 1, 0)
        return {
            "prompt_tokens": prompt_tokens, "completion_tokens": run.completion_tokens,
            "total_tokens": prompt_tokens + run.completion_tokens,
            "queue_seconds": round(started - queued, 6),
            "time_to_first_token": round(first - started, 6),
            "prompt_tokens_per_second": round(prompt_tokens / max(first - started, 1e-9), 2),
            "decode_seconds": round(decode_seconds, 6),
            "decode_tokens_per_second": round(decoded / decode_seconds, 2)
            if decode_seconds > 0 else None,
        }

    # ------------------------------------------------------------------ embeddings

    async def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        return (await self.embed_counted(inputs))[0]

    async def embed_counted(self, inputs: Sequence[str]
                            ) -> tuple[list[list[float]], list[int] | None]:
        if isinstance(inputs, str) or not all(isinstance(text, str) for text in inputs):
            raise RequestError(self.name, "embedding inputs must be a list of strings")
        if not inputs:
            return [], []
        async with self._embed_lock:
            self._check_open()
            if self._embedder is None:
                self._embedder = await self._on_thread(self.backend.open_embedder, self.spec,
                                                       self.options)
            embedder = self._embedder
            limit = embedder.n_ctx()
            counts = []
            for index, text in enumerate(inputs):
                count = len(embedder.tokenize(text.encode("utf-8")))
                if count > limit:
                    raise RequestError(self.name, f"input {index} has {count} tokens, more than "
                                                  f"the context size of {limit}")
                counts.append(count)
            return await self._on_thread(self._embed_batch, embedder, list(inputs)), counts

    async def _on_thread(self, function: Callable[..., T], *args: Any) -> T:
        if self.engine is not None:  # the engine's loop holds the thread: it runs calls too
            return await asyncio.wrap_future(self.engine.call(lambda: function(*args)))  # type: ignore[no-any-return]
        return await asyncio.get_running_loop().run_in_executor(self.thread, function, *args)

    @staticmethod
    def _embed_batch(embedder: llama_cpp.Llama, inputs: list[str]) -> list[list[float]]:
        # As many inputs per decode as the context holds, each its own sequence (the gateway
        # gathers concurrent requests into one call). Beside others a text's vector moves in
        # the third decimal (cosine to its lone vector above 0.9998), as llama.cpp's batched
        # kernels add in another order.
        vectors = embedder.embed(inputs, normalize=True, truncate=False)
        return [[float(value) for value in vector] for vector in vectors]

    async def close(self) -> None:
        async with self._lock, self._embed_lock:
            if self._closed:
                return
            self._closed = True
            if self.engine is not None:
                await _join(asyncio.wrap_future(self.engine.stop()))
            self.llama.close()
            if self._embedder is not None:
                self._embedder.close()
            self.thread.shutdown(wait=False)


def reusable_prefix(llama: llama_cpp.Llama, *, swa_full: bool) -> bool:
    """Whether a sequence's KV cache can be cut back to a prefix and continued: not for
    recurrent state, nor for sliding-window layers that keep only their last window."""
    model = llama.model
    if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
        return False
    return swa_full or not llama_cpp.llama_model_n_swa(model)


async def _until_done(job: Job) -> None:
    """Wait, through cancellations, until the engine let go of ``job``."""
    cancelled = False
    while True:
        try:
            if await asyncio.shield(job.queue.get()) is DONE:
                break
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def _join(worker: asyncio.Future[None]) -> None:
    """Wait for the worker thread even through a second cancellation: the lock must not be
    released while the thread still uses the llama.cpp context."""
    cancelled = False
    while not worker.done():
        try:
            await asyncio.shield(worker)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def _bias(bias: Mapping[int, float]) -> llama_cpp.LogitsProcessorList | None:
    if not bias:
        return None
    ids = np.fromiter(bias.keys(), dtype=np.int64)
    amounts = np.fromiter(bias.values(), dtype=np.float32)
    amounts[amounts <= -100] = -np.inf  # -100 bans the token, as in OpenAI's API

    def apply(_tokens: Any, scores: Any) -> Any:
        valid = ids < scores.shape[-1]  # the ids are checked; this keeps a C callback safe
        scores[ids[valid]] += amounts[valid]
        return scores

    return llama_cpp.LogitsProcessorList([apply])
