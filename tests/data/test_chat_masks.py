"""Loss masks: completion / assistant turns with their end-of-turn token, for chat templates with
and without generation prompts or {% generation %} markers, and never silently empty."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hoptune.data import DataError, load_examples
from hoptune.data.formatting import (
    ChatFormatter,
    ExampleError,
    resolve_chat_template,
    tokenize_prompt_completion,
    tokenize_record,
    tokenize_text,
    truncate,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3+4?"},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "And 5+5?"},
    {"role": "assistant", "content": "10"},
]

NO_GEN_PROMPT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
WITH_GENERATION_TAGS = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}{% else %}{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# rewrites earlier assistant turns (as templates that strip reasoning do): prefixes are not prefixes
REWRITES = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "<|assistant|>...<|end|>{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
REWRITES_TAGGED = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "<|assistant|>...<|end|>{% elif m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}"
    "<|end|>{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def masked_text(tok, ids, mask):
    """The loss tokens, decoded span by span."""
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_tiny_template_without_markers(tokenizer):
    ids, mask = ChatFormatter(tokenizer).tokenize(CHAT)
    assert masked_text(tokenizer, ids, mask) == ["7<|end|>", "10<|end|>"]
    assert tokenizer.decode(ids).startswith("<s><|system|>Be brief.")


def test_template_without_generation_prompt(tokenizer):
    """No generation prompt: the role header is not trained, the content and the newline are."""
    ids, mask = ChatFormatter(tokenizer, NO_GEN_PROMPT).tokenize(CHAT)
    assert masked_text(tokenizer, ids, mask) == ["7\n", "10\n"]


def test_content_inside_the_role_header_is_not_trained(tokenizer):
    """No generation prompt, and the answer "A" also occurs in the header "### Assistant: ": the
    mask still starts at the content, for every answer alike."""
    template = "{% for m in messages %}### {{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    chat = ChatFormatter(tokenizer, template)
    for answer in ("A", "B", "t", "Assistant"):
        msgs = [{"role": "user", "content": "Pick one: A or B?"}, {"role": "assistant", "content": answer}]
        ids, mask = chat.tokenize(msgs)
        assert masked_text(tokenizer, ids, mask) == [answer + "\n"], answer


def test_a_template_that_changes_the_content_without_a_generation_prompt_is_refused(tokenizer):
    """No generation prompt, and the template upper-cases the content (so neither the content nor
    the placeholder is found in the turn): the mask fell back to the turn's start and trained the
    header "### Assistant: ". Now the example says why its assistant tokens cannot be located; the
    same template with {% generation %} markers trains the content alone."""
    upper = (
        "{% for m in messages %}### {{ m['role'] | capitalize }}: {{ m['content'] | upper }}\n{% endfor %}"
    )
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "yes"}]
    with pytest.raises(
        ExampleError, match="it changes the content of assistant message 1 as it renders it.*generation"
    ):
        ChatFormatter(tokenizer, upper).tokenize(msgs)
    tagged = (
        "{% for m in messages %}### {{ m['role'] | capitalize }}: {% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] | upper }}\n{% endgeneration %}{% else %}{{ m['content'] | upper }}\n"
        "{% endif %}{% endfor %}"
    )
    ids, mask = ChatFormatter(tokenizer, tagged).tokenize(msgs)
    assert masked_text(tokenizer, ids, mask) == ["YES\n"]


def test_chat_template_file_or_inline(tmp_path, tokenizer):
    path = tmp_path / "t.jinja"
    path.write_text(NO_GEN_PROMPT)
    assert resolve_chat_template(str(path)) == NO_GEN_PROMPT
    assert resolve_chat_template(NO_GEN_PROMPT) == NO_GEN_PROMPT
    # a mistyped path is an error naming the key, not a template that renders the path itself
    with pytest.raises(FileNotFoundError, match="model.chat_template='templates/chatml.jinja': no such file"):
        ChatFormatter(tokenizer, "templates/chatml.jinja")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_chat_template_file_with_a_byte_order_mark(tmp_path, tokenizer, encoding):
    """A template file saved with a byte-order mark (Windows editors, PowerShell's "> file" in
    UTF-16) renders as the same template: the mark is not text that every example would start with
    (before the BOS)."""
    path = tmp_path / "t.jinja"
    path.write_bytes(tokenizer.chat_template.encode(encoding))
    assert resolve_chat_template(str(path)) == tokenizer.chat_template
    assert ChatFormatter(tokenizer, str(path)).tokenize(CHAT) == ChatFormatter(tokenizer).tokenize(CHAT)
    path.write_bytes(NO_GEN_PROMPT.replace("\n", "\r\n").encode(encoding))  # and Windows line ends
    assert resolve_chat_template(str(path)) == NO_GEN_PROMPT


def test_chat_template_file_that_is_not_text_names_the_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_bytes(b"{{ bos_token }}caf\xe9")  # Latin-1
    with pytest.raises(
        ValueError, match=r"model.chat_template='.*t\.jinja' is not UTF-8 text .*save it as UTF-8"
    ):
        resolve_chat_template(str(path))


def test_generation_tags_agree_with_transformers(tokenizer):
    ids, mask = ChatFormatter(tokenizer, WITH_GENERATION_TAGS).tokenize(CHAT)
    ref = tokenizer.apply_chat_template(
        CHAT,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        chat_template=WITH_GENERATION_TAGS,
    )
    assert ids == list(ref["input_ids"])
    assert mask == list(ref["assistant_masks"])


def test_template_that_rewrites_turns(tokenizer):
    with pytest.raises(ExampleError, match=r"\{% generation %\}"):
        ChatFormatter(tokenizer, REWRITES).tokenize(CHAT)
    # a single-turn chat is fine with it, and markers rescue the multi-turn one
    ids, mask = ChatFormatter(tokenizer, REWRITES).tokenize(CHAT[:3])
    assert masked_text(tokenizer, ids, mask) == ["7<|end|>"]
    ids, mask = ChatFormatter(tokenizer, REWRITES_TAGGED).tokenize(CHAT)
    assert masked_text(tokenizer, ids, mask) == ["10<|end|>"]


# nothing closes an assistant turn: the next message's header ends it (as GLM-4.5's template does)
UNCLOSED = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# as TRL's training variant of GLM-4.5's: the turn ends with the header that follows it, in its markers
UNCLOSED_TAGGED = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
    "{{ m['content'] }}<|user|>{% endgeneration %}{% else %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'assistant' %}<|{{ m['role'] }}|>{% endif %}"
    "{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("chat", [CHAT, CHAT[1:3]], ids=["two_answers", "one_answer"])
def test_template_that_closes_no_turn_is_an_error(tmp_path, tokenizer, chat):
    """A template that renders nothing after an assistant message's content would leave every
    end-of-turn token out of the loss (the model would not learn to stop): an error naming the line,
    not a mask that ends at the content. A template that ends the turn with the next header is fine."""
    with pytest.raises(ExampleError, match=r"renders nothing after the content of assistant message \d"):
        ChatFormatter(tokenizer, UNCLOSED).tokenize(chat)
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": chat}) + "\n")
    with pytest.raises(
        DataError, match=r"c\.jsonl: 1 example\(s\) cannot be trained on: line 1: .*end-of-turn"
    ):
        load_examples(str(p), tokenizer, max_seq_len=128, chat_template=UNCLOSED)
    ids, mask = ChatFormatter(tokenizer, UNCLOSED_TAGGED).tokenize(chat)
    ref = tokenizer.apply_chat_template(
        chat, chat_template=UNCLOSED_TAGGED, return_dict=True, return_assistant_tokens_mask=True
    )
    assert (ids, mask) == (list(ref["input_ids"]), list(ref["assistant_masks"]))
    assert masked_text(tokenizer, ids, mask)[-1].endswith("<|user|>")
    # an empty answer or one that ends like the turn does is no such template
    for answer in ("", "<|end|>", "7\n"):
        msgs = [*CHAT[1:2], {"role": "assistant", "content": answer}]
        ids, mask = ChatFormatter(tokenizer).tokenize(msgs)
        assert masked_text(tokenizer, ids, mask)[-1].endswith("<|end|>")


# the generation prompt opens a reasoning block the rendered turn does not have (as DeepSeek-R1
# distills' templates do): the prompt rendered alone is not a prefix of the conversation
THINK_PROMPT_TAGGED = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}{% else %}{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


def test_prompt_completion_when_the_generation_prompt_is_not_a_prefix(tokenizer):
    """The completion starts where the tokenized prompt and the whole conversation diverge (as
    TRL's common prefix), not after as many tokens as the prompt has: the answer keeps its first
    tokens in the loss."""
    chat = ChatFormatter(tokenizer, THINK_PROMPT_TAGGED)
    rec = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    cut = []
    ids, mask = tokenize_record(rec, tokenizer, chat, prompt_cut=cut)
    assert masked_text(tokenizer, ids, mask) == ["10<|end|>"]
    assert cut == ["<think>\n"]  # the generation prompt's end, which the rendered turn lacks
    cut = []
    ChatFormatter(tokenizer, WITH_GENERATION_TAGS).tokenize(CHAT, 4, prompt_cut=cut)
    assert cut == []
    rec = {"prompt": CHAT[:2], "completion": CHAT[2:]}
    ids, mask = tokenize_record(rec, tokenizer, chat)
    assert masked_text(tokenizer, ids, mask) == ["7<|end|>", "10<|end|>"]


def test_no_generation_markers_error_suggests_what_the_record_can_change(tokenizer):
    """Assistant tokens that cannot be located without {% generation %} markers: the error's way
    out fits the record. A conversational prompt/completion record fails the same way, so it is
    told to write prompt and completion as strings, not to use prompt/completion data."""
    template = THINK_PROMPT_TAGGED.replace("{% generation %}", "")
    chat = ChatFormatter(tokenizer, template.replace("{% endgeneration %}", ""))
    with pytest.raises(ExampleError, match=r"prompt '<\|assistant\|><think>\\n'.* or use prompt/"):
        tokenize_record({"messages": CHAT}, tokenizer, chat)
    with pytest.raises(ExampleError) as e:
        tokenize_record({"prompt": CHAT[:2], "completion": CHAT[2:]}, tokenizer, chat)
    msg = str(e.value)
    assert "generation prompt '<|assistant|><think>\\n'" in msg
    assert "use prompt/completion data" not in msg
    assert "write 'prompt' and 'completion' as strings" in msg


TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}<|end|>"
    "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("as_json", [False, True])
def test_tools_are_rendered(tokenizer, as_json):
    """A record's "tools" reach the chat template (as TRL passes them; a JSON string too)."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    rec = {"messages": CHAT[1:3], "tools": json.dumps(tools) if as_json else tools}
    ids, mask = tokenize_record(rec, tokenizer, ChatFormatter(tokenizer, TOOLS_TEMPLATE))
    assert ids == list(
        tokenizer.apply_chat_template(CHAT[1:3], tools=tools, chat_template=TOOLS_TEMPLATE, return_dict=True)[
            "input_ids"
        ]
    )
    assert tokenizer.decode(ids).startswith("<s><|system|>add;<|end|>")
    assert masked_text(tokenizer, ids, mask) == ["7<|end|>"]
    rec = {"prompt": CHAT[1:2], "completion": CHAT[2:3], "tools": rec["tools"]}
    assert tokenize_record(rec, tokenizer, ChatFormatter(tokenizer, TOOLS_TEMPLATE)) == (ids, mask)


@pytest.mark.parametrize("tools", [[], "[]"])
def test_an_empty_tools_list_reaches_the_template_as_trl_passes_it(tokenizer, tools):
    # TRL's SFTTrainer gives a record's tools to apply_chat_template as they are: a template that
    # tests `tools is not none` (Llama 3.1's) renders its tool preamble for an empty list too
    template = (
        "{{ bos_token }}{% if tools is not none %}<|system|>tools: {{ tools | length }}<|end|>{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    ids, mask = tokenize_record(
        {"messages": CHAT[1:3], "tools": tools}, tokenizer, ChatFormatter(tokenizer, template)
    )
    want = tokenizer.apply_chat_template(CHAT[1:3], tools=[], chat_template=template, return_dict=True)
    assert ids == list(want["input_ids"]) and tokenizer.decode(ids).startswith("<s><|system|>tools: 0<|end|>")
    assert masked_text(tokenizer, ids, mask) == ["7<|end|>"]


# reads a switch from the record's chat_template_kwargs, as Qwen3's enable_thinking: off, the generation
# prompt and every assistant turn open with an empty reasoning block
THINK_SWITCH = (
    "{{ bos_token }}{% set off = enable_thinking is defined and not enable_thinking %}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% if off %}<think></think>{% endif %}{% generation %}"
    "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% if off %}<think></think>{% endif %}{% endif %}"
)
# the same, rewriting earlier assistant turns: the {% generation %} markers are used
THINK_SWITCH_REWRITES = THINK_SWITCH.replace(
    "{% if m['role'] == 'assistant' %}",
    "{% if m['role'] == 'assistant' and not loop.last %}<|assistant|>...<|end|>"
    "{% elif m['role'] == 'assistant' %}",
)


def _trl_reference(rec, tok, template):
    """(input_ids, loss mask) as TRL's SFTTrainer computes them with assistant_only_loss: the record's
    chat_template_kwargs spread into every apply_chat_template call, the completion from where the
    prompt's tokens and the conversation's diverge."""
    kwargs = {"chat_template": template, "tools": None, **rec.get("chat_template_kwargs", {})}
    msgs = rec["prompt"] + rec["completion"] if "prompt" in rec else rec["messages"]
    out = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True, **kwargs)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if "prompt" in rec:
        p = tok.apply_chat_template(rec["prompt"], return_dict=True, add_generation_prompt=True, **kwargs)
        n = 0
        while n < min(len(p["input_ids"]), len(ids)) and p["input_ids"][n] == ids[n]:
            n += 1
        mask = [0] * n + mask[n:]
    return ids, mask


