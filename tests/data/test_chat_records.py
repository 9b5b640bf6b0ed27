"""Chat records beyond role/content strings, read as TRL's SFTTrainer reads them: ShareGPT
``conversations`` (from/value) and OpenAI-style tool calls (an assistant message with
``content: null`` and ``tool_calls``)."""

import copy
import json
from importlib import resources

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hoptune.data import DataError, load_examples
from hoptune.data.formatting import (
    ChatFormatter,
    ExampleError,
    convert_to_chatml,
    record_kind,
    tokenize_record,
)
from tests.data.test_chat_masks import CHAT, masked_text


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _sharegpt(messages):
    return {"conversations": [{"from": m["role"], "value": m["content"]} for m in messages]}


# ---------------------------------------------------------------------------------------------
# ShareGPT


def test_sharegpt_record_trains_as_its_messages(tmp_path, tokenizer):
    """{"conversations": [{"from", "value"}]} gives the tokens and mask of the same chat written as
    {"messages": [{"role", "content"}]}, from a file as well."""
    rec = _sharegpt(CHAT)
    assert record_kind(rec) == "messages"
    chat = ChatFormatter(tokenizer)
    assert tokenize_record(rec, tokenizer, chat) == tokenize_record({"messages": CHAT}, tokenizer, chat)
    p = _write(tmp_path / "s.jsonl", [rec, {"messages": CHAT}])
    ex, _ = load_examples(p, tokenizer, max_seq_len=128)
    assert ex[0].input_ids == ex[1].input_ids and ex[0].loss_mask == ex[1].loss_mask
    assert masked_text(tokenizer, ex[0].input_ids, ex[0].loss_mask) == ["7<|end|>", "10<|end|>"]
    assert rec == _sharegpt(CHAT)  # the caller's record is not changed


@pytest.mark.parametrize(
    "rec",
    [
        _sharegpt(CHAT),
        # ShareGPT's own names are kept: TRL renames keys, not roles
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        # a message already in role/content, extra keys, and other fields of the record
        {
            "conversations": [
                {"from": "user", "value": "hi", "weight": 0},
                {"role": "assistant", "content": "yo"},
            ],
            "tools": [],
        },
        # from/value in a prompt/completion of the same record is converted too
        {
            "conversations": [{"from": "user", "value": "hi"}],
            "prompt": [{"from": "user", "value": "a"}],
            "completion": [{"from": "assistant", "value": "b"}],
        },
        {"messages": CHAT},  # no conversations: nothing to convert
    ],
)
def test_sharegpt_conversion_is_trls(rec):
    import trl.data_utils as trl_data_utils

    assert convert_to_chatml(rec) == trl_data_utils.maybe_convert_to_chatml(copy.deepcopy(rec))


def test_sharegpt_human_gpt_is_a_clear_error(tmp_path, tokenizer):
    """TRL keeps ShareGPT's "human" / "gpt" as roles, so no message is an assistant turn: each such
    line is listed with a hint to rename the roles."""
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    p = _write(tmp_path / "s.jsonl", [_sharegpt(CHAT), rec])
    with pytest.raises(DataError, match=r"s\.jsonl: 1 example\(s\) cannot be trained on: line 2: ") as e:
        load_examples(p, tokenizer, max_seq_len=128)
    msg = str(e.value)
    assert "roles: human, gpt" in msg and "'gpt' -> 'assistant'" in msg and "'human' -> 'user'" in msg
    ex, rep = load_examples(p, tokenizer, max_seq_len=128, skip_bad=True)
    assert len(ex) == 1 and [ln for ln, _ in rep.invalid] == [2]


def test_sharegpt_unknown_from_reaches_the_template(tokenizer):
    """A "from" value with no special meaning is the role as it is (as TRL converts it)."""
    rec = {
        "conversations": [
            {"from": "user", "value": "What is 3+4?"},
            {"from": "observation", "value": "x"},
            {"from": "assistant", "value": "7"},
        ]
    }
    ids, mask = tokenize_record(rec, tokenizer, ChatFormatter(tokenizer))
    messages = [{"role": m["from"], "content": m["value"]} for m in rec["conversations"]]
    assert ids == list(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])
    assert "observation" in tokenizer.decode(ids)
    assert masked_text(tokenizer, ids, mask) == ["7<|end|>"]


