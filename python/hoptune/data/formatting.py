"""Turning records into token ids and loss masks.

The record shapes TRL's SFTTrainer reads:

* ``{"prompt": str, "completion": str}``: loss on the completion tokens (plus EOS);
* ``{"messages": [{"role", "content"}, ...]}``: rendered with the tokenizer's own chat template,
  loss on every assistant turn including its end-of-turn token;
* ``{"conversations": [{"from", "value"}, ...]}`` (ShareGPT): converted as TRL converts it
  (``convert_to_chatml``), then as messages;
* ``{"prompt": [messages], "completion": [messages]}``: as messages, loss on the completion turns;
* ``{"text": str}``: plain text, every token in the loss (for replay / general data).

A message's content is a string, or null for an assistant message that calls tools (OpenAI's
``{"role": "assistant", "content": null, "tool_calls": [...]}``; such a message may also leave the
content out, as OpenAI's fine-tuning files do, and is then read as null). Messages go to the template
as they are written (TRL passes them unchanged), extra keys such as ``tool_calls`` included. A content
may also be a list of text parts (``[{"type": "text", "text": ...}]``, OpenAI's and transformers'
multimodal-style messages; any other part is an error): a template that reads parts (Qwen2-VL's,
Gemma 3's, SmolVLM's) gets them as written, as TRL passes them; one that reads a string only gets the
parts' text joined, where TRL would render the list's Python text.

``loss_mask[t] = 1`` means token t is a training target (it is predicted from tokens < t).

How the assistant spans of a chat are found, for any template (with or without
``{% generation %}`` markers): render the conversation up to each assistant turn with the
generation prompt, and up to and including that turn; the text the turn adds is its span (it
ends with whatever the template closes a turn with, e.g. ``<|eot_id|>``; an EOS that the template
adds only at the end of a conversation, as Phi-3's does, is in the span of the turn that ends the
conversation only). This needs a template that renders a prefix of a conversation as a prefix of
the whole, up to such an EOS, that renders some text after an assistant message's content (its
end-of-turn token, which must be in the loss; a turn of tool calls is judged by an answer in its
place), and that renders those beginnings at all; when it does not (some templates rewrite earlier
turns, GLM-4.5's ends a turn with the next message's header, Qwen3.5's refuses a beginning without a
user message), the template's ``{% generation %}`` markers are used, and without those the example is
an error that says why. A template whose generation prompt is empty puts the role header into the
added text; the span then starts where the message content starts.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass
from typing import Any

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
# stands in for an assistant message's content to find where the content starts in the rendered turn
_PROBE = "\ue000hoptune-content\ue000"


class ExampleError(ValueError):
    """A record that cannot become a training example (missing fields, no loss token...)."""


class _Refused(ExampleError):
    """The chat template refused the messages it was given (its ``raise_exception``) or could not render
    them; ``why`` is the template's (or transformers') own message."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


@dataclass
class Example:
    """A tokenized example: ``input_ids`` and ``loss_mask`` of equal length ``T``."""

    input_ids: list[int]
    loss_mask: list[int]
    where: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        """Targets that can be predicted: token 0 has no context, so it never counts."""
        return int(sum(self.loss_mask[1:]))


def _without_nulls(data: dict) -> dict:
    """The record less its null fields: a file written from a table of mixed records (pandas' or
    datasets' ``to_json``) holds every column in every line, null where the record has none, and TRL
    reads a null field as absent (``{"text": ..., "messages": null}`` is text)."""
    return {k: v for k, v in data.items() if v is not None}


def record_kind(data: dict) -> str:
    """'messages' | 'prompt_completion' | 'text'; ExampleError naming the fields otherwise. A null
    field is absent."""
    nulls = sorted(k for k, v in data.items() if v is None)
    data = _without_nulls(data)
    if "messages" in data or "conversations" in data:
        return "messages"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "text" in data:
        return "text"
    have = ", ".join(sorted(data)) or "none"
    if nulls:
        have += f"; null, so read as absent: {', '.join(nulls)}"
    missing = "completion" if "prompt" in data else ("prompt" if "completion" in data else None)
    hint = f"missing field {missing!r}" if missing else "no known fields"
    raise ExampleError(
        f"{hint} (fields present: {have}); expected {{'prompt', 'completion'}}, {{'messages'}}, "
        "{'conversations'} or {'text'}"
    )


