"""``/openapi.json``: a valid OpenAPI document that lists every route the server answers, and
fuzzing the server from it (schemathesis) finds no server errors."""

from __future__ import annotations

import base64
import itertools
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from inferno.plugins.protocols import openapi
from tests.model_files import write_tiny_gguf
from tests.servers import ServerThread

#: Methods the server answers beside the documented ones: HEAD with every GET, and OPTIONS
#: for CORS preflights.
IMPLICIT = {"HEAD", "OPTIONS"}
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def document_of(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/openapi.json") as response:
        assert response.headers["Content-Type"].startswith("application/json")
        return json.load(response)  # type: ignore[no-any-return]


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    """``(METHOD, path)`` of every route the application answers."""
    return {(route.method, openapi.canonical(resource.canonical))
            for resource in app.router.resources() for route in resource
            if route.method not in IMPLICIT}


def missing_from(document: dict[str, Any], app: web.Application) -> list[tuple[str, str]]:
    documented = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item}
    return sorted(served_routes(app) - documented)


def http_app(server: Any) -> web.Application:
    return server.kernel.drivers("protocols")["http"].app  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the document


def test_the_document_is_valid_openapi(edge_server: Any) -> None:
    document = document_of(edge_server.url)
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_every_route_of_the_running_application_is_in_the_document(edge_server: Any) -> None:
    assert missing_from(document_of(edge_server.url), http_app(edge_server)) == []