@pytest.mark.parametrize("template", [THINK_SWITCH, THINK_SWITCH_REWRITES])
@pytest.mark.parametrize("shape", ["messages", "prompt_completion"])
def test_chat_template_kwargs_are_rendered(tokenizer, template, shape):
    """A record's "chat_template_kwargs" reach every render of its template, as TRL passes them."""
    kwargs = {"enable_thinking": False}
    rec = {"messages": CHAT} if shape == "messages" else {"prompt": CHAT[:2], "completion": CHAT[2:]}
    rec["chat_template_kwargs"] = kwargs
    ids, mask = tokenize_record(rec, tokenizer, ChatFormatter(tokenizer, template))
    assert (ids, mask) == _trl_reference(rec, tokenizer, template)
    assert "<|assistant|><think></think>10<|end|>" in tokenizer.decode(ids)
    assert masked_text(tokenizer, ids, mask)[-1] == "10<|end|>"  # the empty reasoning block is prompt
    rec["chat_template_kwargs"] = {"enable_thinking": True}
    assert "<think>" not in tokenizer.decode(
        tokenize_record(rec, tokenizer, ChatFormatter(tokenizer, template))[0]
    )


@pytest.mark.parametrize(
    "value, match",
    [
        ('{"enable_thinking": false}', "'chat_template_kwargs' must be an object .* got str"),
        ([["enable_thinking", False]], "'chat_template_kwargs' must be an object .* got list"),
        ({"add_generation_prompt": True}, "'chat_template_kwargs' cannot set 'add_generation_prompt'"),
    ],
)
def test_bad_chat_template_kwargs(tokenizer, value, match):
    rec = {"messages": CHAT[1:3], "chat_template_kwargs": value}
    with pytest.raises(ExampleError, match=match):
        tokenize_record(rec, tokenizer, ChatFormatter(tokenizer, THINK_SWITCH))