def named_chat_templates(tokenizer: Any) -> dict:
    """The tokenizer's named chat templates (its ``chat_template`` when that is a dict, as Command
    R's or Hermes 2 Pro's ``{"default": ..., "tool_use": ...}``); empty when it has one template or
    none."""
    own = getattr(tokenizer, "chat_template", None)
    return own if isinstance(own, dict) else {}


def may_name_a_template(template: str) -> bool:
    """Whether a ``model.chat_template`` value may be the name of one of the tokenizer's chat
    templates: no Jinja syntax and no path separator. Such a value can only be checked once the
    tokenizer is loaded; any other value is checked without it."""
    return "{" not in template and "/" not in template and os.sep not in template


def resolve_chat_template(template: str | None, tokenizer: Any = None) -> str | None:
    """The template text of a ``model.chat_template`` value, read as transformers'
    ``get_chat_template`` reads its ``chat_template`` argument: the name of one of the tokenizer's
    named templates selects that template; any other value is an inline Jinja template, or the path
    of a file holding one. A value without any Jinja syntax cannot render a conversation, so it
    must be a name or a file: a mistyped path is FileNotFoundError and a mistyped name ValueError
    listing the names (neither is used as template text). Without ``tokenizer``, no value is a
    name."""
    if template is None:
        return None
    named = named_chat_templates(tokenizer)
    if template in named:
        return named[template]
    if "{" in template:
        return template
    if os.path.isfile(template):
        return _read_template_file(template)
    if not may_name_a_template(template) or tokenizer is None:
        why = "no such file"
    elif not named:
        why = "no such file (nor a name: the tokenizer has no named chat templates)"
    else:
        raise ValueError(
            f"model.chat_template={template!r}: no chat template of the tokenizer has that name "
            f"(its names: {', '.join(sorted(named))}), no file has that path, and it is not an "
            "inline Jinja template (it has no {{ }} or {% %}); give one of those names, the path "
            "of a template file, or the template text itself"
        )
    raise FileNotFoundError(
        f"model.chat_template={template!r}: {why}, and not an inline Jinja template (it has no "
        "{{ }} or {% %}); give the path of an existing template file, or the template text itself"
    )


def _read_template_file(path: str) -> str:
    """A template file's text: UTF-8, or UTF-16 / UTF-32 with a byte-order mark (PowerShell's
    "> file" writes UTF-16). The mark is dropped: it is no template text, and Jinja would render it
    in front of every conversation (before the BOS). Not UTF-8 text: UnicodeDecodeError naming the
    key and the file (a ValueError, as the other errors of a model.chat_template value)."""
    with open(path, "rb") as f:
        raw = f.read()
    encoding = "utf-8-sig"
    for bom, name in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if raw.startswith(bom):
            encoding = name
            break
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise UnicodeDecodeError(
            e.encoding,
            e.object,
            e.start,
            e.end,
            f"{e.reason}: model.chat_template={path!r} is not UTF-8 text (it is read as a template "
            "file); save it as UTF-8",
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # line ends as a text-mode read gives them


# the lists TRL's maybe_convert_to_chatml converts, in its order
_CHATML_KEYS = ("prompt", "completion", "chosen", "rejected", "messages", "conversations")
# ShareGPT's names for the two sides; TRL keeps them as roles, so they only name the fix in an error
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def convert_to_chatml(data: dict) -> dict:
    """A ShareGPT record (``{"conversations": [{"from", "value"}, ...]}``) as TRL's SFTTrainer
    converts it (``trl.data_utils.maybe_convert_to_chatml``): in every message list of the record
    ``from`` becomes ``role`` and ``value`` becomes ``content``, and ``conversations`` becomes
    ``messages``. The values are kept as written ("human" stays "human": TRL maps no role names).
    A record without ``conversations`` is returned as it is (SFTTrainer converts only such data).
    The record itself is not changed."""
    if "conversations" not in data:
        return data
    out = dict(data)
    for key in _CHATML_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [_renamed(m) if isinstance(m, dict) else m for m in out[key]]
    out["messages"] = out.pop("conversations")
    return out


def _renamed(message: dict) -> dict:
    m = dict(message)
    if "from" in m:
        m["role"] = m.pop("from")
    if "value" in m:
        m["content"] = m.pop("value")
    return m


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=repr)