@pytest.mark.parametrize(
    "conversations, why",
    [
        ([{"from": "user", "value": "hi"}, {"from": None, "value": "yo"}], r"conversations\[1\]: 'from'"),
        ([{"from": "user", "value": "hi"}, {"from": 2, "value": "yo"}], r"conversations\[1\]: 'from'"),
        ([{"from": "user", "value": "hi"}, {"from": "assistant"}], r"conversations\[1\] must be an object"),
        ([{"from": "user", "value": "hi"}, "yo"], r"conversations\[1\] must be an object"),
        ("hi", r"'conversations' must be a non-empty list"),
        ([], r"'conversations' must be a non-empty list"),
    ],
)
def test_bad_sharegpt_records_name_the_line(tmp_path, tokenizer, conversations, why):
    p = _write(tmp_path / "s.jsonl", [_sharegpt(CHAT), {"conversations": conversations}])
    with pytest.raises(DataError, match=rf"s\.jsonl: 1 example\(s\) cannot be trained on: line 2: {why}"):
        load_examples(p, tokenizer, max_seq_len=128)


# ---------------------------------------------------------------------------------------------
# tool calls


def _chatml_bpe_tokenizer(eos="<|im_end|>"):
    """A byte-level BPE tokenizer with Qwen's special tokens (so Qwen's real template renders
    with its own turn markers)."""
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    corpus = ['What is 3+4? <tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text, not only the corpus's
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token="<|endoftext|>")


def _trl_template(name):
    """A chat template TRL ships (the model's own, byte for byte, or TRL's training variant)."""
    import trl  # noqa: F401

    return (resources.files("trl") / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            },
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "What is 3+4?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}],
    },
    {"role": "tool", "content": "7"},
    {"role": "assistant", "content": "3+4 is 7."},
]
TOOL_CALL_TEXT = '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>\n'