def test_no_chat_template_is_a_clear_error(tmp_path, tokenizer):
    tokenizer.chat_template = None
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(DataError, match="no chat template.*model.chat_template"):
        load_examples(str(p), tokenizer, max_seq_len=128)


def _bpe_tokenizer():
    """A byte-level BPE tokenizer with multi-character tokens and Llama-3-style headers."""
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]
    corpus = [
        "What is the answer to the question? The answer is forty two.",
        "Hello there, how are you?",
    ] * 50
    tk.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False)
    )
    template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        chat_template=template,
    )


def test_llama3_style_bpe():
    tok = _bpe_tokenizer()
    chat = [
        {"role": "user", "content": "What is the answer?"},
        {"role": "assistant", "content": "The answer is forty two."},
    ]
    ids, mask = ChatFormatter(tok).tokenize(chat)
    assert masked_text(tok, ids, mask) == ["The answer is forty two.<|eot_id|>"]
    # the mask starts exactly where the generation prompt ends
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert mask.index(1) == n


def test_a_token_straddling_the_answers_start_is_trained():
    """A token made of the template's space and the answer's first letters ("Ġanswer") is the
    answer's first token: it is predicted when the answer starts, so it is in the loss."""
    tok = _bpe_tokenizer()
    chat = [
        {"role": "user", "content": "What is the answer?"},
        {"role": "assistant", "content": "answer is forty two."},
    ]
    ids, mask = ChatFormatter(tok, NO_GEN_PROMPT).tokenize(chat)
    first = mask.index(1)
    assert tok.convert_ids_to_tokens(ids[first]) == "Ġanswer"
    assert masked_text(tok, ids, mask) == [" answer is forty two."]