def _check_messages(messages: Any, field: str = "messages", as_written: Any = None) -> list[dict]:
    """``messages`` checked for the template; errors name ``field``. A ShareGPT record's messages
    (``field`` "conversations") are checked after convert_to_chatml, and its errors speak of 'from'
    and 'value' and show the messages ``as_written`` in the record.

    An assistant message that calls tools may leave out its content (OpenAI's fine-tuning files do):
    it gets ``content: None``, as TRL's SFTTrainer reads such a file (datasets fills the missing key
    with null); the record itself is not changed."""
    role, content = ("from", "value") if field == "conversations" else ("role", "content")
    if not isinstance(messages, list) or not messages:
        raise ExampleError(f"{field!r} must be a non-empty list of {{{role!r}, {content!r}}} objects")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and "content" not in m and m.get("role") == "assistant" and _calls_tools(m):
            m = {**m, "content": None}
        out.append(m)
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            got = m if as_written is None else as_written[i]
            raise ExampleError(f"{field}[{i}] must be an object with {role!r} and {content!r}, got {got!r}")
        if not isinstance(m["role"], str):
            raise ExampleError(f"{field}[{i}]: {role!r} must be a string (the role), got {_shown(m['role'])}")
        if m["content"] is None:
            # OpenAI's tool-call turn; any other message without content renders as "None" or breaks
            # the template (Qwen2.5's adds it to a string)
            if m["role"] != "assistant" or not _calls_tools(m):
                raise ExampleError(
                    f"{field}[{i}]: {content!r} is null, but only an assistant message that calls tools (a "
                    "non-empty 'tool_calls' list) may have no content"
                )
        elif isinstance(m["content"], list):
            _check_parts(m["content"], f"{field}[{i}]: {content!r}")
        elif not isinstance(m["content"], str):
            raise ExampleError(
                f"{field}[{i}]: {content!r} must be a string (or a list of text parts, or null in an "
                f"assistant message that calls tools), got {_shown(m['content'])}"
            )
    return out


def _check_parts(parts: list, where: str) -> None:
    """A content written as parts (``[{"type": "text", "text": "..."}]``, OpenAI's and transformers'
    multimodal-style messages): text parts only, as the model reads text only."""
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ExampleError(
                f"{where} part {j} must be an object with 'type' and 'text' ({{'type': 'text', 'text': "
                f"...}}), got {_shown(part)}"
            )
        if part["type"] != "text":
            raise ExampleError(
                f"{where} part {j} has type {part['type']!r}; only text parts ({{'type': 'text', 'text': "
                "...}) can be trained on: drop the other parts, or write the content as a string"
            )
        if not isinstance(part.get("text"), str):
            raise ExampleError(f"{where} part {j}: 'text' must be a string, got {_shown(part.get('text'))}")


def _text(content: Any) -> Any:
    """A message content as text: text parts joined (as templates that read parts render them, with
    nothing between them); a string or null as it is."""
    return "".join(part["text"] for part in content) if isinstance(content, list) else content


def _probe_content(content: Any) -> Any:
    """The placeholder for a message's content, in the content's shape: a template that reads a content
    as parts only (LLaVA-NeXT's ``message['content'][0]['text']``) cannot render a string in its place,
    and one that reads a string gets the parts' text joined (see ChatFormatter._apply)."""
    return [{"type": "text", "text": _PROBE}] if isinstance(content, list) else _PROBE


def _calls_tools(message: dict) -> bool:
    calls = message.get("tool_calls")
    return isinstance(calls, list) and bool(calls)


