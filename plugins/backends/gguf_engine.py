"""Continuous batching: one llama.cpp context decodes every running request at once.

Decoding one stream reads all the weights once per token; decoding eight sequences in one
``llama_decode`` reads them once for all eight. The engine owns a context with ``slots``
sequences sharing one KV cache and runs on the model's thread. Each step builds one batch:
the next token of every generating slot, then chunks of waiting prompts up to the step's
prompt budget (so a long prompt delays the others by one step, not by its whole length).
After the decode each slot samples with its own request's sampler chain, and the text of
the step goes to the event loop in one call per loop.

A finished or cancelled request frees its slot at once. With prefix reuse on, a slot keeps
its tokens' KV after its request ends, and a later request of the same owner whose prompt
starts with those tokens (or with the evaluated part of a running request's) evaluates only
the rest. Requests of different owners never share KV.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from inferno.plugins.models.errors import ModelError, RequestError

from .sampling import Sampling
from .streaming import TextStream

#: Engines whose loop runs (see ``_stop_running``).
_RUNNING: set[BatchEngine] = set()


def _stop_running() -> None:
    """Stop the engines of models nobody closed, so that the process can end: at exit
    ``concurrent.futures`` joins every worker thread, and an engine's loop holds its model's
    thread until it is stopped. Registered after ``concurrent.futures``' own exit hook
    (imported above), it runs before it: these hooks run last registered first."""
    for engine in list(_RUNNING):
        engine.stop()


threading._register_atexit(_stop_running)  # type: ignore[attr-defined]

#: Handed to a job's queue after its last piece of text.
DONE = object()
#: Tokens of the most recent penalised window (llama-cpp-python's ``last_n_tokens_size``).
PENALTY_WINDOW = 64
#: Shortest shared prefix worth reusing: a few tokens (a BOS, a chat template's opening)
#: save nothing, and evaluating a prompt from a later position changes how it is cut.
MIN_REUSE = 8


@dataclass(eq=False)
class Job:
    """One generation request, shared between the event loop and the engine thread."""

    tokens: list[int]
    sampling: Sampling
    max_tokens: int
    seed: int
    grammar: tuple[str, str] | None  # (grammar text, root rule)
    owner: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = "length"
    error: BaseException | None = None


@dataclass(eq=False)
class _Slot:
    """One sequence of the context: the request it runs and the tokens whose KV it holds."""

    id: int
    job: Job | None = None
    #: Tokens decoded into this sequence's KV cache, in position order.
    tokens: list[int] = field(default_factory=list)
    owner: str = ""
    used_at: float = 0.0
    admitted: int = 0  # admission order: earlier prompts get the step's budget first
    prefilled: int = 0  # prompt tokens evaluated (reused ones included)
    chunk_base: int = 0  # where prompt chunks are counted from (after the reused prefix)
    pending: int | None = None  # the sampled token to decode next
    sampler: Any = None  # the request's native chain; None when ``greedy`` picks instead
    greedy: _Greedy | None = None
    stream: TextStream | None = None
    held: int = 0  # tokens whose text is held back (a possible stop string, a partial character)


@dataclass(frozen=True)
class _Greedy:
    """The highest logit after a request's logit biases: what llama.cpp's greedy sampler
    picks (the first of equal maxima) when no penalty or grammar changes the logits. Read
    off the logits row in place, it skips building the vocabulary-sized candidate array
    that a sampler chain fills for every token (262,144 entries for Gemma 3)."""

    tokens: Any  # numpy int array, the biased tokens
    biases: Any  # numpy float32 array, their biases

    @classmethod
    def of(cls, bias: dict[int, float]) -> _Greedy:
        return cls(np.fromiter(bias, dtype=np.int64, count=len(bias)),
                   np.fromiter(bias.values(), dtype=np.float32, count=len(bias)))

    def pick(self, logits: Any) -> int:
        if not len(self.tokens):
            return int(logits.argmax())
        saved = logits[self.tokens]
        logits[self.tokens] = saved + self.biases
        try:
            return int(logits.argmax())
        finally:
            logits[self.tokens] = saved


#: Upper bounds of the per-step histograms: sequences in a step, tokens in a step.
SEQUENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class Histogram:
    """Counts per bucket (the last one unbounded) and the sum, as Prometheus keeps them."""

    bounds: tuple[int, ...]
    counts: list[int] = field(default_factory=list)
    total: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: int) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def as_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total}


@dataclass
class EngineStats:
    """Counters read by metrics and status; written by the engine thread only."""

    steps: int = 0
    batch_tokens: int = 0  # tokens decoded over all steps
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    largest_prompt_chunk: int = 0
    finished: int = 0
    sequences_per_step: Histogram = field(default_factory=lambda: Histogram(SEQUENCE_BUCKETS))
    tokens_per_step: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))


class BatchEngine:
    """The batching loop of one GGUF model (see the module docstring)."""

    def __init__(self, name: str, llama: llama_cpp.Llama, *, slots: int, kv_tokens: int,
                 step_tokens: int, prefix_reuse: bool, thread: ThreadPoolExecutor,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.name = name
        self.llama = llama
        self.ctx = llama._ctx.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama._model.vocab
        self.n_vocab = llama.n_vocab()
        self.kv_tokens = kv_tokens
        self.step_tokens = step_tokens
        self.prefix_reuse = prefix_reuse
        self.slots = [_Slot(i) for i in range(slots)]
        self.stats = EngineStats()
        #: Tokens sampled over the model's life: shows that a cancelled generation stopped.
        self.decoded_tokens = 0
        self._capacity = step_tokens + slots
        self._batch = llama_cpp.llama_batch_init(self._capacity, 0, 1)
        self._eog = end_tokens(self.vocab)
        #: Each token's bytes, detokenised once: a step needs one per running request.
        self._pieces: dict[int, bytes] = {}
        self._cond = threading.Condition()
        self._incoming: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._waiting: list[Job] = []
        #: Every job submitted and not yet handed its DONE: what a crash must still answer.
        self._live: set[Job] = set()
        #: What this turn hands to the event loops (kept here so a crash delivers it too).
        self._out: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]] = {}
        self._stopping = False
        #: Why the loop ended, when it ended on an error: what later requests are told.
        self._failure: ModelError | None = None
        self._admissions = 0
        self._on_error = on_error
        _RUNNING.add(self)
        self._runner = thread.submit(self._run)

    # ------------------------------------------------------------------ event-loop side

    @property
    def busy_slots(self) -> int:
        return sum(slot.job is not None for slot in self.slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._incoming)

    @property
    def busy(self) -> bool:
        return bool(self.busy_slots or self.waiting)

    def submit(self, job: Job) -> None:
        need = len(job.tokens) + job.max_tokens
        if need > self.kv_tokens:
            raise RequestError(self.name, f"prompt of {len(job.tokens)} tokens plus max_tokens "
                                          f"{job.max_tokens} is {need} tokens, more than this "
                                          f"model's KV cache of {self.kv_tokens} tokens")
        with self._cond:
            if self._stopping:
                raise self._refusal()
            self._incoming.append(job)
            self._live.add(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        job.cancel.set()
        with self._cond:
            self._cond.notify()

    def call(self, function: Callable[[], Any]) -> Future[Any]:
        """Run ``function`` on the engine thread between two steps (llama.cpp calls of the
        same model, such as embeddings, share the thread and its compute threads)."""
        future: Future[Any] = Future()
        with self._cond:
            if self._stopping:
                raise self._refusal()
            self._calls.append((function, future))
            self._cond.notify()
        return future

    def _refusal(self) -> ModelError:
        if self._failure is not None:
            return ModelError(self.name, f"the model's batching engine stopped after an error "
                                         f"({self._failure.reason}); unload the model and load "
                                         f"it again")
        return ModelError(self.name, "the model was closed (unloaded); load it again")

    def stop(self) -> Future[None]:
        """Finish every request with an error and leave the loop; the future is the loop's."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        return self._runner

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as exc:
            error = ModelError(self.name, f"generation failed: {type(exc).__name__}: {exc}; "
                                          f"unload the model and load it again")
            with self._cond:  # nothing new is accepted: nobody would run it
                self._stopping, self._failure = True, error
            self._fail_all(error)
            if self._on_error is not None:
                self._on_error(exc)
        finally:
            llama_cpp.llama_batch_free(self._batch)
            _RUNNING.discard(self)

    def _turn(self) -> bool:
        with self._cond:
            while not (self._incoming or self._calls or self._stopping
                       or self._waiting or self.busy_slots):
                self._cond.wait()
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            calls = list(self._calls)
            self._calls.clear()
            stopping = self._stopping
        for function, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except BaseException as exc:
                    future.set_exception(exc)
        if stopping:
            self._fail_all(ModelError(self.name, "the model was closed (unloaded) during "
                                                 "this request"))
            return False
        out = self._out = {}
        self._drop_cancelled(out)
        self._admit(out)
        if self.busy_slots:
            self._step(out)
        self._deliver(out)
        return True

    def _drop_cancelled(self, out: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]]
                        ) -> None:
        for job in [job for job in self._waiting if job.cancel.is_set()]:
            self._waiting.remove(job)
            job.finish_reason = "cancelled"
            job.finished_at = time.perf_counter()
            out.setdefault(job.loop, []).append((job, DONE))
        for slot in self.slots:
            if slot.job is not None and slot.job.cancel.is_set():
                slot.job.finish_reason = "cancelled"
                self._finish(slot, out)

    # admission --------------------------------------------------------------

    def _used(self) -> int:
        """KV cells promised: a running request's whole reservation, an idle slot's cache."""
        return sum(len(s.job.tokens) + s.job.max_tokens if s.job is not None else len(s.tokens)
                   for s in self.slots)

    def _admit(self, out: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]]) -> None:
        """Start waiting requests, first come first served, while slots and KV room last."""
        while self._waiting:
            free = [slot for slot in self.slots if slot.job is None]
            if not free:
                return
            job = self._waiting[0]
            plan = self._plan(job, free)
            if plan is None:
                return  # the first in line waits for running requests to finish (FIFO)
            slot, source, reuse, evicted = plan
            self._waiting.pop(0)
            for cache in evicted:
                self._clear(cache)
            try:
                self._start(job, slot, source, reuse)
            except RequestError as exc:  # a grammar llama.cpp refused: this request only
                job.error = exc
                self._finish(slot, out)

    def _plan(self, job: Job, free: list[_Slot]
              ) -> tuple[_Slot, _Slot | None, int, list[_Slot]] | None:
        """Where ``job`` starts and which idle caches make room for it, or ``None`` while
        running requests hold too much of the KV cache. A request that fits only without
        its cached prefix gives the prefix up; one that fits in an empty cache always
        starts when nothing runs, so the queue cannot stall."""
        need = len(job.tokens) + job.max_tokens
        for slot, source, reuse in (self._place(job, free), (self._emptiest(free), None, 0)):
            kept = {slot, source} if reuse else {slot}
            used = self._used() - len(slot.tokens) + need
            evicted = []
            for cache in sorted((s for s in free if s.tokens and s not in kept),
                                key=lambda s: s.used_at):
                if used <= self.kv_tokens:
                    break
                used -= len(cache.tokens)
                evicted.append(cache)
            if used <= self.kv_tokens:
                return slot, source, reuse, evicted
        return None

    def _place(self, job: Job, free: list[_Slot]) -> tuple[_Slot, _Slot | None, int]:
        """The free slot for ``job``, the slot whose KV prefix it reuses and that prefix's
        length (at most all but the prompt's last token, whose logits are needed)."""
        best: tuple[int, _Slot | None] = (0, None)
        if self.prefix_reuse:
            limit = len(job.tokens) - 1
            for slot in self.slots:
                if slot.owner != job.owner or not slot.tokens:
                    continue
                shared = _common_prefix(slot.tokens, job.tokens, limit)
                if shared > best[0] or (shared == best[0] and shared and slot.job is None):
                    best = (shared, slot)
        reuse, source = best if best[0] >= MIN_REUSE else (0, None)
        empty = [slot for slot in free if not slot.tokens]
        if source is not None and source.job is None and (
                len(source.tokens) == reuse or not empty):
            return source, None, reuse  # continue where the cached conversation ended
        if source is not None and empty:
            return empty[0], source, reuse  # copy the prefix, keep the other's cache whole
        # the emptiest, least recently used free slot; a running slot's prefix is copied in
        return self._emptiest(free), source, reuse

    @staticmethod
    def _emptiest(free: list[_Slot]) -> _Slot:
        return min(free, key=lambda s: (bool(s.tokens), s.used_at))

    def _start(self, job: Job, slot: _Slot, source: _Slot | None, reuse: int) -> None:
        self._admissions += 1
        slot.job, slot.admitted = job, self._admissions
        # first: a refused grammar leaves the KV alone
        slot.sampler, slot.greedy = self._sampler(job)
        if source is None:
            llama_cpp.llama_memory_seq_rm(self.memory, slot.id, reuse, -1)
            del slot.tokens[reuse:]
        else:  # a running request's evaluated prefix: its cells are shared, not copied
            self._clear(slot)
            llama_cpp.llama_memory_seq_cp(self.memory, source.id, slot.id, 0, reuse)
            slot.tokens = source.tokens[:reuse]
        slot.owner = job.owner
        slot.prefilled = slot.chunk_base = reuse
        slot.pending, slot.held = None, 0
        slot.stream = TextStream(job.sampling.stop)
        job.cached_tokens = reuse
        job.started_at = time.perf_counter()
        self.stats.prompt_tokens += len(job.tokens)
        self.stats.cached_prompt_tokens += reuse

    def _clear(self, slot: _Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
        slot.tokens = []

    def _bias(self, job: Job) -> dict[int, float]:
        bias = {token: float("-inf") if amount <= -100 else float(amount)
                for token, amount in job.sampling.logit_bias.items()}
        if job.sampling.ignore_eos:
            bias.update((token, float("-inf")) for token in self._eog)
        return bias

    def _sampler(self, job: Job) -> tuple[Any, _Greedy | None]:
        """The request's own chain, in the order llama-cpp-python's ``Llama`` builds it, or
        for a greedy request whose logits nothing else changes, the argmax that replaces it."""
        s = job.sampling
        bias = self._bias(job)
        if (s.greedy and job.grammar is None and s.repeat_penalty == 1.0
                and s.frequency_penalty == 0.0 and s.presence_penalty == 0.0):
            return None, _Greedy.of(bias)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        if bias:
            entries = (llama_cpp.llama_logit_bias * len(bias))()
            for entry, (token, amount) in zip(entries, bias.items(), strict=True):
                entry.token, entry.bias = token, amount
            add(llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(bias), entries))
        add(llama_cpp.llama_sampler_init_penalties(self.n_vocab, PENALTY_WINDOW, s.repeat_penalty,
                                                   s.frequency_penalty, s.presence_penalty))
        if job.grammar is not None:
            grammar, root = job.grammar
            sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(),
                                                           root.encode())
            if not sampler:
                llama_cpp.llama_sampler_free(chain)
                raise RequestError(self.name, "llama.cpp could not parse the grammar made "
                                              "from this request's JSON Schema")
            add(sampler)
        if s.greedy:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(s.top_k))
            add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(s.temperature))
            add(llama_cpp.llama_sampler_init_dist(job.seed))
        return chain, None

    # one step -----------------------------------------------------------------

    def _step(self, out: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]]) -> None:
        batch = self._batch
        rows: list[tuple[_Slot, int]] = []  # slots that sample, and their logits row
        spans: list[tuple[_Slot, list[int]]] = []  # tokens each slot decodes this step
        n = 0

        def add(slot: _Slot, tokens: list[int], logits_last: bool) -> None:
            nonlocal n
            start = len(slot.tokens)
            for offset, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = start + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.id
                batch.logits[n] = False
                n += 1
            if logits_last:
                batch.logits[n - 1] = True
                rows.append((slot, n - 1))
            spans.append((slot, tokens))

        generating = [s for s in self.slots if s.job is not None and s.pending is not None]
        for slot in generating:
            add(slot, [slot.pending], True)  # type: ignore[list-item]
        budget = self.step_tokens
        prompt_tokens = 0
        prefilling = sorted((s for s in self.slots if s.job is not None and s.pending is None),
                            key=lambda s: s.admitted)
        for slot in prefilling:
            assert slot.job is not None
            tokens = slot.job.tokens
            # chunks end at fixed offsets from where the prompt's evaluation began, whatever
            # else runs: the same prompt is cut the same way alone or beside others
            chunk_end = slot.chunk_base + ((slot.prefilled - slot.chunk_base) // self.step_tokens
                                           + 1) * self.step_tokens
            end = min(len(tokens), chunk_end)
            if end - slot.prefilled > budget:
                break
            add(slot, tokens[slot.prefilled:end], end == len(tokens))
            budget -= end - slot.prefilled
            prompt_tokens = max(prompt_tokens, end - slot.prefilled)
            slot.prefilled = end
        batch.n_tokens = n
        code = llama_cpp.llama_decode(self.ctx, batch)
        if code != 0:
            self._decode_failed(code, spans, out)
            return
        stats = self.stats
        stats.steps += 1
        stats.batch_tokens += n
        stats.largest_prompt_chunk = max(stats.largest_prompt_chunk, prompt_tokens)
        stats.sequences_per_step.observe(len(spans))
        stats.tokens_per_step.observe(n)
        now = time.perf_counter()
        for slot, tokens in spans:
            slot.tokens.extend(tokens)
            slot.used_at = now
        for slot, row in rows:
            self.decoded_tokens += 1
            self._accept(slot, self._sample(slot, row), now, out)

    def _sample(self, slot: _Slot, row: int) -> int:
        if slot.greedy is not None:
            return slot.greedy.pick(np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,)))
        return int(llama_cpp.llama_sampler_sample(slot.sampler, self.ctx, row))

    def _accept(self, slot: _Slot, token: int, now: float,
                out: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]]) -> None:
        job, stream = slot.job, slot.stream
        assert job is not None
        assert stream is not None
        if not job.first_token_at:
            job.first_token_at = now
        if job.cancel.is_set():
            job.finish_reason = "cancelled"
            self._finish(slot, out)
            return
        if llama_cpp.llama_vocab_is_eog(self.vocab, token) and not job.sampling.ignore_eos:
            job.finish_reason = "stop"
            self._finish(slot, out)
            return
        job.completion_tokens += 1
        slot.held += 1
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.llama.detokenize([token])
        text = stream.feed(piece)
        if text:
            out.setdefault(job.loop, []).append((job, (text, slot.held)))
            slot.held = 0
        if stream.stopped:
            job.finish_reason = "stop"
        elif job.completion_tokens < job.max_tokens:
            slot.pending = token
            return
        self._finish(slot, out)

    def _finish(self, slot: _Slot, out: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]]
                ) -> None:
        job, stream = slot.job, slot.stream
        assert job is not None
        rest = stream.flush() if stream is not None else ""
        pieces = out.setdefault(job.loop, [])
        if rest or slot.held:
            pieces.append((job, (rest, slot.held)))
        job.finished_at = time.perf_counter()
        pieces.append((job, DONE))
        if slot.sampler is not None:
            llama_cpp.llama_sampler_free(slot.sampler)
        slot.job, slot.sampler, slot.greedy, slot.stream = None, None, None, None
        slot.pending, slot.held = None, 0
        slot.used_at = job.finished_at
        self.stats.finished += 1
        if not self.prefix_reuse:
            self._clear(slot)  # nothing will read this KV again: give the cells back now

    def _decode_failed(self, code: int, spans: list[tuple[_Slot, list[int]]],
                       out: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]]) -> None:
        reason = {1: "no room left in the KV cache", 2: "the decode was aborted"}.get(
            code, "llama.cpp refused the batch")
        for slot, _ in spans:
            if slot.job is None:
                continue
            slot.job.error = ModelError(self.name, f"generation failed: {reason} "
                                                   f"(llama_decode returned {code})")
            self._finish(slot, out)
            self._clear(slot)

    def _fail_all(self, error: BaseException) -> None:
        """Answer every job still open with ``error`` (what this turn finished keeps its
        answer) and every call waiting to run."""
        out, self._out = self._out, {}
        with self._cond:
            self._incoming.clear()
            calls = list(self._calls)
            self._calls.clear()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        self._waiting.clear()
        for slot in self.slots:
            if slot.job is not None:
                slot.job.error = error
                self._finish(slot, out)
        answered = {job for items in out.values() for job, item in items if item is DONE}
        for job in self._live - answered:
            job.error = error
            job.finished_at = time.perf_counter()
            out.setdefault(job.loop, []).append((job, DONE))
        self._deliver(out)

    def _deliver(self, out: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]]) -> None:
        """One hand-over per event loop per step, however many streams it carries."""
        for loop, items in out.items():
            self._live.difference_update(job for job, item in items if item is DONE)
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # a closed loop: nobody is left to read, so stop its jobs
                for job, _ in items:
                    job.cancel.set()


def _put_all(items: list[tuple[Job, Any]]) -> None:
    for job, item in items:
        job.queue.put_nowait(item)


def _common_prefix(cached: list[int], tokens: list[int], limit: int) -> int:
    size = min(len(cached), limit)
    for index in range(size):
        if cached[index] != tokens[index]:
            return index
    return size


def end_tokens(vocab: Any) -> frozenset[int]:
    """The model's end-of-generation tokens that ``ignore_eos`` bans (EOS and EOT: Gemma's
    ``<end_of_turn>``); any other end token still ends a request."""
    ends = (llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab))
    return frozenset(token for token in ends
                     if token >= 0 and llama_cpp.llama_vocab_is_eog(vocab, token))


def grammar_parts(grammar: Any) -> tuple[str, str]:
    """A ``LlamaGrammar``'s text and root rule, for a native grammar sampler."""
    return str(grammar._grammar), str(grammar._root)