@pytest.mark.parametrize(
    "prompt, completion, trained",
    [
        # "for" + "ty" merge into "Ġforty": the completion starts at that token, not after the
        # prompt's own 5 tokens (which would drop "Ġforty" from the loss)
        ("The answer is for", "ty two.", ["Ġforty", "Ġtwo", ".", "<|eot_id|>"]),
        ("The ans", "wer is forty two.", ["Ġanswer", "Ġis", "Ġforty", "Ġtwo", ".", "<|eot_id|>"]),
        ("Hello there, how are", " you?", ["Ġyou", "?", "<|eot_id|>"]),
    ],
)
def test_prompt_completion_merging_across_the_boundary(prompt, completion, trained):
    """Tokens that merge across the prompt's end: the completion starts where the tokenized prompt
    and prompt + completion diverge, as TRL's SFT tokenization (trl.data_utils.common_prefix_length)."""
    from trl.data_utils import common_prefix_length

    tok = _bpe_tokenizer()
    cut = []
    ids, mask = tokenize_prompt_completion(tok, prompt, completion, prompt_cut=cut)
    assert [t for t, m in zip(tok.convert_ids_to_tokens(ids), mask) if m] == trained
    # what the prompt alone tokenizes to beyond the common prefix (TRL warns of it)
    assert cut == {"The answer is for": [" for"], "The ans": [" ans"]}.get(prompt, [])
    assert mask == sorted(mask)  # one span, to the end
    full = tok(prompt + completion)["input_ids"]
    n = common_prefix_length(tok(prompt)["input_ids"], full)
    assert ids[: len(full)] == full and mask[: len(full)] == [0] * n + [1] * (len(full) - n)