def _no_assistant(messages: list[dict], sharegpt: bool) -> str:
    """Why a conversation has nothing to train on; for ShareGPT data, which names to write instead."""
    why = "no assistant message, so nothing to train on"
    if not sharegpt:
        return why
    roles = list(dict.fromkeys(m["role"] for m in messages))
    renames = ", ".join(f"{r!r} -> {_SHAREGPT_ROLES[r]!r}" for r in roles if r in _SHAREGPT_ROLES)
    fix = f"rename {renames}" if renames else "the model's turns need 'from': 'assistant'"
    return (
        f"{why} (roles: {', '.join(roles)}; a 'from' is the role as written, as TRL converts ShareGPT "
        f"records: {fix})"
    )


def template_syntax_error(tokenizer: Any, template: str) -> str | None:
    """Why ``template`` is not valid Jinja as transformers compiles it for ``tokenizer`` ("message
    (template line N)"), or None. A template is compiled on its first use: a probe conversation is
    rendered, and anything else it raises (a template may refuse that conversation) is not a syntax
    error."""
    import jinja2

    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], tokenize=False, chat_template=template
        )
    except jinja2.TemplateSyntaxError as e:
        return f"{e.message} (template line {e.lineno})"
    except Exception:  # (real conversations are checked one by one)
        pass
    return None


