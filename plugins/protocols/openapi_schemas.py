"""The JSON Schemas of ``/openapi.json``: request and response bodies of every route.

Request schemas follow what the gateway accepts (plugins/gateway/bodies.py): unknown
fields are refused there, so the bodies here are closed (``additionalProperties:
false``) and list every field the gateway takes. Response schemas name the fields a
client may rely on and stay open for the ones Inferno adds beside them.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: Schema, required: tuple[str, ...] = (), *, closed: bool = False,
        description: str = "") -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
BOOLEAN = {"type": "boolean"}
ANY_OBJECT = {"type": "object"}
MODEL_NAME = {"type": "string", "minLength": 1, "examples": ["gemma-3-270m"],
              "description": "A model's name or alias (see GET /v1/models)"}
KEEP_ALIVE = {"description": "How long the model stays loaded after this request: seconds, "
                             "or a duration such as '5m'; -1 keeps it, 0 unloads it",
              "anyOf": [NUMBER, {"type": "string", "pattern": r"^\s*-?\d+(\.\d+)?(ms|s|m|h)?\s*$"}],
              "examples": ["5m", 300, -1]}
NULLABLE_STRING = nullable(STRING)
STOP = {"anyOf": [{"type": "string", "minLength": 1},
                  {"type": "array", "items": {"type": "string", "minLength": 1}}],
        "description": "Text that ends the generation (not included)"}
#: The sampling values and the ranges the backends accept (plugins/backends/sampling.py).
SAMPLING_RANGES: Schema = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 100},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0, "description": "Inferno extension"},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1, "description": "Inferno extension"},
    "repeat_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 10,
                       "description": "Inferno extension"},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": {"type": "integer", "minimum": 0}, "stop": STOP,
}

# --------------------------------------------------------------------------- errors

ERRORS: dict[str, Schema] = {
    "Error": obj({"error": obj({
        "message": {"type": "string", "description": "What was wrong, where, and what to do"},
        "type": {"type": "string", "examples": ["invalid_request_error", "not_found_error",
                                                "server_error"]},
        "param": {**NULLABLE_STRING, "description": "The request field at fault"},
        "code": {**NULLABLE_STRING, "description": "A stable machine-readable word",
                 "examples": ["model_not_found", "queue_full", "body_too_large"]},
    }, ("message", "type", "param", "code"))}, ("error",),
        description="The OpenAI error envelope, used by every route"),
}

# --------------------------------------------------------------------------- OpenAI requests

_SAMPLING: Schema = {
    "max_tokens": {"type": "integer", "minimum": 1,
                   "description": "Most tokens to generate"},
    **SAMPLING_RANGES,
    "logit_bias": {"type": "object", "propertyNames": {"pattern": r"^\d{1,9}$"},
                   "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                   "description": "Token id to bias"},
    "ignore_eos": {"type": "boolean", "description": "Inferno extension (also llama.cpp's): "
                                                      "generate max_tokens tokens, never "
                                                      "stopping at the model's end token"},
    "n": {"type": "integer", "const": 1, "description": "One choice per request"},
    "stream": BOOLEAN,
    "stream_options": nullable(obj({"include_usage": BOOLEAN})),
    "response_format": ref("ResponseFormat"),
    "keep_alive": KEEP_ALIVE,
    "cache": {"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["no-store", "refresh"]}],
              "description": "Inferno extension: use the response cache (false or no-store: "
                             "bypass it; refresh: run the model and store the new answer)"},
    "user": STRING,
    "model": MODEL_NAME,
}
#: Accepted and ignored: they change nothing in Inferno, so SDKs that send them still work.
_IGNORED: Schema = {name: {"description": "Accepted and ignored"} for name in (
    "store", "metadata", "service_tier", "parallel_tool_calls", "modalities",
    "prediction", "reasoning_effort")}

TEXT_PART = obj({"type": {"const": "text"}, "text": STRING}, ("type", "text"), closed=True)
CONTENT = {"anyOf": [STRING, {"type": "array", "items": TEXT_PART}],
           "description": "A string, or text parts (joined by newlines)"}
TOOL_CALL = obj({"id": STRING, "type": {"const": "function"},
                 "function": obj({"name": STRING, "arguments": {
                     "type": "string", "description": "The arguments as a JSON text"}},
                     ("name", "arguments"))}, ("id", "type", "function"))

OPENAI_REQUESTS: dict[str, Schema] = {
    "ChatMessage": {"anyOf": [
        obj({"role": {"enum": ["system", "developer", "user", "assistant"]},
             "content": CONTENT, "name": STRING}, ("role", "content")),
        obj({"role": {"const": "assistant"}, "content": nullable(CONTENT), "name": STRING,
             "tool_calls": {"type": "array", "items": TOOL_CALL, "minItems": 1}},
            ("role", "tool_calls"), description="The assistant's earlier tool calls"),
        obj({"role": {"const": "tool"}, "content": CONTENT, "name": STRING,
             "tool_call_id": {"type": "string", "minLength": 1,
                              "description": "The id of the call this answers"}},
            ("role", "content", "tool_call_id"), description="A tool's result")]},
    "Tool": obj({"type": {"const": "function"}, "function": obj({
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "description": STRING, "strict": BOOLEAN,
        "parameters": {"type": "object", "description": "A JSON Schema of the arguments"},
    }, ("name",))}, ("type", "function")),
    "ToolChoice": {"anyOf": [
        {"enum": ["none", "auto", "required"]},
        obj({"type": {"const": "function"}, "function": obj({"name": STRING}, ("name",))},
            ("type", "function"))]},
    "ResponseFormat": {"anyOf": [
        obj({"type": {"const": "text"}}, ("type",)),
        obj({"type": {"const": "json_object"}}, ("type",)),
        obj({"type": {"const": "json_schema"}, "json_schema": obj({
            "name": STRING, "strict": BOOLEAN, "description": STRING,
            "schema": {"type": "object", "description": "The JSON Schema answers follow"},
        }, ("schema",))}, ("type", "json_schema"))]},
    "ChatCompletionRequest": obj({
        **_SAMPLING, **_IGNORED,
        "messages": {"type": "array", "minItems": 1, "items": ref("ChatMessage")},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "tools": {"type": "array", "items": ref("Tool")},
        "tool_choice": ref("ToolChoice"),
    }, ("model", "messages"), closed=True),
    "CompletionRequest": obj({
        **_SAMPLING,
        "prompt": {"anyOf": [STRING, {"type": "array", "items": STRING, "minItems": 1,
                                      "maxItems": 1}]},
        "suffix": {"enum": ["", None], "description": "Not supported"},
        "echo": {"enum": [False, None], "description": "Not supported"},
        "best_of": {"enum": [1, None], "description": "One choice per request"},
    }, ("model", "prompt"), closed=True),
    "EmbeddingRequest": obj({
        "model": MODEL_NAME,
        "input": {"anyOf": [STRING, {"type": "array", "items": STRING, "minItems": 1}]},
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1,
                       "description": "Must equal the model's own"},
        "user": STRING, "keep_alive": KEEP_ALIVE,
        "cache": {"oneOf": [BOOLEAN, {"type": "string", "enum": ["no-store", "refresh"]}]},
    }, ("model", "input"), closed=True),
}

# --------------------------------------------------------------------------- OpenAI responses

USAGE = obj({"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER,
             "prompt_tokens_details": obj({"cached_tokens": INTEGER}, ("cached_tokens",),
                                          description="Prompt tokens whose KV cache was "
                                                      "reused from an earlier request")},
            ("prompt_tokens", "completion_tokens", "total_tokens"))
TIMINGS = obj({name: NUMBER for name in (
    "queue_seconds", "load_seconds", "time_to_first_token", "decode_seconds",
    "decode_tokens_per_second", "prompt_tokens_per_second")},
    description="Inferno's timing figures, beside the standard usage")
_HEAD = {"id": STRING, "object": STRING, "created": INTEGER, "model": STRING,
         "system_fingerprint": STRING}

OPENAI_RESPONSES: dict[str, Schema] = {
    "Model": obj({"id": STRING, "object": {"const": "model"}, "created": INTEGER,
                  "owned_by": STRING, "aliases": {"type": "array", "items": STRING},
                  "description": NULLABLE_STRING, "loaded": BOOLEAN, "available": BOOLEAN,
                  "unavailable": NULLABLE_STRING}, ("id", "object", "created", "owned_by")),
    "ModelList": obj({"object": {"const": "list"}, "data": {"type": "array",
                                                             "items": ref("Model")}},
                     ("object", "data")),
    "ChatCompletion": obj({**_HEAD, "choices": {"type": "array", "items": obj({
        "index": INTEGER, "finish_reason": STRING,
        "message": obj({"role": {"const": "assistant"}, "content": NULLABLE_STRING,
                        "tool_calls": {"type": "array", "items": TOOL_CALL}},
                       ("role", "content")),
    }, ("index", "message", "finish_reason"))}, "usage": USAGE, "timings": TIMINGS},
        ("id", "object", "created", "model", "choices", "usage")),
    "Completion": obj({**_HEAD, "choices": {"type": "array", "items": obj({
        "index": INTEGER, "text": STRING, "finish_reason": STRING},
        ("index", "text", "finish_reason"))}, "usage": USAGE, "timings": TIMINGS},
        ("id", "object", "created", "model", "choices", "usage")),
    "EmbeddingList": obj({
        "object": {"const": "list"}, "model": STRING,
        "data": {"type": "array", "items": obj({
            "object": {"const": "embedding"}, "index": INTEGER,
            "embedding": {"anyOf": [{"type": "array", "items": NUMBER}, STRING],
                          "description": "Floats, or base64 of little-endian float32"},
        }, ("object", "index", "embedding"))},
        "usage": obj({"prompt_tokens": INTEGER, "total_tokens": INTEGER}),
        "timings": ANY_OBJECT,
    }, ("object", "data", "model", "usage")),
}

# --------------------------------------------------------------------------- Inferno's API

MODEL_STATUS = {
    "name": STRING, "path": NULLABLE_STRING, "source": STRING,
    "aliases": {"type": "array", "items": STRING}, "description": NULLABLE_STRING,
    "loaded": BOOLEAN, "version": {**NULLABLE_STRING, "description": "The loaded file version"},
    "inflight": {"type": "integer", "description": "Requests the model is serving now"},
    "unavailable": {**NULLABLE_STRING, "description": "Why the model cannot serve"},
}
QUEUE = obj({name: INTEGER for name in ("running", "waiting", "limit", "concurrency",
                                         "served", "refused")}
            | {"wait_seconds_total": NUMBER, "last_wait_seconds": NUMBER})

INFERNO: dict[str, Schema] = {
    "ModelStatus": obj(MODEL_STATUS, ("name", "loaded", "inflight")),
    "InfernoModelList": obj({"models": {"type": "array", "items": ref("ModelStatus")}},
                            ("models",)),
    "ModelDetails": obj({**MODEL_STATUS, "info": ANY_OBJECT, "format": STRING,
                         "size": INTEGER, "metadata": ANY_OBJECT,
                         "problem": {"type": "string", "description": "Why the file could "
                                                                      "not be read"}},
                        ("name", "loaded", "inflight"),
                        description="The status; then the loaded model's info, or the "
                                    "file's format, size and metadata"),
    "LoadRequest": obj({"keep_alive": KEEP_ALIVE}, closed=True),
    "LoadResult": obj({"name": STRING, "loaded": BOOLEAN, "seconds": NUMBER,
                       "info": ANY_OBJECT}, ("name", "loaded")),
    "UnloadResult": obj({"name": STRING, "unloaded": {
        "type": "boolean", "description": "false when it was not loaded"}},
        ("name", "unloaded")),
    "RollbackResult": obj({"name": STRING, "rolled_back": BOOLEAN}, ("name", "rolled_back")),
    "Status": obj({
        "version": STRING, "state": STRING, "uptime_seconds": NUMBER,
        "loaded": {"type": "array", "items": obj({
            "name": STRING, "format": NULLABLE_STRING,
            "memory_bytes": nullable(INTEGER), "device": NULLABLE_STRING,
            "inflight": INTEGER, "keep_alive": nullable(NUMBER),
            "batching": {**ANY_OBJECT, "description": "A batching model's slots, waiting "
                                                      "requests and step counters"}},
            ("name",))},
        "queues": {"type": "object", "additionalProperties": QUEUE,
                   "description": "Per model: running, waiting and wait times"},
    }, ("version", "state", "uptime_seconds", "loaded", "queues")),
    "Live": obj({"status": {"const": "live"}}, ("status",)),
    "Ready": obj({"status": {"enum": ["ready", "not_ready"]}, "state": STRING,
                  "reasons": {"type": "array", "items": STRING},
                  "preload_failures": {"type": "object", "additionalProperties": STRING}},
                 ("status", "state", "reasons")),
}

# --------------------------------------------------------------------------- Ollama's API

#: Ollama's load options: accepted and ignored, as Inferno sets them per model in the profile.
_LOAD_OPTIONS = ("numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv",
                 "logits_all", "vocab_only", "use_mmap", "use_mlock", "embedding_only",
                 "num_thread", "num_keep", "repeat_last_n", "penalize_newline")
OLLAMA_OPTIONS = obj({
    "num_predict": {"type": "integer", "not": {"const": 0},
                    "description": "Most tokens; negative for no limit"},
    **SAMPLING_RANGES,
    "mirostat": {"const": 0, "description": "Not supported: only 0 (off)"},
    "tfs_z": {"const": 1.0, "description": "Not supported: only 1 (off)"},
    "typical_p": {"const": 1.0, "description": "Not supported: only 1 (off)"},
    **{name: {"description": "Accepted and ignored: set per model in the profile"}
       for name in _LOAD_OPTIONS},
}, closed=True, description="Sampling options")
OLLAMA_KEEP_ALIVE = {
    "anyOf": [NUMBER, {"type": "string",
                       "pattern": r"^[-+]?(\d+(\.\d*)?|((\d+(\.\d*)?|\.\d+)(ns|us|ms|s|m|h))+)$"}],
    "description": "Seconds, or a Go duration such as '5m' or '1h30m'; negative keeps the "
                   "model loaded, 0 unloads it", "examples": ["5m", 0]}
OLLAMA_FORMAT = {"anyOf": [{"const": "json"}, {"const": ""}, {"type": "object"}],
                 "description": "\"json\", or a JSON Schema the answer follows"}
_OLLAMA_COMMON: Schema = {
    "model": MODEL_NAME, "stream": {"type": "boolean", "description": "Default true"},
    "format": OLLAMA_FORMAT, "options": OLLAMA_OPTIONS, "keep_alive": OLLAMA_KEEP_ALIVE,
    "think": {"type": "boolean", "const": False, "description": "Not supported"},
}
_OLLAMA_DONE: Schema = {
    "model": STRING, "created_at": {"type": "string", "format": "date-time"}, "done": BOOLEAN,
    "done_reason": STRING, **{name: {"type": "integer", "description": "Nanoseconds"}
                              for name in ("total_duration", "load_duration",
                                           "prompt_eval_duration", "eval_duration")},
    "prompt_eval_count": INTEGER, "eval_count": INTEGER,
}
OLLAMA_DETAILS = obj({"parent_model": STRING, "format": STRING, "family": STRING,
                      "families": nullable({"type": "array", "items": STRING}),
                      "parameter_size": STRING, "quantization_level": STRING})
_OLLAMA_TOOL_CALLS = {"type": "array", "items": obj({"function": obj({
    "name": STRING, "arguments": {"type": "object"}}, ("name", "arguments"))}, ("function",))}
OLLAMA_MESSAGE = obj({"role": {"const": "assistant"}, "content": STRING,
                      "tool_calls": _OLLAMA_TOOL_CALLS}, ("role", "content"))
OLLAMA_TURN = obj({
    "role": {"enum": ["system", "user", "assistant", "tool"]}, "content": STRING,
    "tool_calls": _OLLAMA_TOOL_CALLS, "thinking": STRING,
    "tool_name": {"type": "string", "description": "The tool a 'tool' message answers"},
    "name": STRING, "tool_call_id": STRING,
}, ("role", "content"), closed=True)

OLLAMA: dict[str, Schema] = {
    "OllamaError": obj({"error": STRING}, ("error",),
                       description="Ollama's error body, which its clients read"),
    "OllamaGenerateRequest": obj({**_OLLAMA_COMMON, "prompt": STRING, "system": STRING,
                                  "raw": BOOLEAN}, ("model",), closed=True,
                                 description="No prompt loads the model (keep_alive 0 "
                                             "unloads it)"),
    "OllamaChatRequest": obj({**_OLLAMA_COMMON,
                              "messages": {"type": "array", "items": OLLAMA_TURN},
                              "tools": {"type": "array", "items": ref("Tool")}},
                             ("model",), closed=True,
                             description="No messages loads the model (keep_alive 0 unloads "
                                         "it)"),
    "OllamaEmbedRequest": obj({
        "model": MODEL_NAME, "input": {"anyOf": [STRING, {"type": "array", "items": STRING}]},
        "truncate": BOOLEAN, "options": OLLAMA_OPTIONS, "keep_alive": OLLAMA_KEEP_ALIVE,
        "dimensions": {"type": "integer", "minimum": 1}}, ("model", "input"), closed=True),
    "OllamaEmbeddingsRequest": obj({"model": MODEL_NAME, "prompt": STRING,
                                    "options": OLLAMA_OPTIONS,
                                    "keep_alive": OLLAMA_KEEP_ALIVE},
                                   ("model", "prompt"), closed=True),
    "OllamaShowRequest": obj({"model": MODEL_NAME, "name": {
        "type": "string", "description": "The older name of model"}, "verbose": BOOLEAN},
        closed=True),
    "OllamaGenerateResponse": obj({**_OLLAMA_DONE, "response": STRING},
                                  ("model", "created_at", "response", "done")),
    "OllamaChatResponse": obj({**_OLLAMA_DONE, "message": OLLAMA_MESSAGE},
                              ("model", "created_at", "message", "done")),
    "OllamaEmbedResponse": obj({"model": STRING, "embeddings": {
        "type": "array", "items": {"type": "array", "items": NUMBER}},
        "total_duration": INTEGER, "prompt_eval_count": INTEGER}, ("model", "embeddings")),
    "OllamaEmbeddingsResponse": obj({"embedding": {"type": "array", "items": NUMBER}},
                                    ("embedding",)),
    "OllamaTags": obj({"models": {"type": "array", "items": obj({
        "name": STRING, "model": STRING, "modified_at": STRING, "size": INTEGER,
        "digest": STRING, "details": OLLAMA_DETAILS}, ("name", "model", "size"))}},
        ("models",)),
    "OllamaPs": obj({"models": {"type": "array", "items": obj({
        "name": STRING, "model": STRING, "size": INTEGER, "digest": STRING,
        "details": OLLAMA_DETAILS, "expires_at": STRING, "size_vram": INTEGER,
        "context_length": nullable(INTEGER)}, ("name", "model", "size"))}}, ("models",)),
    "OllamaShow": obj({"modelfile": STRING, "license": STRING, "parameters": STRING,
                       "template": STRING, "details": OLLAMA_DETAILS,
                       "model_info": ANY_OBJECT, "capabilities": {
                           "type": "array", "items": STRING}, "modified_at": STRING},
                      ("details", "capabilities")),
    "OllamaVersion": obj({"version": STRING}, ("version",)),
}

SCHEMAS: dict[str, Schema] = {**ERRORS, **OPENAI_REQUESTS, **OPENAI_RESPONSES, **INFERNO,
                              **OLLAMA}