def test_the_data_report_names_prompts_that_are_not_a_prefix(tmp_path):
    """load_examples' report (the line hoptune sft prints per file) counts the records whose prompt,
    tokenized alone, is not a prefix of their tokens, and shows the first three with their lines."""
    tok = _bpe_tokenizer()
    recs = [
        {"prompt": "The answer is for", "completion": "ty two."},
        {"prompt": "Hello there, how are", "completion": " you?"},
        {"prompt": "The ans", "completion": "wer is forty two."},
    ]
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    examples, report = load_examples(str(path), tok, max_seq_len=64)
    assert len(examples) == 3 and report.prompt_cut == [(1, " for"), (3, " ans")]
    assert "2 prompts not a prefix of the tokens of prompt + completion (line 1: ' for'; line 3: ' ans'" in (
        report.summary()
    )
    path.write_text(json.dumps(recs[1]) + "\n")
    assert "prefix" not in load_examples(str(path), tok, max_seq_len=64)[1].summary()


def test_prompt_completion_keeps_eos_in_loss(tokenizer):
    ids, mask = tokenize_prompt_completion(tokenizer, "3+4=", "7")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "3", "+", "4", "=", "7", "</s>"]
    assert mask == [0, 0, 0, 0, 0, 1, 1]


def test_text_rendered_by_a_chat_template_gets_one_bos(tokenizer):
    """Text that already starts with BOS (e.g. a conversation rendered with the chat template into
    "text" or "prompt") is not given a second one: inference sees one BOS, and so must training."""
    bos = tokenizer.bos_token_id
    text = tokenizer.apply_chat_template(CHAT[1:3], tokenize=False)
    assert text.startswith(tokenizer.bos_token)
    ids, mask = tokenize_record({"text": text}, tokenizer)
    assert ids[:2] != [bos, bos]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    prompt = tokenizer.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    ids, mask = tokenize_record({"prompt": prompt, "completion": "7<|end|>"}, tokenizer)
    assert ids[:2] != [bos, bos]
    assert masked_text(tokenizer, ids, mask) == ["7<|end|></s>"]
    # a BOS written twice stays as written; text without one gets the tokenizer's
    one = tokenizer.convert_tokens_to_ids("1")
    assert tokenize_record({"text": "<s><s>1"}, tokenizer)[0][:3] == [bos, bos, one]
    assert tokenize_record({"text": "1"}, tokenizer)[0][:2] == [bos, one]


