"""The ``stdin`` protocol: JSON Lines in on standard input, JSON Lines out on standard output.

For shell pipelines and programs that embed Inferno as a subprocess. Each input line is a
request that goes through the gateway like an HTTP one; each output line is one whole JSON
object naming the request it answers. Requests run concurrently up to ``max_concurrent``
and reading pauses at that limit, so memory stays bounded however long the input. At the
end of input the requests in flight finish and Inferno exits 0; a closed standard output
ends it quietly. Text mode reads prompts and writes answers, one line each, in input order.
See docs/protocols/stdin.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Mapping
from typing import Any

from dynaconf import Validator

from inferno.kernel import (
    ConfigError,
    ConfigProblem,
    ConfigSpec,
    Credentials,
    Protocol,
    hookimpl,
)
from inferno.kernel.config import thaw
from inferno.kernel.events import KernelStateChanged
from inferno.kernel.logs import request_context
from inferno.kernel.resources import parse_amount
from inferno.plugins.gateway.bodies import CHAT_FIELDS, COMPLETION_FIELDS, EMBEDDING_FIELDS, loads
from inferno.plugins.gateway.calls import Call, Final, StreamReply, new_id
from inferno.plugins.gateway.errors import ApiError, from_exception, invalid

from .stdio import TOO_LONG, Input, Output

DEFAULTS: dict[str, Any] = {
    # "json": each line a JSON request; "text": each line a prompt (see docs/protocols/stdin.md).
    "mode": "json",
    # The model for text mode, and for JSON requests that name none ("" for none).
    "model": "",
    # Text mode: "completion", "chat" (the line as a user message), "embeddings" or "auto"
    # (embeddings for an ONNX model, completion otherwise).
    "type": "auto",
    # Requests in flight at once; reading pauses at the limit. Keep it at most
    # plugins.gateway.queue_limit plus the model's concurrency, or the excess is refused
    # as a full queue.
    "max_concurrent": 8,
    # The longest input line accepted; a longer one gets an error line and is skipped.
    "max_line_size": "1MiB",
    # Body fields merged under every request that accepts them, e.g. { max_tokens = 64 }.
    "defaults": {},
    # The API key (or token) every line is sent with, for profiles whose auth providers
    # do not admit anonymous callers. Best given as INFERNO_PROTOCOLS__STDIN__KEY.
    "key": "",
}

_FIELDS = {"chat": CHAT_FIELDS, "completion": COMPLETION_FIELDS, "embeddings": EMBEDDING_FIELDS}
_INFERRED = (("messages", "chat"), ("prompt", "completion"), ("input", "embeddings"))
#: Seconds of kernel.stop_timeout kept, at most, for each of the last steps of a stop: the
#: cancelled requests' cleanup, then the last answers' writing.
CLEANUP_SECONDS = 1.0
#: At a stop, the last answers are given up once standard output took nothing for this long.
STALL_SECONDS = 2.0


class StdinProtocol(Protocol):
    """JSON Lines (or plain text lines) between standard input and standard output."""

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, validators=[
            Validator("mode", is_in=["json", "text"]),
            Validator("type", is_in=["auto", "completion", "chat", "embeddings"]),
            Validator("model", is_type_of=str),
            Validator("max_concurrent", gte=1, is_type_of=int),
            Validator("defaults", is_type_of=dict),
            Validator("key", is_type_of=str),
        ])

    @staticmethod
    @hookimpl
    def inferno_configure(config: Mapping[str, Any]) -> None:
        problems = []
        try:
            if parse_amount(config["max_line_size"]) <= 0:
                raise ValueError("not positive")
        except (ValueError, TypeError):
            problems.append(ConfigProblem("protocols.stdin.max_line_size", f"must be an amount "
                                          f"like '1MiB', got {config['max_line_size']!r}"))
        if config["mode"] == "text" and not (config["model"] or config["defaults"].get("model")):
            problems.append(ConfigProblem("protocols.stdin.model",
                                          "text mode needs a model: set protocols.stdin.model"))
        if problems:
            raise ConfigError(problems)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.text_mode = self.config["mode"] == "text"
        self.defaults: dict[str, Any] = thaw(self.config["defaults"])  # lists, not tuples
        if self.config["model"]:
            self.defaults["model"] = self.config["model"]
        self.slots = asyncio.Semaphore(int(self.config["max_concurrent"]))
        key = str(self.config["key"])
        self.credentials = Credentials(
            headers={"authorization": f"Bearer {key}"} if key else {}, peer="stdin")
        self.tasks: set[asyncio.Task[None]] = set()
        self.reason = "end of input"
        self.ready = asyncio.Event()
        self.text_type = "" if self.config["type"] == "auto" else self.config["type"]
        #: Text mode: answers finished out of turn, by line number, and the next to write.
        self.waiting: dict[int, bytes] = {}
        self.next_line = 1
        #: Set when a stop cancels the requests still running: each says so on its line.
        self.cut_off = False

    async def start(self) -> None:
        self.gateway = self.context.kernel.service("gateway")
        self.input = Input(0, parse_amount(self.config["max_line_size"]))
        await self.input.open()
        self.output = Output(self._output_closed)
        self.watch = self.context.kernel.bus.subscribe(KernelStateChanged, self._on_state,
                                                       replay=True)
        self.reader = asyncio.create_task(self._read(), name="stdin:read")
        self.main = asyncio.create_task(self._run(), name="stdin:run")
        self.log.debug("reading standard input", mode=self.config["mode"], source=self.input.kind)

    async def stop(self) -> None:
        """No more reading; the requests in flight finish and their answers are written, all
        within ``kernel.stop_timeout``: what still runs near its end is cancelled (and
        awaited, so that it lets go of its model before the models plugin stops)."""
        self.reader.cancel()
        self.output.release()
        loop = asyncio.get_running_loop()
        timeout = float(self.context.kernel.config["kernel"]["stop_timeout"])
        cleanup = min(CLEANUP_SECONDS, timeout / 4)
        end = loop.time() + timeout - cleanup / 2  # a margin inside the kernel's limit
        try:
            await asyncio.wait({self.main}, timeout=max(0.0, end - 2 * cleanup - loop.time()))
            running = [self.main, *self.tasks]
            if not all(task.done() for task in running):
                self.log.warning("requests still running at stop_timeout; cancelling them",
                                 inflight=len(self.tasks))
                self.cut_off = True
                for task in running:
                    task.cancel()
                await asyncio.wait(running, timeout=max(0.0, end - cleanup - loop.time()))
            written = await self.output.finish(max(0.0, end - loop.time()), STALL_SECONDS)
            if not written:
                self.log.warning("standard output is not being read; the last answers are "
                                 "lost", bytes=self.output.queued)
        finally:
            self.watch.cancel()
            self.input.close()
            self.output.close()

    # ------------------------------------------------------------------ the pipeline

    async def _run(self) -> None:
        """Read to the end of input (or until told to stop), let the requests in flight
        finish, then ask the kernel to shut down, which makes ``inferno`` exit 0."""
        await asyncio.wait({self.reader})
        if not self.reader.cancelled() and self.reader.exception() is not None:
            self.reason = "standard input failed"
            self.log.error("reading standard input failed", error=repr(self.reader.exception()))
        while self.tasks:
            await asyncio.wait(set(self.tasks))
        await self.output.flush()  # a slow reader gets every answer before Inferno exits
        await self.ready.wait()  # shutting down while the kernel still starts would fail it
        self.log.info("input done", reason=self.reason)
        self.context.kernel.shutdown(self.reason)

    async def _read(self) -> None:
        line = self._text_line if self.text_mode else self._json_line
        async for number, raw in self.input.lines():
            try:
                await line(number, raw)
            except Exception as exc:  # a bug costs its line, not the rest of the input
                self._line_failed(number, number, exc)
            await self.output.drain()  # reading waits while standard output is behind

    async def _json_line(self, number: int, raw: Any) -> None:
        if raw is not TOO_LONG and not raw.strip():
            return
        ident: Any = number
        try:
            value = self._parse(number, raw)
            ident = self._ident(number, value)
            operation = self._operation(number, value)
            body = self._merged(operation, value)
        except ApiError as exc:
            self._write_error(ident, number, exc)
            return
        except Exception as exc:
            self._line_failed(ident, number, exc)
            return
        await self.slots.acquire()
        self._spawn(self._serve(number, ident, operation, body))

    def _line_failed(self, ident: Any, number: int, exc: Exception) -> None:
        """A line that broke Inferno itself: logged with its traceback, answered with a 500
        (an empty line in text mode), and the input goes on."""
        self.log.exception("line failed: a bug in Inferno", line=number,
                           error=f"{type(exc).__name__}: {exc}")
        error = ApiError(500, f"line {number}: Inferno failed on this line "
                              f"({type(exc).__name__}); the log has the details, and the next "
                              f"lines are read as usual", code="internal_error")
        if not self.text_mode:
            self._write_error(ident, number, error)
        elif number >= self.next_line and number not in self.waiting:
            self._answer(number, "", error.message)  # keeps the lines aligned

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _on_state(self, event: KernelStateChanged) -> None:
        if event.state in ("running", "stopping", "stopped"):
            self.ready.set()
        if event.state in ("stopping", "stopped"):
            self.output.release()  # no more input to hold back: answers need not wait
            if not self.reader.done():
                self.reason = f"Inferno is {event.state}"
                self.reader.cancel()  # a signal: no new lines; those in flight finish

    def _output_closed(self, error: OSError) -> None:
        """Standard output went away (``| head -1``): nobody reads answers any more."""
        self.reason = "standard output closed"
        if isinstance(error, BrokenPipeError | ConnectionResetError):
            self.log.info("standard output closed; stopping", inflight=len(self.tasks))
        else:
            self.log.error("cannot write to standard output; stopping", error=str(error))
        self.reader.cancel()
        for task in list(self.tasks):
            task.cancel()

    def _decode(self, number: int, raw: Any) -> str:
        if raw is TOO_LONG:
            raise ApiError(413, f"line {number} is longer than {self.config['max_line_size']} "
                                f"(protocols.stdin.max_line_size); it was skipped",
                           code="line_too_long")
        try:
            return str(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"line {number} is not UTF-8: byte {exc.start + 1} is "
                                f"0x{raw[exc.start]:02x}", code="invalid_encoding") from None

    async def _serve(self, number: int, ident: Any, operation: str, body: dict[str, Any]
                     ) -> None:
        """One request, answered by JSON lines, or in text mode by one line (``ident`` None)."""
        call = Call(operation, body, protocol="stdin", id=new_id("stdin-"),
                    credentials=self.credentials)
        reply: Any = None
        try:
            with request_context(call.id, line=number):
                reply = await self.gateway.run(call)
                if ident is None:
                    self._answer(number, await _as_text(reply))
                elif not isinstance(reply, StreamReply):
                    self.output.write(_encode({**_embeddings(ident, reply), **call.meta}))
                elif body.get("stream") is True:
                    await self._stream(ident, reply, call.meta)
                else:
                    text, final = await reply.collect()
                    self.output.write(_encode({**_done(ident, reply.model, final, text),
                                               **call.meta}))
        except asyncio.CancelledError:
            if self.cut_off:
                self._failed(number, ident, ApiError(
                    503, "Inferno stopped before this request finished (kernel.stop_timeout "
                         "ran out); send it again", code="shutdown"))
            raise
        except Exception as exc:
            error = from_exception(exc)
            if error.status >= 500 and not isinstance(exc, ApiError):
                self.log.exception("request failed", line=number)
            self._failed(number, ident, error)
        finally:
            if isinstance(reply, StreamReply):
                await reply.aclose()
            if ident is not None:
                self.slots.release()

    async def _stream(self, ident: Any, reply: StreamReply, meta: dict[str, str]) -> None:
        async for event in reply:
            if isinstance(event, Final):
                self.output.write(_encode({**_done(ident, reply.model, event), **meta}))
            elif event.text:
                self.output.write(_encode({"id": ident, "type": "delta", "delta": event.text}))
                await self.output.drain()  # a long stream waits for a slow reader too

    def _failed(self, number: int, ident: Any, error: ApiError) -> None:
        """A request's error line (in text mode an empty line, the error on stderr)."""
        if ident is None:
            self._answer(number, "", error.message)
        else:
            self._write_error(ident, number, error)

    def _write_error(self, ident: Any, number: int, error: ApiError) -> None:
        details = {**error.envelope()["error"], "status": error.status}
        if error.retry_after is not None:
            details["retry_after"] = error.retry_after
        self.output.write(_encode({"id": ident, "type": "error", "line": number,
                                   "error": details}))

    # ------------------------------------------------------------------ JSON mode

    def _parse(self, number: int, raw: Any) -> dict[str, Any]:
        value = loads(self._decode(number, raw), f"line {number}", lines=False)
        if not isinstance(value, dict):
            raise invalid(f"line {number} must be a JSON object (a request), got "
                          f"{_kind(value)}", None, "invalid_json")
        return value

    @staticmethod
    def _ident(number: int, value: dict[str, Any]) -> Any:
        """The request's id (taken out of the body), or its line number when it has none."""
        ident = value.pop("id", None)
        if isinstance(ident, bool) or not isinstance(ident, str | int | float | None):
            raise invalid(f"line {number}: id must be a string or a number, got "
                          f"{_kind(ident)}", "id")
        if isinstance(ident, float) and not math.isfinite(ident):
            raise invalid(f"line {number}: id must be a finite number, got {ident} (JSON "
                          f"has no NaN or Infinity)", "id")
        return number if ident is None else ident

    @staticmethod
    def _operation(number: int, value: dict[str, Any]) -> str:
        """``type`` (taken out of the body), or what the body's fields say it is."""
        operation = value.pop("type", None)
        if operation is None:
            operation = next((op for key, op in _INFERRED if key in value), None)
        if operation is None:
            raise invalid(f"line {number}: cannot tell what is asked; give type ('chat', "
                          f"'completion' or 'embeddings'), or messages, prompt or input",
                          "type", "missing_type")
        if not isinstance(operation, str) or operation not in _FIELDS:
            shown = repr(operation) if isinstance(operation, str) else _kind(operation)
            raise invalid(f"line {number}: type must be 'chat', 'completion' or 'embeddings', "
                          f"got {shown}", "type")
        return str(operation)

    def _merged(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """``defaults`` under ``body``, less the fields this operation does not take."""
        if not self.defaults:
            return body
        fields = _FIELDS[operation]
        return {**{k: v for k, v in self.defaults.items() if k in fields}, **body}

    # ------------------------------------------------------------------ text mode

    async def _text_line(self, number: int, raw: Any) -> None:
        await self.slots.acquire()  # held until the line's answer is written
        try:
            prompt = self._decode(number, raw)
        except ApiError as exc:
            self._answer(number, "", exc.message)
            return
        if not prompt.strip():
            self._answer(number, "")  # an empty line keeps the lines aligned
            return
        operation = self.text_type or self._detect_type()
        key = {"chat": "messages", "embeddings": "input"}.get(operation, "prompt")
        value = [{"role": "user", "content": prompt}] if operation == "chat" else prompt
        self._spawn(self._serve(number, None, operation,
                                self._merged(operation, {key: value})))

    def _detect_type(self) -> str:
        """Embeddings for an ONNX model, a completion for any other."""
        self.text_type = "completion"
        with contextlib.suppress(Exception):  # an unknown model: each call will say so
            if self.context.kernel.service("models").describe(
                    self.defaults["model"]).format == "onnx":
                self.text_type = "embeddings"
        return self.text_type

    def _answer(self, number: int, line: str, problem: str | None = None) -> None:
        """Write answers in input order: one held back until the lines before it are out."""
        if problem is not None:
            self.log.warning("line failed; its output line is empty", line=number,
                             error=problem)
        self.waiting[number] = (line + "\n").encode("utf-8", "replace")
        while self.next_line in self.waiting:
            self.output.write(self.waiting.pop(self.next_line))
            self.next_line += 1
            self.slots.release()


def escape(text: str) -> str:
    """Text mode's one line per answer: backslash, newline and carriage return are written
    as ``\\\\``, ``\\n`` and ``\\r``."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


async def _as_text(reply: Any) -> str:
    if isinstance(reply, StreamReply):
        return escape((await reply.collect())[0])
    vectors = [item["embedding"] for item in reply.value["data"]]
    return json.dumps(vectors[0] if len(vectors) == 1 else vectors, separators=(",", ":"))


def _encode(value: Any) -> bytes:
    """One output line; a NaN or an infinity (which JSON cannot say) raises ValueError, so
    that the request gets an error line instead of a line no JSON parser reads."""
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str,
                       allow_nan=False) + "\n").encode("utf-8", "replace")


def _done(ident: Any, model: str, final: Final, text: str | None = None) -> dict[str, Any]:
    line: dict[str, Any] = {"id": ident, "type": "done", "model": model}
    if text is not None:
        line["text"] = text
    line["finish_reason"] = final.finish_reason
    line["usage"] = dict(final.usage)
    if final.tool_calls:
        line["tool_calls"] = [{"id": c.id, "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments}}
                              for c in final.tool_calls]
    return line


def _embeddings(ident: Any, reply: Any) -> dict[str, Any]:
    usage = {**reply.value.get("usage", {}), "queue_seconds": reply.value.get("queue_seconds")}
    return {"id": ident, "type": "done", "model": reply.model, "data": reply.value["data"],
            "usage": usage}


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)