class ChatFormatter:
    """Renders conversations with a tokenizer's chat template and finds the assistant spans."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        """``chat_template``: model.chat_template (see resolve_chat_template), None for the
        tokenizer's own."""
        self.tokenizer = tokenizer
        own = getattr(tokenizer, "chat_template", None)
        template = resolve_chat_template(chat_template, tokenizer) or own
        # a tokenizer may hold named templates (Command R, Hermes 2 Pro: "default", "tool_use"):
        # a record gets the one transformers (so TRL) picks, "tool_use" for a record with tools,
        # else "default"; model.chat_template naming one renders every record with it, as
        # transformers does
        self.templates = dict(template) if isinstance(template, dict) else {"default": template}
        if not any(self.templates.values()):
            raise ExampleError(
                "the tokenizer has no chat template, so chat data cannot be formatted; set "
                "model.chat_template to a Jinja template (inline or a file), or use prompt/completion data"
            )
        if not self.templates.get("default"):
            raise ExampleError(
                "the tokenizer's chat templates are named "
                f"{', '.join(sorted(self.templates))}, none of them 'default'; set "
                "model.chat_template to the name of the one to use (or to a template, inline or a "
                "file)"
            )
        self.template = self.templates["default"]
        if not getattr(tokenizer, "is_fast", False):
            raise ExampleError(
                "chat masks need a fast tokenizer (token offsets); load the tokenizer with use_fast=True"
            )
        if chat_template in named_chat_templates(tokenizer):
            source = f"the tokenizer's chat template {chat_template!r} (model.chat_template)"
        elif chat_template:
            source = "the chat template (model.chat_template)"
        else:
            source = "the tokenizer's chat template"
        self._check_syntax(source)
        self._reads_parts: dict[str, bool] = {}

    def _template(self, tools: list | None = None) -> str:
        """The template a record with ``tools`` (None: no tools) is rendered with."""
        if tools is not None and self.templates.get("tool_use"):
            return self.templates["tool_use"]
        return self.template

    def _check_syntax(self, source: str) -> None:
        """ExampleError when a template is not valid Jinja (a setup error, not one of an example)."""
        for name, template in self.templates.items():
            bad = template_syntax_error(self.tokenizer, template)
            if bad:
                which = f"{source} {name!r}" if len(self.templates) > 1 else source
                raise ExampleError(f"{which} is not valid Jinja: {bad}")

    def _apply(self, messages: list[dict], **kwargs: Any) -> Any:
        """``apply_chat_template`` with the record's template; a conversation the template refuses (its
        ``raise_exception``, e.g. roles that do not alternate) is an ExampleError, and so is one it
        cannot render: transformers' ValueError for a record's tools that are no function schemas
        (``"tools": [1]``), a TypeError from a filter such as ``tojson`` given a tool call that is a
        string."""
        import jinja2

        template = self._template(kwargs.get("tools"))
        if any(isinstance(m.get("content"), list) for m in messages) and not self._parts_read_by(template):
            messages = [{**m, "content": _text(m["content"])} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=template, **kwargs)
        except jinja2.TemplateError as e:
            raise _Refused(f"the chat template refused this conversation: {e}", str(e)) from None
        except (ValueError, TypeError) as e:
            raise _Refused(f"the chat template cannot render this conversation: {e}", str(e)) from None

    def _parts_read_by(self, template: str) -> bool:
        """Whether ``template`` renders a content written as text parts as their text (Qwen2-VL's,
        Gemma 3's, Llama 4's do); one that reads content as a string only would render the list's
        Python text (or nothing, or fail), so such a template gets the parts' text joined instead."""
        if template not in self._reads_parts:
            probe = [{"role": "user", "content": [{"type": "text", "text": _PROBE}]}]
            try:
                out = self.tokenizer.apply_chat_template(probe, tokenize=False, chat_template=template)
            except Exception:  # a template that cannot take a list (e.g. adds it to a string)
                out = ""
            self._reads_parts[template] = _PROBE in out and "'text'" not in out and '"text"' not in out
        return self._reads_parts[template]

    def render(
        self, messages: list[dict], add_generation_prompt: bool, template_kwargs: dict | None = None
    ) -> str:
        """``template_kwargs``: the record's extra arguments of the template (its tools and
        chat_template_kwargs), passed to every render of the conversation."""
        if not messages:
            return ""
        return self._apply(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
        )

    def spans(
        self, messages: list[dict], first_trained: int = 0, template_kwargs: dict | None = None
    ) -> tuple[str, list[tuple[int, int]]] | str:
        """The full text and the character spans of assistant turns at index >= first_trained, or why
        rendering the conversation's beginnings cannot locate them (a string)."""
        full = self.render(messages, False, template_kwargs)
        out = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < first_trained:
                continue
            renders = []
            for n, generation_prompt in ((i, True), (i + 1, False), (i, False)):
                try:
                    renders.append(self.render(messages[:n], generation_prompt, template_kwargs))
                except _Refused as e:
                    # the whole conversation rendered: a template may refuse a beginning of it (Qwen3.5's
                    # and Qwen3.6's refuse one without a user message, e.g. up to a greeting)
                    return (
                        f"it refuses the conversation's beginning messages[:{n}] ({e.why}), though it "
                        "renders the whole conversation"
                    )
            before, after, plain = renders
            if not after.startswith(before):
                if before.startswith(plain) and after.startswith(plain):
                    return (
                        f"its generation prompt {before[len(plain) :]!r} is not how it begins the turn of "
                        f"assistant message {i} ({after[len(plain) :][: len(before) - len(plain) + 10]!r}...)"
                    )
                return (
                    f"it renders the messages before assistant message {i} differently once that message "
                    "follows (it rewrites earlier turns)"
                )
            start, end = len(before), len(after)
            if not full.startswith(after):
                # a template may end a conversation rendered without a generation prompt with the EOS
                # (Phi-3, Phi-3.5): a turn that other messages follow ends before it, as in the whole
                eos = self.tokenizer.eos_token
                closed = bool(eos) and after.endswith(eos) and full.endswith(eos)
                if not closed or not full.startswith(after[: -len(eos)]):
                    return (
                        f"it renders assistant message {i} (or a message before it) differently once more "
                        "messages follow (it rewrites earlier turns, e.g. drops their reasoning)"
                    )
                end -= len(eos)
            if self._unclosed(messages, i, after[:end], template_kwargs):
                what = "tool calls" if _calls_tools(m) else "content"
                return (
                    f"it renders nothing after the {what} of assistant message {i} (no end-of-turn text: "
                    "the next message's header ends the turn, as in GLM-4.5's), so the loss would have no "
                    "end-of-turn token and the model would not learn to stop"
                )
            if before == plain:
                # no generation prompt: the added text holds the role header too; train from the content on
                content_start = self._content_start(messages, i, after, start, end, template_kwargs)
                if content_start is None:
                    return (
                        f"it has no generation prompt, and it changes the content of assistant message {i} "
                        "as it renders it (neither the content nor a placeholder for it is found in the "
                        "turn), so where the role header ends is not known"
                    )
                start = content_start
            if end <= start:
                raise ExampleError(f"the chat template renders nothing for assistant message {i}")
            out.append((start, end))
        return full, out

    def _unclosed(self, messages: list[dict], i: int, turn: str, template_kwargs: dict | None) -> bool:
        """Whether the template renders nothing after the content of assistant message ``i`` (``turn``:
        the conversation rendered up to the end of that message's turn). Checked with a placeholder for
        the content: a turn may end with text that the content ends with too (a newline), and a template
        may change the content (drop its reasoning, strip it).

        A turn that calls tools is judged by an answer in its place (the placeholder, no calls): its
        rendered calls end it whatever the template closes a turn with, and a template that closes no
        answer ends a turn of calls with the next message's header too (GLM-4.5's ``<|observation|>``,
        rendered with the tool message, or not at all where the calls end the record)."""
        message = messages[i]
        if _calls_tools(message):
            message = {k: v for k, v in message.items() if k != "tool_calls"}
        else:
            content = _text(message["content"])
            if content.strip() and not turn.endswith(content.strip()[-1]):
                return False  # most turns: an end-of-turn token follows the content (no render needed)
        probe = [*messages[:i], {**message, "content": _probe_content(message["content"])}]
        return self.render(probe, False, template_kwargs).endswith(_PROBE)

    def _content_start(
        self,
        messages: list[dict],
        i: int,
        after: str,
        start: int,
        end: int,
        template_kwargs: dict | None = None,
    ) -> int | None:
        """Where the content of assistant message ``i`` starts in ``after`` (the conversation rendered up
        to and including it), given that its turn spans ``after[start:end]``, header included; None
        when neither a placeholder nor the content itself is found there (a template that changes
        the content, e.g. upper-cases it: training from the turn's start would train its header).

        The turn is rendered again with a placeholder for the content: the header is the text before
        the placeholder, whatever the content is (searching for the content itself would stop inside a
        header that happens to contain it, e.g. the answer "A" in "### Assistant: A")."""
        placeholder = {**messages[i], "content": _probe_content(messages[i]["content"])}
        probe = self.render([*messages[:i], placeholder], False, template_kwargs)
        pos = probe.find(_PROBE, start)
        if 0 <= pos <= end and probe[:pos] == after[:pos]:
            return pos
        # a template that changes the placeholder (or the header with it): the content's last occurrence
        # in the turn, as the header comes before it
        content = _text(messages[i]["content"])
        pos = after.rfind(content, start, end) if content else -1
        return pos if pos >= 0 else None

    def tokenize(
        self,
        messages: list[dict],
        first_trained: int = 0,
        template_kwargs: dict | None = None,
        prompt_cut: list[str] | None = None,
    ) -> tuple[list[int], list[int]]:
        """(input_ids, loss_mask) of a conversation; loss on assistant turns >= first_trained.
        ``template_kwargs`` go to every render of the template (a record's: _template_kwargs).
        ``prompt_cut``: where the tokenized prompt (``messages[:first_trained]`` with the generation
        prompt) is not a prefix of the conversation's tokens, its end beyond the common prefix is
        appended there as text (see _completion_start)."""
        tok = self.tokenizer
        found = self.spans(messages, first_trained, template_kwargs)
        if isinstance(found, str):
            if not _GENERATION_TAG.search(self._template((template_kwargs or {}).get("tools"))):
                # conversational prompt/completion (first_trained > 0) is rendered the same way
                other = (
                    "write 'prompt' and 'completion' as strings (the prompt as the template "
                    "renders it, generation prompt included)"
                    if first_trained
                    else "use prompt/completion data"
                )
                raise ExampleError(
                    f"the assistant tokens cannot be located from the chat template's renders of the "
                    f"conversation's beginnings: {found}; add {{% generation %}} ... {{% endgeneration %}} "
                    "around each assistant turn's content and end-of-turn token in the template "
                    f"(model.chat_template, e.g. TRL's training variant of it), or {other}"
                )
            return self._tokenize_with_generation_tags(messages, first_trained, template_kwargs, prompt_cut)
        text, spans = found
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [0] * len(ids)
        for j, (s, e) in enumerate(enc["offset_mapping"]):
            # a token belongs to the span that holds its last character (a token straddling the start,
            # e.g. "▁Hello" with the template's space, is the answer's first token)
            c = e - 1 if e > s else s
            for a, b in spans:
                if a <= c < b:
                    mask[j] = 1
                    break
        return ids, mask

    def _tokenize_with_generation_tags(self, messages, first_trained, template_kwargs=None, prompt_cut=None):
        out = self._apply(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            **(template_kwargs or {}),
        )
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        if first_trained:
            # the prompt ends where the tokenized prompt and the conversation diverge (as TRL): a generation
            # prompt the rendered turn lacks (e.g. an opened "<think>") is not counted into the prompt
            prefix = self.render(messages[:first_trained], True, template_kwargs)
            p = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
            n = _completion_start(self.tokenizer, p, ids, prompt_cut)
            mask = [0] * n + mask[n:]
        return ids, mask