@pytest.mark.parametrize("shape", ["messages", "prompt_completion"])
def test_tool_call_with_null_content_qwen2_5(tmp_path, shape):
    """Qwen2.5's own template (as TRL ships it): the tool call turn, content null, is an assistant
    span like any other; the tokens are those TRL renders (the messages go to the template
    unchanged), and the mask is TRL's assistant mask (from its {% generation %} training variant of
    the template) less the newline after each assistant header, which is the generation prompt."""
    tok = _chatml_bpe_tokenizer()
    template = _trl_template("qwen2_5")
    if shape == "messages":
        rec = {"messages": TOOL_CHAT, "tools": TOOLS}
    else:
        rec = {"prompt": TOOL_CHAT[:1], "completion": TOOL_CHAT[1:], "tools": TOOLS}
    ids, mask = tokenize_record(rec, tok, ChatFormatter(tok, template))
    assert masked_text(tok, ids, mask) == [TOOL_CALL_TEXT, "3+4 is 7.<|im_end|>\n"]

    ref = tok.apply_chat_template(
        TOOL_CHAT,
        tools=TOOLS,
        chat_template=_trl_template("qwen2_5_training"),
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert ids == list(ref["input_ids"])
    out = tok.apply_chat_template(TOOL_CHAT, tools=TOOLS, chat_template=template, return_dict=True)
    assert ids == list(out["input_ids"])
    only_trl = [i for i, (m, r) in enumerate(zip(mask, ref["assistant_masks"])) if r and not m]
    assert not [i for i, (m, r) in enumerate(zip(mask, ref["assistant_masks"])) if m and not r]
    assert len(only_trl) == 2
    for i in only_trl:
        assert tok.decode(ids[i : i + 1]) == "\n"
        assert tok.decode(ids[: i + 1]).endswith("<|im_start|>assistant\n")

    # the same from a file, and with the training variant (its markers agree with the prefixes)
    ex, _ = load_examples(_write(tmp_path / "t.jsonl", [rec]), tok, max_seq_len=2048, chat_template=template)
    assert (ex[0].input_ids, ex[0].loss_mask) == (ids, mask)
    assert tokenize_record(rec, tok, ChatFormatter(tok, _trl_template("qwen2_5_training"))) == (ids, mask)


@pytest.mark.parametrize("shape", ["messages", "prompt_completion"])
def test_tool_call_without_content_key(tmp_path, shape):
    """OpenAI's fine-tuning files write a tool-call turn with no "content" key at all: it trains as
    the same turn with ``content: null`` (what TRL's SFTTrainer gets from such a file, the missing
    key read as null), and the record's messages are not changed."""
    tok = _chatml_bpe_tokenizer()
    chat = ChatFormatter(tok, _trl_template("qwen2_5"))
    no_key = copy.deepcopy(TOOL_CHAT)
    del no_key[1]["content"]
    if shape == "messages":
        rec, ref = {"messages": no_key, "tools": TOOLS}, {"messages": TOOL_CHAT, "tools": TOOLS}
    else:
        rec = {"prompt": no_key[:1], "completion": no_key[1:], "tools": TOOLS}
        ref = {"prompt": TOOL_CHAT[:1], "completion": TOOL_CHAT[1:], "tools": TOOLS}
    written = copy.deepcopy(rec)
    assert tokenize_record(rec, tok, chat) == tokenize_record(ref, tok, chat)
    assert rec == written
    ex, _ = load_examples(
        _write(tmp_path / "t.jsonl", [rec]), tok, max_seq_len=2048, chat_template=chat.template
    )
    assert (ex[0].input_ids, ex[0].loss_mask) == tokenize_record(ref, tok, chat)


@pytest.mark.parametrize(
    "message",
    [{"role": "assistant"}, {"role": "user", "tool_calls": TOOL_CHAT[1]["tool_calls"]}],
    ids=["assistant_no_calls", "user_with_calls"],
)
def test_message_without_content_key_needs_tool_calls(tmp_path, tokenizer, message):
    rec = {"messages": [CHAT[1], message, {"role": "assistant", "content": "7"}]}
    p = _write(tmp_path / "n.jsonl", [rec])
    with pytest.raises(DataError, match=r"line 1: messages\[1\] must be an object with 'role' and 'content'"):
        load_examples(p, tokenizer, max_seq_len=128)


# no generation prompt, content and tool calls side by side: the span starts after the role header
NO_GEN_PROMPT_TOOLS = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m['tool_calls'] or [] %}[call {{ c['function']['name'] }}]{% endfor %}{{ '\\n' }}{% endfor %}"
)


def test_tool_call_with_null_content_without_generation_prompt(tokenizer):
    ids, mask = tokenize_record(
        {"messages": TOOL_CHAT}, tokenizer, ChatFormatter(tokenizer, NO_GEN_PROMPT_TOOLS)
    )
    text = tokenizer.decode(ids)
    assert "assistant: [call add]\n" in text and "None" not in text
    assert masked_text(tokenizer, ids, mask) == ["[call add]\n", "3+4 is 7.\n"]


@pytest.mark.parametrize(
    "message, why",
    [
        ({"role": "assistant", "content": None}, r"messages\[1\]: 'content' is null"),
        ({"role": "assistant", "content": None, "tool_calls": []}, r"messages\[1\]: 'content' is null"),
        ({"role": "user", "content": None, "tool_calls": []}, r"messages\[1\]: 'content' is null"),
        ({"role": "assistant", "content": 7}, r"messages\[1\]: 'content' must be a string .*got 7"),
    ],
)
def test_null_content_needs_tool_calls(tmp_path, tokenizer, message, why):
    """Only an assistant message that calls tools may have no content (as in OpenAI's format)."""
    rec = {"messages": [CHAT[1], message, {"role": "assistant", "content": "7"}]}
    p = _write(tmp_path / "n.jsonl", [{"messages": CHAT}, rec])
    with pytest.raises(DataError, match=rf"n\.jsonl: 1 example\(s\) cannot be trained on: line 2: {why}"):
        load_examples(p, tokenizer, max_seq_len=128)


