"""Chat templates: chosen from config, file or architecture, rendered in a sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inferno.plugins.backends import chat_templates
from inferno.plugins.backends.chat_templates import BUILTIN, choose, compile_template
from inferno.plugins.models.errors import ModelError, RequestError

GEMMA3 = {"general.architecture": "gemma3"}
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a colour."}]


def render(source: str, messages: Any = CONVERSATION, **kwargs: Any) -> str:
    return chat_templates.render("mymodel", compile_template("mymodel", source), messages,
                                 bos_token="<bos>", eos_token="<eos>", **kwargs)


def test_gemma_3_gets_the_built_in_gemma_template() -> None:
    source, template = choose("m", GEMMA3)
    assert (source, template) == ("built-in 'gemma' (architecture gemma3)", BUILTIN["gemma"])


def test_the_gemma_template_renders_turns_with_the_system_text_in_the_first_user_turn() -> None:
    assert render(BUILTIN["gemma"]) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n"
        "<start_of_turn>model\n")


def test_the_files_own_template_wins_over_the_architectures() -> None:
    own = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert choose("m", {**GEMMA3, "tokenizer.chat_template": own}) == ("model file", own)


def test_the_config_may_name_a_built_in_template() -> None:
    source, template = choose("m", {**GEMMA3, "tokenizer.chat_template": "x"}, "chatml")
    assert (source, template) == ("built-in 'chatml' (from config)", BUILTIN["chatml"])


def test_the_config_may_give_a_jinja_template() -> None:
    assert choose("m", GEMMA3, "{{ messages[0].content }}") == ("config",
                                                               "{{ messages[0].content }}")


def test_a_llama_architecture_with_a_bpe_vocabulary_is_llama_3() -> None:
    source, _ = choose("m", {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2"})
    assert source == "built-in 'llama3' (architecture llama)"


def test_an_unknown_architecture_without_a_template_says_how_to_set_one() -> None:
    with pytest.raises(ModelError, match=r"^mymodel: .*'baichuan'.*set chat_template") as caught:
        choose("mymodel", {"general.architecture": "baichuan"})
    assert "chatml" in str(caught.value)  # it lists the built-in names


def test_templates_render_like_hugging_face_with_blocks_trimmed() -> None:
    source = ("{% for m in messages %}\n"
              "  {% if m.role == 'user' %}\n"
              "{{ m.role }}: {{ m.content }}\n"
              "  {% endif %}\n"
              "{% endfor %}\n")
    assert render(source, [{"role": "user", "content": "hi"}]) == "user: hi\n"


def test_names_a_template_tests_but_inferno_does_not_pass_are_simply_undefined() -> None:
    assert render("{% if tools %}tools{% endif %}ok") == "ok"


def test_a_system_prompt_from_config_is_added_when_the_request_has_none() -> None:
    text = render(BUILTIN["chatml"], [{"role": "user", "content": "hi"}],
                  system_prompt="You are Inferno.")
    assert text.startswith("<|im_start|>system\nYou are Inferno.<|im_end|>\n")


def test_a_system_message_in_the_request_replaces_the_configured_one() -> None:
    text = render(BUILTIN["chatml"], CONVERSATION, system_prompt="You are Inferno.")
    assert "You are Inferno." not in text
    assert "Be brief." in text


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch pwned') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
])
def test_a_template_reaching_for_python_internals_fails_clearly(
        source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"^mymodel: chat template failed: .*not allowed"):
        render(source)
    assert not (tmp_path / "pwned").exists()


def test_a_templates_raise_exception_is_a_request_error_with_its_message() -> None:
    source = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(RequestError, match="refuses these messages: Conversation roles must"):
        render(source)


def test_a_template_that_does_not_parse_names_the_line() -> None:
    with pytest.raises(ModelError, match=r"does not parse: .*\(line 2\)"):
        compile_template("m", "ok\n{% for m in messages %}")


@pytest.mark.parametrize(("messages", "problem"), [
    ([], "messages must be a non-empty list"),
    ("hello", "messages must be a non-empty list"),
    (["hello"], r"messages\[0\] must be an object"),
    ([{"role": "wizard", "content": "x"}], r"messages\[0\].role must be one of"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be a string"),
])
def test_malformed_messages_are_request_errors(messages: Any, problem: str) -> None:
    with pytest.raises(RequestError, match=problem):
        render(BUILTIN["gemma"], messages)
