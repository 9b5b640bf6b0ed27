"""model.chat_template naming one of the tokenizer's named chat templates (a tokenizer whose
chat_template is a dict, as Command R's): picked by name as transformers' get_chat_template picks
it, and a name that matches none is an error listing the names, not a template of its own."""

import json

import pytest

from hoptune.config import ConfigError, check_sft_config, load_config
from hoptune.data import load_examples
from hoptune.data.formatting import ChatFormatter, ExampleError, resolve_chat_template
from hoptune.train.sft import load_data

CHAT = [{"role": "user", "content": "What is 3+4?"}, {"role": "assistant", "content": "7"}]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


@pytest.fixture
def named(tokenizer):
    """The tiny tokenizer with named templates: "default" (its own), "tool_use" (a header with the
    number of tools) and "rag" (a header of its own)."""
    default = tokenizer.chat_template
    head = "{{ bos_token }}"
    assert default.startswith(head)
    tools = "<|system|>tools: {{ (tools or []) | length }}<|end|>"
    tool_use = default.replace(head, head + tools, 1)
    rag = default.replace(head, head + "<|system|>documents<|end|>", 1)
    tokenizer.chat_template = {"default": default, "tool_use": tool_use, "rag": rag}
    return tokenizer


def _jsonl(tmp_path, rows):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


ROWS = [{"messages": CHAT}, {"messages": CHAT, "tools": TOOLS}]


@pytest.mark.parametrize("name", ["tool_use", "rag", "default"])
def test_a_name_selects_that_template_for_every_record(tmp_path, named, name):
    """As apply_chat_template(chat_template=name): the named template renders every record, one
    with tools too (a name given, transformers does not switch to "tool_use")."""
    assert resolve_chat_template(name, named) == named.chat_template[name]
    ex, _ = load_examples(_jsonl(tmp_path, ROWS), named, max_seq_len=256, chat_template=name)
    for e, rec in zip(ex, ROWS):
        want = named.apply_chat_template(
            rec["messages"], tools=rec.get("tools"), chat_template=name, return_dict=True
        )
        assert e.input_ids == list(want["input_ids"])
        assert named.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m]) == "7<|end|>"
    texts = [named.decode(e.input_ids) for e in ex]
    assert all(("tools: " in t) == (name == "tool_use") for t in texts)
    assert all(("documents" in t) == (name == "rag") for t in texts)


def test_a_name_comes_before_a_file_of_that_name(tmp_path, monkeypatch, named):
    """transformers looks the value up among the names first; so does hoptune."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rag").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve_chat_template("rag", named) == named.chat_template["rag"]
    # a file that is no name is still read
    assert resolve_chat_template("rag", None).startswith("{% for m in messages %}")


def test_a_name_without_a_default_template(named):
    """Without "default" the tokenizer's templates need a name, which then works."""
    named.chat_template = {k: v for k, v in named.chat_template.items() if k != "default"}
    with pytest.raises(ExampleError, match="'default'; set model.chat_template to the name"):
        ChatFormatter(named)
    ids, _ = ChatFormatter(named, "rag").tokenize(CHAT)
    want = named.apply_chat_template(CHAT, chat_template="rag", return_dict=True)
    assert ids == list(want["input_ids"]) and "documents" in named.decode(ids)


@pytest.mark.parametrize("value", ["tool-use", "tooluse", "Default", "chatml.jinja"])
def test_a_name_that_matches_none_lists_the_names(tmp_path, monkeypatch, named, value):
    """Not rendered as a template that prints the name itself (what transformers does)."""
    monkeypatch.chdir(tmp_path)
    want = (
        rf"model.chat_template='{value}': no chat template of the tokenizer has that name "
        r"\(its names: default, rag, tool_use\)"
    )
    with pytest.raises(ValueError, match=want):
        resolve_chat_template(value, named)
    with pytest.raises(ValueError, match=want):
        load_examples(_jsonl(tmp_path, ROWS), named, max_seq_len=256, chat_template=value)


def test_a_name_with_a_tokenizer_of_one_template(tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'tool_use': no such file .*no named chat"):
        ChatFormatter(tokenizer, "tool_use")


def _cfg(tmp_path, template):
    train = _jsonl(tmp_path, ROWS)
    return load_config(None, [f"data.train={train}", f"model.chat_template={template}"])


def test_the_config_option_takes_a_name(tmp_path, monkeypatch, named):
    """The config check lets a name through (it has no tokenizer yet); the data step picks it, and
    a name that matches none is a ConfigError listing the names."""
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, "tool_use")
    check_sft_config(cfg)
    rows, _, _ = load_data(cfg, named, log=lambda *_: None)
    assert all("tools: " in named.decode(r.input_ids) for r in rows)

    cfg = _cfg(tmp_path, "tool_usage")
    check_sft_config(cfg)
    with pytest.raises(ConfigError, match=r"'tool_usage': .*\(its names: default, rag, tool_use\)"):
        load_data(cfg, named, log=lambda *_: None)
    # a path is still checked with the config
    with pytest.raises(ConfigError, match="'templates/chatml.jinja': no such file"):
        check_sft_config(_cfg(tmp_path, "templates/chatml.jinja"))


def test_a_record_with_an_empty_tools_list_gets_tool_use_as_in_transformers(tmp_path, named):
    # transformers picks "tool_use" for tools that are not None; TRL passes a record's [] as it is
    ex, _ = load_examples(_jsonl(tmp_path, [{"messages": CHAT, "tools": []}]), named, max_seq_len=256)
    want = named.apply_chat_template(CHAT, tools=[], return_dict=True)
    assert ex[0].input_ids == list(want["input_ids"])
    assert "tools: 0" in named.decode(ex[0].input_ids)