def _completion_start(
    tokenizer: Any, prompt: list[int], full: list[int], prompt_cut: list[str] | None
) -> int:
    """Where the completion starts in ``full``: where it and the tokenized ``prompt`` diverge (TRL's
    common prefix). Where that is before the prompt's end, the prompt's last tokens are not in the
    sequence (the model trains on a context it will not see at inference, where the prompt is
    tokenized alone): their text is appended to ``prompt_cut`` when given (TRL warns of it)."""
    n = 0
    while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
        n += 1
    if n < len(prompt) and prompt_cut is not None:
        prompt_cut.append(tokenizer.decode(prompt[n:]))
    return n


def _leading(ids: list[int], token: int) -> int:
    n = 0
    while n < len(ids) and ids[n] == token:
        n += 1
    return n


def _encode(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text)``'s ids, with the special tokens it adds, but no BOS added in front of a text
    that already starts with it (text rendered by a chat template, e.g. ``<|begin_of_text|>...``): the
    model would otherwise train on two BOS where inference sees one."""
    ids = list(tokenizer(text)["input_ids"])
    bos, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    if bos is None or not bos_text or not text.startswith(bos_text):
        return ids
    written = _leading(list(tokenizer(text, add_special_tokens=False)["input_ids"]), bos)
    added = _leading(ids, bos) - written
    return ids[added:] if written and added > 0 else ids


def tokenize_prompt_completion(
    tokenizer: Any, prompt: str, completion: str, add_eos: bool = True, prompt_cut: list[str] | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask): the completion starts where the tokenized prompt and the tokenized
    prompt+completion diverge (tokens can merge across the boundary), as in TRL; ``prompt_cut``: see
    _completion_start."""
    full = _encode(tokenizer, prompt + completion)
    n = _completion_start(tokenizer, _encode(tokenizer, prompt), full, prompt_cut)
    mask = [0] * n + [1] * (len(full) - n)
    eos = tokenizer.eos_token_id
    # the EOS is appended unless the completion ends with one (TRL: unless the completion text ends with
    # the EOS text); an EOS that ends the prompt, before an empty completion, is not the completion's
    if add_eos and eos is not None and (n >= len(full) or full[-1] != eos):
        full.append(eos)
        mask.append(1)
    return full, mask