def test_conversational_prompt_completion(tokenizer):
    rec = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    ids, mask = tokenize_record(rec, tokenizer, ChatFormatter(tokenizer))
    assert masked_text(tokenizer, ids, mask) == ["10<|end|>"]


def test_text_records_train_every_token(tokenizer):
    ids, mask = tokenize_record({"text": "1+1=2"}, tokenizer)
    assert sum(mask) == len(ids) and ids[-1] == tokenizer.eos_token_id


def test_example_without_loss_token_is_an_error(tmp_path, tokenizer):
    rows = [
        {"prompt": "a long prompt " * 5, "completion": "x"},  # completion cut by right truncation
        {"prompt": "ok", "completion": "fine"},
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
        },  # only <|end|>
    ]
    p = tmp_path / "e.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        load_examples(str(p), tokenizer, max_seq_len=20)
    msg = str(e.value)
    assert "2 example(s) cannot be trained on" in msg
    assert "line 1: truncation to data.max_seq_len=20" in msg and "line 3: no assistant message" in msg
    ex, rep = load_examples(str(p), tokenizer, max_seq_len=20, skip_bad=True)
    assert len(ex) == 2 and [ln for ln, _ in rep.no_loss] == [1] and [ln for ln, _ in rep.invalid] == [3]
    assert all(e.num_loss_tokens > 0 for e in ex)
    # an empty assistant message still trains its end-of-turn token
    assert ex[1].num_loss_tokens == 1
    # keeping the end instead keeps the completion
    ex, rep = load_examples(str(p), tokenizer, max_seq_len=20, truncation="left", skip_bad=True)
    assert len(ex) == 3 and rep.truncated == 1


def test_report_counts_as_truncated_only_the_examples_kept(tmp_path, tokenizer):
    """An example whose loss tokens truncation cut is counted as skipped (no loss token), not also
    as truncated: the summary's counts add up to what happened to each line."""
    rows = [
        {"prompt": "a long prompt " * 5, "completion": "x"},  # truncation cuts the completion
        {"prompt": "3+4=", "completion": "7 " * 20},  # truncated, kept
        {"prompt": "ok", "completion": "fine"},
    ]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex, rep = load_examples(str(p), tokenizer, max_seq_len=20, skip_bad=True)
    assert len(ex) == 2 and [ln for ln, _ in rep.no_loss] == [1]
    assert rep.truncated == 1, rep.summary()
    assert "2 examples" in rep.summary() and "; 1 truncated;" in rep.summary()


