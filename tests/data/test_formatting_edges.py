"""Formatting paths beyond the common ones: template files and names, content found in a
re-rendered turn, record fields the template gets, and which parts of a conversation train."""

import pytest

from hoptune.data.formatting import (
    ChatFormatter,
    ExampleError,
    resolve_chat_template,
    tokenize_record,
)
from tests.data.test_chat_masks import CHAT, NO_GEN_PROMPT, masked_text
from tests.data.test_chat_records import _parts


def test_a_name_like_value_without_a_tokenizer_is_a_missing_file():
    """Without a tokenizer no value is a name: the error speaks of a file only."""
    with pytest.raises(FileNotFoundError) as e:
        resolve_chat_template("chatml")
    assert str(e.value).startswith("model.chat_template='chatml': no such file, and not an inline")


def test_a_template_file_with_old_mac_line_ends_reads_as_newlines(tmp_path):
    """A lone carriage return is a line end, as a text-mode read gives it."""
    path = tmp_path / "t.jinja"
    path.write_bytes(NO_GEN_PROMPT.replace("\n", "\r").encode("utf-8"))
    assert resolve_chat_template(str(path)) == NO_GEN_PROMPT


@pytest.mark.parametrize("encoding", ["utf-32", "utf-32-be", "utf-16-be"])
def test_a_template_file_in_utf32_or_big_endian_with_a_byte_order_mark(tmp_path, encoding):
    """The UTF-32 little-endian mark begins with the UTF-16 one: it is told apart first."""
    import codecs

    path = tmp_path / "t.jinja"
    bom = {"utf-32-be": codecs.BOM_UTF32_BE, "utf-16-be": codecs.BOM_UTF16_BE}.get(encoding, b"")
    path.write_bytes(bom + NO_GEN_PROMPT.encode(encoding))
    assert resolve_chat_template(str(path)) == NO_GEN_PROMPT


def test_a_bad_sharegpt_message_is_shown_as_written(tokenizer):
    """The error shows the message with its 'from' and 'value' keys, as the file has it."""
    rec = {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant"}]}
    with pytest.raises(ExampleError, match=r"conversations\[1\] must be .*, got \{'from': 'assistant'\}$"):
        tokenize_record(rec, tokenizer, ChatFormatter(tokenizer))


def test_a_syntax_error_in_one_of_two_named_templates_names_it(tokenizer):
    good = tokenizer.chat_template
    tokenizer.chat_template = {"default": good, "tool_use": "{% for m in messages %}{{ m.content }"}
    with pytest.raises(ExampleError, match=r"^the tokenizer's chat template 'tool_use' is not valid Jinja"):
        ChatFormatter(tokenizer)


def test_text_parts_with_a_template_that_writes_content_as_json(tokenizer):
    """A template that renders the content with ``tojson`` shows a list of parts as JSON (with its
    "type" and "text" keys): it gets the parts' text joined, as a template that reads a string."""
    as_json = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | tojson }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    chat = ChatFormatter(tokenizer, as_json)
    ids, mask = tokenize_record({"messages": _parts(CHAT)}, tokenizer, chat)
    assert (ids, mask) == tokenize_record({"messages": CHAT}, tokenizer, chat)
    assert masked_text(tokenizer, ids, mask) == ['"7"<|end|>', '"10"<|end|>']


def test_a_header_that_depends_on_the_content_is_not_trained(tokenizer):
    """No generation prompt, and a header that shows the content's length: the placeholder's
    render has another header, so the content is found in the turn itself (not at the
    placeholder's offset)."""
    with_length = "{% for m in messages %}{{ m['role'] }} ({{ m['content'] | length }}): {{ m['content'] }}\n{% endfor %}"
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "yes"}]
    ids, mask = ChatFormatter(tokenizer, with_length).tokenize(msgs)
    assert masked_text(tokenizer, ids, mask) == ["yes\n"]


def test_content_found_in_the_turn_is_its_last_occurrence(tokenizer):
    """A template without generation prompt that upper-cases the whole turn: an answer "A" written in
    capitals is found after the header "ASSISTANT: ", not at the header's first "A"."""
    upper = "{% for m in messages %}{{ (m['role'] ~ ': ' ~ m['content']) | upper }}\n{% endfor %}"
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "A"}]
    ids, mask = ChatFormatter(tokenizer, upper).tokenize(msgs)
    assert masked_text(tokenizer, ids, mask) == ["A\n"]


@pytest.mark.parametrize("tools", [{}, 0, False, {"name": "f"}])
def test_tools_that_are_not_a_list_are_refused(tokenizer, tools):
    rec = {"messages": CHAT[1:3], "tools": tools}
    with pytest.raises(ExampleError, match="'tools' must be a list of function schemas, got"):
        tokenize_record(rec, tokenizer, ChatFormatter(tokenizer))


@pytest.mark.parametrize("key", ["chat_template", "tokenize", "return_dict", "return_assistant_tokens_mask"])
def test_chat_template_kwargs_cannot_set_the_render_arguments(tokenizer, key):
    rec = {"messages": CHAT[1:3], "chat_template_kwargs": {key: True}}
    with pytest.raises(ExampleError, match=f"'chat_template_kwargs' cannot set '{key}'"):
        tokenize_record(rec, tokenizer, ChatFormatter(tokenizer))


def test_tools_given_in_chat_template_kwargs_reach_the_template(tokenizer):
    """``chat_template_kwargs`` is spread after the record's tools: its own "tools" is what the
    template gets."""
    template = (
        "{{ bos_token }}{% if tools %}<|system|>tools: {{ tools | length }}<|end|>{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    chat = ChatFormatter(tokenizer, template)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    ids, _ = tokenize_record(
        {"messages": CHAT[1:3], "chat_template_kwargs": {"tools": tools}}, tokenizer, chat
    )
    assert "tools: 1" in tokenizer.decode(ids)
    assert (ids, _) == tokenize_record({"messages": CHAT[1:3], "tools": tools}, tokenizer, chat)


def test_a_completion_without_an_assistant_message_is_refused_even_after_one_in_the_prompt(tokenizer):
    rec = {"prompt": CHAT[:3], "completion": [{"role": "user", "content": "thanks"}]}
    with pytest.raises(ExampleError, match="the completion has no assistant message"):
        tokenize_record(rec, tokenizer, ChatFormatter(tokenizer))


def test_a_trimmed_answer_ending_in_whitespace_in_a_template_that_closes_no_turn(tokenizer):
    """A template that trims the content and renders nothing after it: an answer written with a
    trailing newline still has no end-of-turn text after it."""
    trimmed = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    msgs = [CHAT[1], {"role": "assistant", "content": "7\n"}]
    with pytest.raises(ExampleError, match=r"renders nothing after the content of assistant message 1"):
        ChatFormatter(tokenizer, trimmed).tokenize(msgs)


def test_a_generation_block_holding_the_header_trains_no_prompt_token(tokenizer):
    """Conversational prompt/completion with {% generation %} markers around the assistant header as
    well: the header the prompt ends with (its generation prompt) is not in the loss."""
    tagged = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
        "<|assistant|>{{ m['content'] }}{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    rec = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    ids, mask = tokenize_record(rec, tokenizer, ChatFormatter(tokenizer, tagged))
    assert masked_text(tokenizer, ids, mask) == ["10"]