def tokenize_text(tokenizer: Any, text: str, add_eos: bool = True) -> tuple[list[int], list[int]]:
    ids = _encode(tokenizer, text)
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, [1] * len(ids)


def _template_kwargs(data: dict) -> dict:
    """A chat record's extra arguments of the chat template, as TRL passes them: ``tools``, then its
    ``chat_template_kwargs`` spread as keyword arguments."""
    return {"tools": _tools(data), **(_chat_template_kwargs(data) or {})}


def _tools(data: dict) -> list | None:
    """A record's "tools" (function schemas for the chat template), a list or its JSON text as TRL reads it.
    An empty list stays one: TRL's SFTTrainer passes it to the template as it is, and a template that
    tests ``tools is not none`` (Llama 3.1's) renders its tool preamble for it."""
    tools = data.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise ExampleError(f"'tools' is a string but not JSON: {e}") from None
    if tools is not None and not isinstance(tools, list):
        raise ExampleError(f"'tools' must be a list of function schemas, got {type(tools).__name__}")
    return tools


# apply_chat_template arguments the formatter sets itself on each render
_RENDER_ARGS = (
    "chat_template",
    "add_generation_prompt",
    "tokenize",
    "return_dict",
    "return_assistant_tokens_mask",
)


def _chat_template_kwargs(data: dict) -> dict | None:
    """A record's "chat_template_kwargs": keyword arguments of the chat template (e.g.
    ``{"enable_thinking": false}``), an object as TRL reads it."""
    kwargs = data.get("chat_template_kwargs")
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise ExampleError(
            f"'chat_template_kwargs' must be an object of keyword arguments for the chat template, got "
            f"{type(kwargs).__name__}"
        )
    for k in kwargs:
        if k in _RENDER_ARGS:
            raise ExampleError(
                f"'chat_template_kwargs' cannot set {k!r}: it is set for each render of the chat"
            )
    return kwargs