# refuses conversations whose roles do not alternate, as Llama-2 / Mistral templates do
ALTERNATING = (
    "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_template_that_refuses_a_conversation_names_the_line(tmp_path, tokenizer):
    """A template's raise_exception() is a problem of that example: listed with its line, and
    skipped with skip_bad (not a crash)."""
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": ok}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(DataError, match="line 2: the chat template refused .*roles must alternate"):
        load_examples(str(p), tokenizer, max_seq_len=128, chat_template=ALTERNATING)
    ex, rep = load_examples(str(p), tokenizer, max_seq_len=128, chat_template=ALTERNATING, skip_bad=True)
    assert len(ex) == 1 and [ln for ln, _ in rep.invalid] == [2]


# refuses a conversation without a user message (as Qwen3.5's and Qwen3.6's templates do)
NEEDS_A_USER = (
    "{% if messages | selectattr('role', 'equalto', 'user') | list | length == 0 %}"
    "{{ raise_exception('No user query found in messages.') }}{% endif %}"
)


def test_a_beginning_the_template_refuses_is_not_a_refusal_of_the_conversation(tokenizer):
    """A conversation that opens with the assistant's greeting renders whole, but its beginning up to
    the greeting holds no user message, and the template refuses that: with {% generation %} markers
    the markers give the mask (transformers' and TRL's); without them the error names the beginning
    that was refused and asks for markers (it is not the conversation that the template refuses)."""
    chat = [CHAT[0], {"role": "assistant", "content": "Hi!"}, *CHAT[1:3]]
    tagged = NEEDS_A_USER + WITH_GENERATION_TAGS
    ids, mask = ChatFormatter(tokenizer, tagged).tokenize(chat)
    ref = tokenizer.apply_chat_template(
        chat, chat_template=tagged, return_dict=True, return_assistant_tokens_mask=True
    )
    assert (ids, mask) == (list(ref["input_ids"]), list(ref["assistant_masks"]))
    assert masked_text(tokenizer, ids, mask) == ["Hi!<|end|>", "7<|end|>"]
    with pytest.raises(
        ExampleError,
        match=r"refuses the conversation's beginning messages\[:1\] \(No user query found in messages\.\), "
        r"though it renders the whole conversation; add \{% generation %\}",
    ):
        ChatFormatter(tokenizer, NEEDS_A_USER + tokenizer.chat_template).tokenize(chat)


def test_template_with_a_syntax_error_is_one_error(tmp_path, tokenizer):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": CHAT}) + "\n")
    bad = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template \(model.chat_template\) is not valid"):
        load_examples(str(p), tokenizer, max_seq_len=128, chat_template=bad)
    tokenizer.chat_template = bad  # the tokenizer's own
    with pytest.raises(DataError, match="the tokenizer's chat template is not valid Jinja"):
        load_examples(str(p), tokenizer, max_seq_len=128, skip_bad=True)


@pytest.mark.parametrize("record", [{"prompt": "ab", "completion": "cd"}, {"messages": CHAT}])
def test_a_config_template_with_a_syntax_error_is_refused_before_the_data(
    tmp_path, tokenizer, monkeypatch, record
):
    """model.chat_template that is not valid Jinja went through a run without chat records (and
    was saved with the adapter, where apply_chat_template then failed); with chat records it was
    found at the first one, after the lines before it. Now it is one error before any line is read."""
    from hoptune.config import ConfigError, load_config
    from hoptune.train import sft

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(record) + "\n")
    cfg = load_config(None, [f"data.train={p}", "data.eval=null", "model.chat_template={{%bad"])
    monkeypatch.setattr(sft, "load_examples", lambda *a, **k: pytest.fail("read the data first"))
    with pytest.raises(
        ConfigError,
        match=r"^the chat template \(model.chat_template\) is not valid Jinja: .*\(template line 1\)$",
    ):
        sft.load_data(cfg, tokenizer, log=lambda *_: None)


def test_named_chat_templates_of_the_tokenizer(tmp_path, tokenizer):
    """A tokenizer may hold named templates (Command R, Hermes 2 Pro: "default", "tool_use"): a
    record takes the one transformers picks (so TRL's), "tool_use" when it has tools."""
    default = tokenizer.chat_template
    assert default.startswith("{{ bos_token }}")
    tool_use = default.replace(
        "{{ bos_token }}", "{{ bos_token }}<|system|>tools: {{ tools | length }}<|end|>", 1
    )
    tokenizer.chat_template = {"default": default, "tool_use": tool_use}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT[1:3], "tools": tools}]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex, _ = load_examples(str(p), tokenizer, max_seq_len=256)
    for e, rec in zip(ex, rows):
        want = tokenizer.apply_chat_template(rec["messages"], tools=rec.get("tools"), return_dict=True)
        assert e.input_ids == list(want["input_ids"])
        assert masked_text(tokenizer, e.input_ids, e.loss_mask) == ["7<|end|>"]
    assert "tools: 1" in tokenizer.decode(ex[1].input_ids)
    assert "tools" not in tokenizer.decode(ex[0].input_ids)

    tokenizer.chat_template = {"tool_use": tool_use, "rag": default}
    with pytest.raises(DataError, match="named rag, tool_use, none of them 'default'"):
        load_examples(str(p), tokenizer, max_seq_len=256)


