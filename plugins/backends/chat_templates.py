"""Chat templates: the model file's own, a built-in one by architecture, or the config's.

Templates are Jinja2, rendered in a sandbox: a template inside a downloaded
model file is untrusted input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from inferno.plugins.models.errors import ModelError, RequestError

_GEMMA = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] + '\n\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if m['role'] != 'assistant' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_LLAMA2 = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}"
    "{% set ns.system = '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' %}"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] | trim }} {{ eos_token }}"
    "{% if not loop.last %}{{ bos_token }}{% endif %}"
    "{% else %}[INST] {{ ns.system }}{{ m['content'] | trim }} [/INST]"
    "{% set ns.system = '' %}{% endif %}{% endfor %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_MISTRAL = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] | trim }}{{ eos_token }}"
    "{% else %}[INST] {{ ns.system }}{{ m['content'] | trim }}[/INST]"
    "{% set ns.system = '' %}{% endif %}{% endfor %}"
)
_PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

#: Built-in templates by name; a model entry's ``chat_template`` may name one.
BUILTIN: Mapping[str, str] = {
    "gemma": _GEMMA, "llama2": _LLAMA2, "llama3": _LLAMA3, "chatml": _CHATML,
    "mistral": _MISTRAL, "phi3": _PHI3,
}
#: ``general.architecture`` → built-in template.
BY_ARCHITECTURE: Mapping[str, str] = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "llama": "llama2", "llama4": "llama3", "qwen": "chatml", "qwen2": "chatml",
    "qwen2moe": "chatml", "qwen3": "chatml", "qwen3moe": "chatml", "mistral": "mistral",
    "mistral3": "mistral", "phi3": "phi3", "phimoe": "phi3",
}
ROLES = frozenset({"system", "user", "assistant", "tool"})



class _TemplateRefusal(jinja2.TemplateError):
    """A template's own ``raise_exception``: it refuses these messages."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """Renders as Hugging Face and llama.cpp do (trimmed blocks, lenient undefined names), but
    an attempt to reach Python internals fails at once instead of rendering as empty text."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} "
                            f"object is not allowed in a chat template")


def _raise_exception(message: str) -> None:
    raise _TemplateRefusal(message)


_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True)
_ENV.globals["raise_exception"] = _raise_exception


def choose(model: str, metadata: Mapping[str, Any], configured: str = "") -> tuple[str, str]:
    """``(source, template)``: the config's choice, else the file's own, else by architecture."""
    if configured:
        if configured in BUILTIN:
            return f"built-in {configured!r} (from config)", BUILTIN[configured]
        return "config", configured
    own = metadata.get("tokenizer.chat_template")
    if own:
        return "model file", str(own)
    architecture = str(metadata.get("general.architecture", ""))
    name = BY_ARCHITECTURE.get(architecture)
    if architecture == "llama" and metadata.get("tokenizer.ggml.model") == "gpt2":
        name = "llama3"  # Llama 3 shares the architecture name but uses a BPE vocabulary
    if name is None:
        raise ModelError(model, f"has no chat template and architecture {architecture!r} has no "
                                f"built-in one; set chat_template for this model to one of "
                                f"{', '.join(sorted(BUILTIN))} or to a Jinja template")
    return f"built-in {name!r} (architecture {architecture})", BUILTIN[name]


def compile_template(model: str, source: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelError(model, f"chat template does not parse: {exc.message} "
                                f"(line {exc.lineno})") from None


def render(model: str, template: jinja2.Template, messages: Sequence[Mapping[str, Any]], *,
           bos_token: str, eos_token: str, system_prompt: str = "") -> str:
    """The prompt for ``messages``, ending where the assistant's answer begins."""
    checked = check_messages(model, messages)
    if system_prompt and not any(m["role"] == "system" for m in checked):
        checked.insert(0, {"role": "system", "content": system_prompt})
    try:
        return template.render(messages=checked, add_generation_prompt=True,
                               bos_token=bos_token, eos_token=eos_token)
    except _TemplateRefusal as exc:
        raise RequestError(model, f"the chat template refuses these messages: {exc}") from None
    except jinja2.TemplateError as exc:
        raise ModelError(model, f"chat template failed: {exc}") from None


def check_messages(model: str, messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise RequestError(model, "messages must be a non-empty list of {role, content}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestError(model, f"messages[{index}] must be an object with role and "
                                      f"content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RequestError(model, f"messages[{index}].role must be one of "
                                      f"{', '.join(sorted(ROLES))}, got {role!r}")
        if not isinstance(content, str):
            raise RequestError(model, f"messages[{index}].content must be a string")
        checked.append({"role": role, "content": content})
    return checked