def tokenize_record(
    data: dict,
    tokenizer: Any,
    chat: ChatFormatter | None = None,
    add_eos: bool = True,
    prompt_cut: list[str] | None = None,
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one record of any supported shape (a null field is absent).
    ``prompt_cut``: a prompt/completion record whose tokenized prompt is not a prefix of its tokens
    appends the prompt's end there (see _completion_start)."""
    kind = record_kind(data)
    data = _without_nulls(data)
    if kind == "messages":
        field = "conversations" if "conversations" in data else "messages"
        as_written = data[field]
        data = convert_to_chatml(data)
        messages = _check_messages(data["messages"], field, as_written)
        if not any(m["role"] == "assistant" for m in messages):
            raise ExampleError(_no_assistant(messages, sharegpt=field == "conversations"))
        if chat is None:
            raise ExampleError("chat data needs a ChatFormatter")
        return chat.tokenize(messages, template_kwargs=_template_kwargs(data))
    if kind == "prompt_completion":
        p, c = data["prompt"], data["completion"]
        if isinstance(p, list) and isinstance(c, list):
            prompt = _check_messages(p, "prompt")
            completion = _check_messages(c, "completion")
            if not any(m["role"] == "assistant" for m in completion):
                raise ExampleError("the completion has no assistant message, so nothing to train on")
            if chat is None:
                raise ExampleError("conversational prompt/completion data needs a ChatFormatter")
            return chat.tokenize(prompt + completion, len(prompt), _template_kwargs(data), prompt_cut)
        if not isinstance(p, str) or not isinstance(c, str):
            raise ExampleError(
                "'prompt' and 'completion' must both be strings (or both lists of messages), got "
                f"{type(p).__name__} and {type(c).__name__}"
            )
        # an empty completion trains the EOS alone (TRL appends the EOS to the completion text)
        return tokenize_prompt_completion(tokenizer, p, c, add_eos, prompt_cut)
    text = data["text"]
    if not isinstance(text, str) or not text:
        raise ExampleError("'text' must be a non-empty string")
    return tokenize_text(tokenizer, text, add_eos)


def truncate(
    ids: list[int], mask: list[int], max_len: int, side: str = "right"
) -> tuple[list[int], list[int]]:
    """Cut to ``max_len`` tokens: 'right' keeps the beginning, 'left' keeps the end."""
    if len(ids) <= max_len:
        return ids, mask
    if side == "right":
        return ids[:max_len], mask[:max_len]
    if side == "left":
        return ids[-max_len:], mask[-max_len:]
    raise ValueError(f"truncation must be 'right' or 'left', got {side!r}")
