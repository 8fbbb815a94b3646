"""Tool calls: the model is told about the tools and answers under a grammar, so that a
call always parses.

With tools offered (and ``tool_choice`` not ``none``) the model answers one JSON
object, constrained by a JSON Schema turned into a llama.cpp grammar:
``{"tool_calls": [{"name", "arguments"}]}`` to call tools, or ``{"content": "..."}``
to answer in words (``auto`` only). ``required`` and a named function allow calls
alone. Earlier turns are rewritten the same way, so the conversation shows the model
the format it is asked for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .calls import ToolCall, new_id
from .errors import invalid

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class Tools:
    tools: tuple[Tool, ...]
    #: ``none``, ``auto``, ``required`` or a tool's name.
    choice: str
    #: Several calls in one answer only when the request asks (``parallel_tool_calls``):
    #: small models given the choice tend to repeat a call until max_tokens.
    parallel: bool = False

    @property
    def active(self) -> bool:
        return self.choice != "none"

    @property
    def offered(self) -> tuple[Tool, ...]:
        if self.choice in ("none", "auto", "required"):
            return self.tools
        return tuple(t for t in self.tools if t.name == self.choice)

    def schema(self) -> dict[str, Any]:
        """The shape of the answer, as a JSON Schema for the grammar."""
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"const": tool.name},
                                              "arguments": _arguments_schema(tool)},
             "required": ["name", "arguments"], "additionalProperties": False}
            for tool in self.offered]}}
        if not self.parallel or self.choice not in ("auto", "required"):
            calls["maxItems"] = 1
        call_schema = {"type": "object", "properties": {"tool_calls": calls},
                       "required": ["tool_calls"], "additionalProperties": False}
        if self.choice != "auto":
            return call_schema
        answer = {"type": "object", "properties": {"content": {"type": "string"}},
                  "required": ["content"], "additionalProperties": False}
        return {"anyOf": [call_schema, answer]}

    def instructions(self) -> str:
        """What the system prompt says about the tools."""
        lines = ["You can call these tools (JSON Schema of each tool's arguments):"]
        for tool in self.offered:
            lines.append(f"- {tool.name}: {tool.description or 'no description'} "
                         f"Arguments: {json.dumps(tool.parameters, separators=(',', ':'))}")
        lines.append('To call tools, answer only {"tool_calls": [{"name": "<tool>", '
                     '"arguments": {...}}]}.')
        if self.choice == "auto":
            lines.append('To answer without a tool, answer only {"content": "<your answer>"}.')
        return "\n".join(lines)

    def prepare(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The conversation as the model sees it: the tools in the system prompt, earlier
        calls and their results written in the answer format."""
        prepared = rewrite_turns(messages)
        if prepared and prepared[0]["role"] == "system":
            first = prepared[0]
            prepared[0] = {"role": "system",
                           "content": f"{first['content']}\n\n{self.instructions()}"}
        else:
            prepared.insert(0, {"role": "system", "content": self.instructions()})
        return prepared

    def parse(self, text: str) -> tuple[str, tuple[ToolCall, ...]]:
        """The answer's text content and tool calls. The grammar makes ``text`` valid
        JSON unless the generation was cut short (``max_tokens``); then it is returned as
        text, unparsed."""
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            return text, ()
        if isinstance(answer, dict) and isinstance(answer.get("tool_calls"), list):
            return "", tuple(ToolCall(id=new_id("call_")[:29], name=str(call["name"]),
                                      arguments=json.dumps(call.get("arguments", {})))
                             for call in answer["tool_calls"] if isinstance(call, dict))
        if isinstance(answer, dict) and isinstance(answer.get("content"), str):
            return answer["content"], ()
        return text, ()


def rewrite_turns(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation in roles every chat template knows: earlier tool calls as the
    assistant's JSON answer, tool results as user turns, consecutive turns of one role
    joined (many templates insist that user and assistant alternate)."""
    names = {call["id"]: call["name"] for m in messages
             for call in m.get("tool_calls", ()) if call.get("id")}
    prepared: list[dict[str, Any]] = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [{"name": c["name"], "arguments": _loads(c["arguments"])}
                     for c in message["tool_calls"]]
            turn = {"role": "assistant", "content": json.dumps({"tool_calls": calls})}
        elif message["role"] == "tool":
            name = names.get(message["tool_call_id"], message.get("name", "tool"))
            turn = {"role": "user", "content": f"Result of {name} "
                                               f"({message['tool_call_id']}): {message['content']}"}
        else:
            turn = {"role": message["role"], "content": message["content"]}
        if prepared and prepared[-1]["role"] == turn["role"] != "system":
            turn = {**turn, "content": f"{prepared[-1]['content']}\n\n{turn['content']}"}
            prepared.pop()
        prepared.append(turn)
    return prepared


def _arguments_schema(tool: Tool) -> Mapping[str, Any]:
    schema = dict(tool.parameters) or {"type": "object"}
    if schema.get("type") == "object" and "properties" not in schema:
        schema["properties"] = {}
    return schema


def _loads(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments



def parse_tools(tools: Any, choice: Any, parallel: Any = None) -> Tools | None:
    """The request's ``tools`` and ``tool_choice``, checked; ``None`` without tools."""
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice names a tool but no tools are given", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise invalid("tools must be a list of {type: 'function', function: {name, "
                      "description, parameters}}", "tools")
    parsed = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" \
                or not isinstance(function, Mapping):
            raise invalid(f"{where} must be {{type: 'function', function: {{name, "
                          f"description, parameters}}}}", where)
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid(f"{where}.function.name must be 1-64 letters, digits, _ or -, got "
                          f"{name!r}", f"{where}.function.name")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise invalid(f"{where}.function.parameters must be a JSON Schema object",
                          f"{where}.function.parameters")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise invalid(f"{where}.function.description must be a string",
                          f"{where}.function.description")
        parsed.append(Tool(name, description, parameters))
    names = [tool.name for tool in parsed]
    if len(set(names)) != len(names):
        raise invalid("tools must have distinct names", "tools")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls must be true or false", "parallel_tool_calls")
    return Tools(tuple(parsed), _choice(choice, names), parallel=bool(parallel))


def _choice(choice: Any, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return str(choice)
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise invalid("tool_choice must be 'none', 'auto', 'required' or {type: 'function', "
                      f"function: {{name}}}}, got {choice!r}", "tool_choice")
    if name not in names:
        raise invalid(f"tool_choice names {name!r}, which is not among the tools "
                      f"({', '.join(names)})", "tool_choice")
    return name