def test_empty_completion_trains_the_eos(tmp_path, tokenizer):
    """An empty completion trains the EOS alone (TRL appends the EOS to the completion), e.g. a
    prompt the model should answer by stopping; without add_eos it has no loss token."""
    ids, mask = tokenize_record({"prompt": "3+4=", "completion": ""}, tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "3", "+", "4", "=", "</s>"]
    assert mask == [0, 0, 0, 0, 0, 1]
    p = tmp_path / "e.jsonl"
    p.write_text(json.dumps({"prompt": "3+4=", "completion": ""}) + "\n")
    ex, _ = load_examples(str(p), tokenizer, max_seq_len=20)
    assert (ex[0].input_ids, ex[0].loss_mask) == (ids, mask)
    with pytest.raises(DataError, match="line 1: no token is in the loss"):
        load_examples(str(p), tokenizer, max_seq_len=20, add_eos=False)


def test_empty_completion_after_a_prompt_ending_with_the_eos_trains_an_eos(tmp_path, tokenizer):
    """A prompt that ends with the EOS text and an empty completion: the EOS is appended to the
    completion (TRL appends it to a completion text that does not end with it), not taken to be there
    already because the prompt's last token is an EOS."""
    rec = {"prompt": "3+4=" + tokenizer.eos_token, "completion": ""}
    ids, mask = tokenize_record(rec, tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "3", "+", "4", "=", "</s>", "</s>"]
    assert mask == [0, 0, 0, 0, 0, 0, 1]
    p = tmp_path / "e.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    ex, _ = load_examples(str(p), tokenizer, max_seq_len=20)
    assert (ex[0].input_ids, ex[0].loss_mask) == (ids, mask)


def test_null_fields_are_absent(tmp_path, tokenizer):
    """A file written from a table of mixed records (pandas' to_json, datasets' to_json) holds every
    column in every line, null where a record has none: a null field is absent, as TRL reads it, so
    each record trains as the record without its nulls."""
    records = [
        {"messages": CHAT},
        {"conversations": [{"from": m["role"], "value": m["content"]} for m in CHAT]},
        {"prompt": "3+4=", "completion": "7"},
        {"text": "1+1=2"},
    ]
    keys = ["messages", "conversations", "prompt", "completion", "text", "tools"]
    p = tmp_path / "n.jsonl"
    p.write_text("".join(json.dumps({k: r.get(k) for k in keys}) + "\n" for r in records))
    ex, _ = load_examples(str(p), tokenizer, max_seq_len=128)
    chat = ChatFormatter(tokenizer)
    assert [(e.input_ids, e.loss_mask) for e in ex] == [tokenize_record(r, tokenizer, chat) for r in records]

    p.write_text(json.dumps({"prompt": "3+4=", "completion": None, "messages": None}) + "\n")
    with pytest.raises(DataError, match=r"line 1: missing field 'completion' \(fields present: prompt; null"):
        load_examples(str(p), tokenizer, max_seq_len=128)


def test_an_eos_the_data_already_ends_with_is_not_added_again(tokenizer):
    # as TRL, which appends the EOS only to a text that does not end with it
    eos = tokenizer.eos_token_id
    ids, mask = tokenize_prompt_completion(tokenizer, "2+2=", " 4" + tokenizer.eos_token)
    assert ids[-1] == eos and ids[-2] != eos and mask[-1] == 1
    assert tokenize_prompt_completion(tokenizer, "2+2=", " 4") == (ids, mask)
    text_ids, text_mask = tokenize_text(tokenizer, "a row" + tokenizer.eos_token)
    assert text_ids[-1] == eos and text_ids[-2] != eos
    assert tokenize_text(tokenizer, "a row") == (text_ids, text_mask)


@pytest.mark.parametrize(
    "record, match",
    [
        ({"text": ""}, "'text' must be a non-empty string"),
        (
            {"prompt": CHAT[1:2], "completion": [{"role": "user", "content": "and?"}]},
            "the completion has no assistant message, so nothing to train on",
        ),
    ],
)
def test_records_with_nothing_to_train_on_are_named(tokenizer, record, match):
    with pytest.raises(ExampleError, match=match):
        tokenize_record(record, tokenizer, ChatFormatter(tokenizer))


def test_truncation_takes_right_or_left_only():
    assert truncate([1, 2, 3], [0, 1, 1], 2, "left") == ([2, 3], [1, 1])
    with pytest.raises(ValueError, match="truncation must be 'right' or 'left', got 'middle'"):
        truncate([1, 2, 3], [0, 1, 1], 2, "middle")