@pytest.mark.parametrize("name", ["phi3", "phi3_5"])
@pytest.mark.parametrize("turns", [5, 4, 3], ids=["two_answers", "user_last", "one_answer"])
def test_phi3_template_closing_eos(name, turns):
    """Phi-3's template ends a conversation rendered without a generation prompt with the EOS, so a
    conversation's beginning is not a prefix of the whole; it rewrites no turn, and the masks are
    TRL's (from its {% generation %} training variant): each turn up to its <|end|>, and the EOS
    after the last message when that message is the assistant's."""
    tok = _chatml_bpe_tokenizer(eos="<|endoftext|>")
    chat = CHAT[:turns]
    ids, mask = tokenize_record({"messages": chat}, tok, ChatFormatter(tok, _trl_template(name)))
    ref = tok.apply_chat_template(
        chat,
        chat_template=_trl_template(f"{name}_training"),
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert (ids, mask) == (list(ref["input_ids"]), list(ref["assistant_masks"]))
    expected = {
        5: ["7<|end|>\n", "10<|end|>\n<|endoftext|>"],
        4: ["7<|end|>\n"],
        3: ["7<|end|>\n<|endoftext|>"],
    }
    assert masked_text(tok, ids, mask) == expected[turns]


@pytest.mark.parametrize(
    "rec, why",
    [
        ({"messages": CHAT[1:3], "tools": [1]}, "Tools should either be a JSON schema"),
        ({"messages": CHAT[1:3], "tools": ['{"type": "function"}']}, "Tools should either be a JSON schema"),
        (
            {"messages": [CHAT[1], {"role": "assistant", "content": None, "tool_calls": ["add(3, 4)"]}]},
            "not JSON serializable",
        ),
    ],
    ids=["tools_int", "tools_json_strings", "tool_call_string"],
)
def test_conversation_the_template_cannot_render_names_the_line(tmp_path, rec, why):
    """transformers' ValueError (tools that are no schemas) and a filter's TypeError (tojson of a
    tool call that is a string) are bad examples listed with their line, not a traceback."""
    tok = _chatml_bpe_tokenizer()
    p = _write(tmp_path / "t.jsonl", [{"messages": CHAT[1:3]}, rec])
    with pytest.raises(DataError, match=rf"t\.jsonl: 1 example\(s\) cannot be trained on: line 2: .*{why}"):
        load_examples(p, tok, max_seq_len=512, chat_template=_trl_template("qwen2_5"))
    ex, rep = load_examples(p, tok, max_seq_len=512, chat_template=_trl_template("qwen2_5"), skip_bad=True)
    assert len(ex) == 1 and [ln for ln, _ in rep.invalid] == [2]


# (template, the reason its multi-turn error gives): Qwen3's drops the reasoning of earlier turns,
# DeepSeek-R1's generation prompt opens a "<think>" its rendered turns lack, GLM-4.5's closes no turn
_NO_PREFIX_TEMPLATES = [
    ("qwen3", r"differently once more messages follow \(it rewrites earlier turns", "<|im_end|>\n"),
    (
        "deepseek_r1_distill",
        r"its generation prompt '<｜Assistant｜><think>\\n' is not how it begins the turn",
        "<｜end▁of▁sentence｜>",
    ),
    (
        "glm4moe",
        r"renders nothing after the content of assistant message 2 .* would not learn to stop",
        "<|user|>",
    ),
]


@pytest.mark.parametrize("name, why, end", _NO_PREFIX_TEMPLATES, ids=[t[0] for t in _NO_PREFIX_TEMPLATES])
def test_templates_without_prefix_renders_need_generation_markers(tmp_path, name, why, end):
    """Multi-turn chats with templates whose renders of a conversation's beginnings cannot locate the
    assistant tokens (the models' own, byte for byte): an error naming the line and why, never a mask
    that misses an end-of-turn token; with TRL's training variant of the template (its {% generation
    %} markers), the tokens and mask are TRL's."""
    tok = _chatml_bpe_tokenizer()
    p = _write(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match=rf"c\.jsonl: 1 example\(s\) cannot be trained on: line 1: .*{why}"):
        load_examples(p, tok, max_seq_len=512, chat_template=_trl_template(name))
    training = _trl_template(f"{name}_training")
    ex, _ = load_examples(p, tok, max_seq_len=512, chat_template=training)
    ref = tok.apply_chat_template(
        CHAT, chat_template=training, return_dict=True, return_assistant_tokens_mask=True
    )
    assert (ex[0].input_ids, ex[0].loss_mask) == (list(ref["input_ids"]), list(ref["assistant_masks"]))
    spans = masked_text(tok, ex[0].input_ids, ex[0].loss_mask)
    assert len(spans) == 2 and all(s.endswith(end) for s in spans)


@pytest.mark.parametrize("shape", ["messages", "prompt_completion"])
def test_glm4_5_tool_call_turn_needs_generation_markers(shape):
    """GLM-4.5's template renders nothing after a turn's tool calls: the <|observation|> that ends
    such a turn is the header of the tool message that follows (none when the calls end the record).
    As for an answer, the error asks for {% generation %} markers rather than a mask that misses the
    end-of-turn token; with TRL's training variant the tokens and mask are TRL's, <|observation|>
    included."""
    tok = _chatml_bpe_tokenizer()
    rec = (
        {"messages": TOOL_CHAT[:3], "tools": TOOLS}
        if shape == "messages"
        else {"prompt": TOOL_CHAT[:1], "completion": TOOL_CHAT[1:2], "tools": TOOLS}
    )
    with pytest.raises(
        ExampleError,
        match=r"renders nothing after the tool calls of assistant message 1 .*\{% generation %\}",
    ):
        tokenize_record(rec, tok, ChatFormatter(tok, _trl_template("glm4moe")))
    training = _trl_template("glm4moe_training")
    ids, mask = tokenize_record(rec, tok, ChatFormatter(tok, training))
    messages = rec.get("messages") or rec["prompt"] + rec["completion"]
    ref = tok.apply_chat_template(
        messages, tools=TOOLS, chat_template=training, return_dict=True, return_assistant_tokens_mask=True
    )
    assert (ids, mask) == (list(ref["input_ids"]), list(ref["assistant_masks"]))
    assert masked_text(tok, ids, mask)[-1].endswith("</tool_call><|observation|>")


# ---------------------------------------------------------------------------------------------
# content as a list of parts (OpenAI / transformers' multimodal-style messages), text parts only


def _parts(messages, split=False):
    """The messages with each string content written as text parts (two parts when ``split``)."""
    out = []
    for m in messages:
        c = m["content"]
        texts = [c[:1], c[1:]] if split else [c]
        out.append({**m, "content": [{"type": "text", "text": t} for t in texts]})
    return out


@pytest.mark.parametrize("split", [False, True], ids=["one_part", "two_parts"])
@pytest.mark.parametrize("shape", ["messages", "prompt_completion"])
def test_text_parts_train_as_their_text(tmp_path, tokenizer, shape, split):
    """A template that reads content as a string gets the parts' text joined (not the list's
    Python text): the tokens and mask of the same chat written with string contents."""
    parts = _parts(CHAT, split)
    if shape == "messages":
        rec, ref = {"messages": parts}, {"messages": CHAT}
    else:
        rec, ref = (
            {"prompt": parts[:4], "completion": parts[4:]},
            {"prompt": CHAT[:4], "completion": CHAT[4:]},
        )
    written = copy.deepcopy(rec)
    chat = ChatFormatter(tokenizer)
    ids, mask = tokenize_record(rec, tokenizer, chat)
    assert (ids, mask) == tokenize_record(ref, tokenizer, chat)
    assert "type" not in tokenizer.decode(ids)
    assert rec == written
    ex, _ = load_examples(_write(tmp_path / "p.jsonl", [rec]), tokenizer, max_seq_len=128)
    assert (ex[0].input_ids, ex[0].loss_mask) == (ids, mask)


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_vl_training"])
def test_text_parts_reach_a_template_that_reads_parts(name):
    """A template that reads parts (Qwen3-VL's) gets them as written, as TRL passes them: the
    tokens are transformers' render of the record, the mask that of the string contents."""
    tok = _chatml_bpe_tokenizer()
    chat = ChatFormatter(tok, _trl_template(name))
    parts = _parts(CHAT[1:])
    ids, mask = tokenize_record({"messages": parts}, tok, chat)
    assert ids == list(
        tok.apply_chat_template(parts, chat_template=chat.template, return_dict=True)["input_ids"]
    )
    assert (ids, mask) == tokenize_record({"messages": CHAT[1:]}, tok, chat)
    assert masked_text(tok, ids, mask) == ["7<|im_end|>\n", "10<|im_end|>\n"]


def _trl_training_render(tok, messages, name):
    """transformers' render of ``messages`` with TRL's {% generation %} variant of template ``name``:
    its ids and assistant mask."""
    return tok.apply_chat_template(
        messages,
        chat_template=_trl_template(f"{name}_training"),
        return_dict=True,
        return_assistant_tokens_mask=True,
    )


def test_text_parts_with_a_template_that_reads_parts_only():
    """SmolVLM's template renders a content only when it is written as parts: the tokens and mask
    are TRL's (its {% generation %} training variant of the template)."""
    tok = _chatml_bpe_tokenizer()
    parts = _parts(CHAT[1:], split=True)
    ids, mask = tokenize_record({"messages": parts}, tok, ChatFormatter(tok, _trl_template("smolvlm")))
    ref = _trl_training_render(tok, parts, "smolvlm")
    assert (ids, mask) == (list(ref["input_ids"]), list(ref["assistant_masks"]))
    assert masked_text(tok, ids, mask) == [" 7<end_of_utterance>\n", " 10<end_of_utterance>\n"]


def test_text_parts_with_a_template_without_generation_prompt_that_reads_parts_only():
    """LLaVA-NeXT's template reads a content as parts only (``message['content'][0]['text']``) and has
    no generation prompt: the placeholder that finds where the content starts in the turn is written
    as parts too. The tokens are TRL's; the mask starts at the content (the space before it is the
    turn's header, as with any template without a generation prompt) and holds the space the turn ends
    with, where TRL's training variant of the template trains the first space and not the last."""
    tok = _chatml_bpe_tokenizer()
    parts = _parts(CHAT[1:])
    ids, mask = tokenize_record({"messages": parts}, tok, ChatFormatter(tok, _trl_template("llava_next")))
    ref = _trl_training_render(tok, parts, "llava_next")
    assert ids == list(ref["input_ids"])
    assert masked_text(tok, ids, mask) == ["7</s> ", "10</s> "]
    assert masked_text(tok, ref["input_ids"], ref["assistant_masks"]) == [" 7</s>", " 10</s>"]


@pytest.mark.parametrize(
    "content, why",
    [
        (
            [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x.png"}}],
            r"messages\[1\]: 'content' part 1 has type 'image_url'; only text parts",
        ),
        ([{"type": "image"}], r"messages\[1\]: 'content' part 0 has type 'image'; only text parts"),
        (["hi"], r"messages\[1\]: 'content' part 0 must be an object"),
        ([{"text": "hi"}], r"messages\[1\]: 'content' part 0 must be an object .*'type'"),
        ([{"type": "text", "text": 7}], r"messages\[1\]: 'content' part 0: 'text' must be a string, got 7"),
        ([{"type": "text"}], r"messages\[1\]: 'content' part 0: 'text' must be a string, got null"),
    ],
)
def test_bad_content_parts_name_the_line(tmp_path, tokenizer, content, why):
    rec = {"messages": [CHAT[0], {"role": "user", "content": content}, CHAT[2]]}
    p = _write(tmp_path / "m.jsonl", [{"messages": CHAT}, rec])
    with pytest.raises(DataError, match=rf"m\.jsonl: 1 example\(s\) cannot be trained on: line 2: {why}"):
        load_examples(p, tokenizer, max_seq_len=128)
    ex, rep = load_examples(p, tokenizer, max_seq_len=128, skip_bad=True)
    assert len(ex) == 1 and [ln for ln, _ in rep.invalid] == [2]
