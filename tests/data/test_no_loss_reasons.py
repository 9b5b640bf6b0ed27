"""The reason given for an example without a loss token names what the user has to change."""

import json
import random

import pytest
from tokenizers import normalizers, processors

from hoptune.data import DataError, build_examples, load_examples
from hoptune.data.jsonl import Record


@pytest.fixture
def no_bos(tokenizer):
    """The tiny tokenizer adding no BOS on encode (as many base-model tokenizers do)."""
    no_bos = processors.TemplateProcessing(single="$A", pair="$A $B")
    tokenizer.backend_tokenizer.post_processor = no_bos
    assert tokenizer("a")["input_ids"] == tokenizer.convert_tokens_to_ids(["a"])
    return tokenizer


def _records(rows):
    return [Record(data=r, line=i + 1, path="d.jsonl") for i, r in enumerate(rows)]


def _reasons(rows, tokenizer, **kw):
    _, report = build_examples(_records(rows), tokenizer, max_seq_len=64, skip_bad=True, **kw)
    return dict(report.no_loss)


def test_single_token_example_names_the_first_token(no_bos):
    """A one-token example has its one loss token at position 0, which nothing predicts: the
    reason says so, not that the completion is empty."""
    ch = random.Random(5).choice("abcdefgh")
    rows = [
        {"text": ch},
        {"prompt": "", "completion": ch},
        {"prompt": "3+4=", "completion": ""},  # really empty: the existing reason stays
        {"text": "3+4=" + ch},  # trains
    ]
    reasons = _reasons(rows, no_bos, add_eos=False)
    assert sorted(reasons) == [1, 2, 3]
    for line in (1, 2):
        assert "only loss token is the first token" in reasons[line], reasons[line]
        assert "empty completion" not in reasons[line]
    assert reasons[3].startswith("no token is in the loss (empty completion")


def test_text_without_tokens_says_so(tmp_path, no_bos):
    """A text the tokenizer maps to no token (here whitespace its normalizer strips) is reported as
    such, from a file as well."""
    no_bos.backend_tokenizer.normalizer = normalizers.Strip()
    reasons = _reasons([{"text": "  \t "}, {"text": " ab "}], no_bos, add_eos=False)
    assert list(reasons) == [1]
    assert "tokenizes to no token" in reasons[1], reasons[1]
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "  "}) + "\n" + json.dumps({"text": "ab"}) + "\n")
    with pytest.raises(DataError, match="line 1: the text tokenizes to no token"):
        load_examples(str(p), no_bos, max_seq_len=16, add_eos=False)