def test_a_route_added_without_the_document_knowing_is_reported_missing(
        edge_server: Any) -> None:
    app = web.Application()
    for resource in http_app(edge_server).router.resources():
        for route in resource:
            app.router.add_route(route.method, resource.canonical, route.handler)

    async def secret(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/v1/secret/{key}", secret)
    assert missing_from(document_of(edge_server.url), app) == [("GET", "/v1/secret/{key}")]


def test_the_websocket_endpoint_on_the_http_port_is_in_the_document(tmp_path: Path) -> None:
    key = base64.b64encode(b"k" * 32).decode()  # enterprise starts only with an audit key
    with ServerThread("enterprise", tmp_path, sets=['protocols.http.host="127.0.0.1"',
                                                    f'audit.key="{key}"']) as server:
        document = document_of(server.url)
        assert missing_from(document, http_app(server)) == []
    assert "x-inferno-undescribed" not in document["paths"]["/v1/ws"]["get"]


def test_inferno_describes_every_route_of_its_own(edge_server: Any) -> None:
    """Routes from Inferno's protocol modules carry bodies and responses, not only the
    listing a plugin's undescribed route gets."""
    document = document_of(edge_server.url)
    own = {(route.method.lower(), openapi.canonical(resource.canonical))
           for resource in http_app(edge_server).router.resources() for route in resource
           if route.method not in IMPLICIT and
           getattr(route.handler, "__module__", "").startswith("inferno.plugins.protocols")}
    undescribed = [(method, path) for method, path in own
                   if document["paths"][path][method].get("x-inferno-undescribed")]
    assert len(own) > 20
    assert undescribed == []


def test_generation_bodies_describe_tools_response_format_and_stream_options(
        edge_server: Any) -> None:
    schemas = document_of(edge_server.url)["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"tools", "tool_choice", "response_format", "stream_options", "messages"} <= set(chat)
    assert schemas["ChatCompletionRequest"]["required"] == ["model", "messages"]
    assert {"prompt", "stream_options"} <= set(schemas["CompletionRequest"]["properties"])
    assert {"input", "encoding_format"} <= set(schemas["EmbeddingRequest"]["properties"])
    assert {"messages", "format", "options"} <= set(schemas["OllamaChatRequest"]["properties"])


def test_a_full_queue_is_documented_as_503_with_retry_after(edge_server: Any) -> None:
    document = document_of(edge_server.url)
    responses = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404", "413", "503"} <= set(responses)
    unavailable = document["components"]["responses"]["Unavailable"]
    assert "Retry-After" in unavailable["headers"]
    assert unavailable["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}


def test_a_plugins_route_is_listed_from_its_handler_even_undescribed() -> None:
    async def dashboard(request: web.Request) -> web.Response:
        """The dashboard of a plugin."""
        return web.Response()

    endpoints = openapi.route_paths([web.get(r"/dash/{page:\d+}", dashboard)])
    document = openapi.document([*endpoints, ("GET", "/openapi.json", None)])
    validate(document)
    listed = document["paths"]["/dash/{page}"]["get"]
    assert listed["summary"] == "The dashboard of a plugin."
    assert listed["x-inferno-undescribed"] is True
    assert [p["name"] for p in listed["parameters"]] == ["page"]


# --------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The edge profile with a tiny model in Gemma's place (the documents' examples name
    it), so that generation answers fast whatever the fuzzer asks for."""
    folder = tmp_path_factory.mktemp("fuzz")
    tiny = write_tiny_gguf(folder / "tiny.gguf", context_length=256, chat_template=CHATML)
    with ServerThread("edge", folder / "data", sets=[
            f'plugins.models.entries.gemma-3-270m.path="{tiny}"',
            "plugins.gateway.queue_timeout=20"]) as server:
        yield server


#: What the fuzz server serves: every route Inferno describes (its own and the WebSocket
#: endpoint, which this profile does not serve). Built here, without a server, because
#: pytest collects the fuzzing tests (one per operation) before any server starts; the
#: test below checks that the server serves this very document.
FUZZED = openapi.document([(method, path, None) for method, path in openapi.DESCRIBED
                           if path != "/v1/ws"])
schema = schemathesis.openapi.from_dict(FUZZED, config=schemathesis.Config.from_dict({
    "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    "request-timeout": 60}))


def test_the_fuzzed_document_is_the_one_the_server_serves(fuzz_server: ServerThread) -> None:
    served = document_of(fuzz_server.url)
    for path, methods in list(served["paths"].items()):  # plugins' routes (/metrics)
        if all("x-inferno-undescribed" in op for op in methods.values()):
            del served["paths"][path]
    assert served == json.loads(json.dumps(FUZZED))


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_fuzzing_the_api_finds_no_server_errors(case: Any, fuzz_server: ServerThread) -> None:
    if next(TURNS) % 2:
        name_a_registered_model(case)
    response = case.call(base_url=fuzz_server.url)
    responses = openapi.DESCRIBED[(case.method.upper(), case.path)]["responses"]
    if str(response.status_code) != "501" or "501" not in responses:  # 501: by design
        assert response.status_code < 500, (
            f"{response.status_code} {response.text[:300]}\n"
            f"{case.as_curl_command(base_url=fuzz_server.url)}")
    case.validate_response(response, checks=[
        status_code_conformance, content_type_conformance, response_schema_conformance])


TURNS = itertools.count()
EMBEDDERS = ("/v1/embeddings", "/api/embed", "/api/embeddings")


def name_a_registered_model(case: Any) -> None:
    """Point a generated request at a model that exists, so that its fuzzed fields reach the
    gateway and a backend instead of ending in 404 (every other case keeps its made-up
    name, which exercises the lookups)."""
    model = "minilm" if case.path in EMBEDDERS else "gemma-3-270m"
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = model
    for name in ("name", "id"):
        if isinstance((case.path_parameters or {}).get(name), str):
            case.path_parameters[name] = model


def test_the_document_examples_name_a_registered_model(fuzz_server: ServerThread) -> None:
    """The fuzzer reaches real generation only through a name that exists."""
    text = json.dumps(document_of(fuzz_server.url))
    names = set(re.findall(r'"examples": \["([\w.:-]+)"', text))
    assert "gemma-3-270m" in names
    assert Path(fuzz_server.service("models").entry("gemma-3-270m").path).name == "tiny.gguf"
