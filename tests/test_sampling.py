"""Sampling parameters: validated once, with errors that name the parameter."""

from __future__ import annotations

from typing import Any

import pytest

from inferno.plugins.backends.sampling import Sampling, parse_sampling, schema_problem
from inferno.plugins.models.errors import RequestError


def test_no_parameters_give_the_defaults() -> None:
    assert parse_sampling("m", {}) == Sampling()


def test_given_values_are_kept() -> None:
    sampling = parse_sampling("m", {
        "temperature": 0, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "repeat_penalty": 1.1,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 3, "max_tokens": 12,
        "stop": ["\n", "END"], "logit_bias": {"42": 5, 7: -100}})
    assert sampling == Sampling(
        temperature=0.0, top_p=0.5, top_k=7, min_p=0.1, repeat_penalty=1.1,
        presence_penalty=0.5, frequency_penalty=-0.5, seed=3, max_tokens=12,
        stop=("\n", "END"), logit_bias={42: 5.0, 7: -100.0})
    assert sampling.greedy


def test_request_values_override_the_models_defaults() -> None:
    sampling = parse_sampling("m", {"temperature": 0.2}, {"temperature": 1.0, "top_k": 5})
    assert (sampling.temperature, sampling.top_k) == (0.2, 5)


def test_a_single_stop_string_becomes_a_tuple() -> None:
    assert parse_sampling("m", {"stop": "###"}).stop == ("###",)


@pytest.mark.parametrize("value", [None, -1])
def test_max_tokens_none_or_minus_one_means_as_many_as_the_context_allows(value: Any) -> None:
    assert parse_sampling("m", {"max_tokens": value}).max_tokens is None


@pytest.mark.parametrize(("params", "named"), [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0}, "top_p"),
    ({"min_p": 2}, "min_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"seed": -5}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {"the": 1}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias[5]"),
    ({"temprature": 0.5}, "'temprature'"),
    ({"response_format": "xml"}, "response_format"),
    ({"schema": {"type": "object"}}, "schema"),
    ({"response_format": "json_schema"}, "schema"),
    ({"response_format": "json_schema", "schema": "{not json"}, "schema"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"ignore_eos": True, "response_format": "json"}, "ignore_eos"),
])
def test_an_invalid_value_is_a_request_error_naming_the_parameter(params: dict[str, Any],
                                                                  named: str) -> None:
    with pytest.raises(RequestError, match=r"^mymodel: ") as caught:
        parse_sampling("mymodel", params)
    assert named in str(caught.value)


def test_ignore_eos_is_kept() -> None:
    assert parse_sampling("m", {"ignore_eos": True}).ignore_eos
    assert not parse_sampling("m", {}).ignore_eos


def test_an_unknown_parameter_lists_the_known_ones() -> None:
    with pytest.raises(RequestError, match=r"unknown sampling parameter 'beam'.*temperature"):
        parse_sampling("m", {"beam": 4})


def test_a_json_mode_request_needs_no_schema() -> None:
    assert parse_sampling("m", {"response_format": "json"}).response_format == "json"


def test_a_schema_may_come_as_json_text() -> None:
    sampling = parse_sampling("m", {"response_format": "json_schema",
                                    "schema": '{"type": "object"}'})
    assert sampling.schema == {"type": "object"}


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": ["integer", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "pet": {"$ref": "#/$defs/pet"},
        "point": {"type": "array", "items": [{"type": "number"}, {"type": "number"}]},
        "mood": {"enum": ["happy", "sad"]},
        "either": {"anyOf": [{"type": "string"}, {"type": "boolean"}]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"type": "string"}}}},
}


@pytest.mark.parametrize("schema", [PERSON, {"type": "object"}, {"type": "string"}, True,
                                    {"properties": {"anything": True}}])
def test_a_well_formed_schema_has_no_problem(schema: Any) -> None:
    assert schema_problem(schema) is None


@pytest.mark.parametrize(("schema", "problem"), [
    ({"type": "bogus"}, "schema.type must be one of"),
    ({"type": ["string", "text"]}, "'text'"),
    ({"type": "object", "properties": [1, 2]}, "schema.properties must be an object"),
    ({"type": "object", "properties": {"a": 5}}, "schema.properties.a must be an object"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "schema.properties.a.type"),
    ({"type": "object", "required": "name"}, "schema.required must be a list"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]},
     "schema.required names 'b'"),
    ({"type": "array", "items": "string"}, "schema.items[0] must be an object"),
    ({"anyOf": []}, "schema.anyOf must be a non-empty list"),
    ({"oneOf": {"type": "string"}}, "schema.oneOf must be a non-empty list"),
    ({"type": "string", "maxLength": -1}, "schema.maxLength must be an integer"),
    ({"enum": "abc"}, "schema.enum must be a non-empty list"),
    ({"$defs": {"x": {"type": "nope"}}}, "schema.$defs.x.type"),
    ({"additionalProperties": 3}, "schema.additionalProperties must be an object"),
])
def test_a_malformed_schema_is_reported_with_the_path_to_the_mistake(schema: Any,
                                                                     problem: str) -> None:
    assert problem in (schema_problem(schema) or "")


def test_a_malformed_schema_in_a_request_is_a_request_error() -> None:
    with pytest.raises(RequestError, match=r"invalid JSON Schema: schema.type must be one of"):
        parse_sampling("m", {"response_format": "json_schema", "schema": {"type": "bogus"}})
