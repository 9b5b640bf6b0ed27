import json

import pytest

from hoptune.data import DataError, load_examples, read_jsonl


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_reads_records_with_line_numbers(tmp_path):
    p = _write(tmp_path / "a.jsonl", ['{"prompt": "a", "completion": "b"}', "", '{"text": "hello"}'])
    recs, rep = read_jsonl(p)
    assert [r.line for r in recs] == [1, 3]
    assert rep.blank == 1 and rep.records == 2
    assert recs[1].where.endswith("a.jsonl:3")


def test_byte_order_mark_is_not_part_of_line_1(tmp_path):
    # a UTF-8 file that opens with a byte-order mark (Notepad, PowerShell's Out-File) is valid JSONL
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "\xef\xbb\xbfb"}\n')
    recs, rep = read_jsonl(p)
    assert [r.data for r in recs] == [{"text": "a"}, {"text": "\ufeffb"}]  # only the file's first one
    assert not rep.malformed


def test_byte_order_mark_opening_a_later_line_is_dropped(tmp_path):
    # two files that each open with a mark, joined (cat a.jsonl b.jsonl): the second mark heads line 2
    p = tmp_path / "joined.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n\xef\xbb\xbf\n')
    recs, rep = read_jsonl(p)
    assert [(r.line, r.data) for r in recs] == [(1, {"text": "a"}), (2, {"text": "b"})]
    assert not rep.malformed and rep.blank == 1


def test_malformed_lines_stop_with_line_numbers(tmp_path):
    lines = ['{"text": "ok"}', '{"text": "cut', '{"text": "ok"}', "[1, 2]", "not json"]
    p = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    msg = str(e.value)
    assert "3 malformed line(s)" in msg
    assert "line 2: invalid JSON" in msg and "line 4: expected a JSON object, got list" in msg
    assert "line 5" in msg and "data.skip_bad_examples=true" in msg


def test_a_raw_control_character_is_named_once(tmp_path):
    """A raw tab inside a JSON string is not JSON (datasets refuses it too); its message read
    "Invalid control character at at column 11"."""
    p = _write(tmp_path / "tab.jsonl", ['{"text": "a\tb"}'])
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert "line 1: invalid JSON (Invalid control character at column 12)" in str(e.value)


def test_malformed_lines_skipped_when_asked(tmp_path, tokenizer):
    p = _write(tmp_path / "bad.jsonl", ['{"prompt": "1+1=", "completion": "2"}', "{oops", '{"text": "x"}'])
    recs, rep = read_jsonl(p, skip_malformed=True)
    assert len(recs) == 2 and [ln for ln, _ in rep.malformed] == [2]
    examples, report = load_examples(p, tokenizer, max_seq_len=64, skip_bad=True)
    assert len(examples) == 2
    assert "1 malformed lines skipped (2)" in report.summary()


def test_lines_that_are_not_utf8_are_malformed(tmp_path, tokenizer):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(
        b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "caf\xe9", "completion": "x"}\n{"text": "y"}\n'
    )
    with pytest.raises(
        DataError, match=r"1 malformed line\(s\): line 2: not valid UTF-8 \(byte 0xe9 at column 16\)"
    ):
        read_jsonl(p)
    examples, report = load_examples(str(p), tokenizer, max_seq_len=64, skip_bad=True)
    assert len(examples) == 2 and [ln for ln, _ in report.malformed] == [2]


def test_missing_fields_are_clear(tmp_path, tokenizer):
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "only a prompt"},
        {"question": "q", "answer": "a"},
        {"completion": "only a completion"},
    ]
    p = _write(tmp_path / "m.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError) as e:
        load_examples(p, tokenizer, max_seq_len=64)
    msg = str(e.value)
    assert "line 2: missing field 'completion'" in msg
    assert "line 3: no known fields (fields present: answer, question)" in msg
    assert "line 4: missing field 'prompt'" in msg
    examples, rep = load_examples(p, tokenizer, max_seq_len=64, skip_bad=True)
    assert len(examples) == 1 and len(rep.invalid) == 3


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_wrong_types(tmp_path, tokenizer):
    rows = [{"prompt": "a", "completion": 3}, {"messages": [{"role": "user"}]}, {"messages": "hi"}]
    p = _write(tmp_path / "t.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError) as e:
        load_examples(p, tokenizer, max_seq_len=64)
    msg = str(e.value)
    assert "line 1: 'prompt' and 'completion' must both be strings" in msg
    assert "line 2: messages[0] must be an object with 'role' and 'content'" in msg
    assert "line 3: 'messages' must be a non-empty list" in msg


def test_lone_surrogate_escapes_are_malformed(tmp_path, tokenizer):
    r"""JSON may spell a lone UTF-16 surrogate (\ud800), which is no character: such a line is
    malformed, with its line number, instead of a crash in the tokenizer, wherever it sits: in a
    value, a key, or a list's item. A surrogate pair (an emoji written with ensure_ascii) is fine."""
    lines = [
        '{"text": "ok \\ud83d\\ude00"}',
        '{"prompt": "a\\ud800", "completion": "b"}',
        '{"text": "y"}',
        '{"text": "z", "note\\udc00": 1}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udbff"}]}',
    ]
    p = _write(tmp_path / "s.jsonl", lines)
    with pytest.raises(
        DataError,
        match=r"3 malformed line\(s\): line 2: .*surrogate \\ud800.*; line 4: .*\\udc00.*; line 5: .*\\udbff",
    ):
        read_jsonl(p)
    examples, report = load_examples(p, tokenizer, max_seq_len=64, skip_bad=True)
    assert len(examples) == 2 and [ln for ln, _ in report.malformed] == [2, 4, 5]


def test_malformed_lines_and_bad_records_in_one_error(tmp_path, tokenizer):
    """Unparsable lines and records with bad fields are listed together, so one run shows every
    problem of the file (each list as long as on its own: five lines, then a count)."""
    good = json.dumps({"prompt": "a", "completion": "b"})
    lines = [good, '{"text": "cut', json.dumps({"prompt": "only"}), "[1]", json.dumps({"messages": "hi"})]
    p = _write(tmp_path / "mix.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_examples(p, tokenizer, max_seq_len=64)
    msg = str(e.value)
    assert msg.startswith(f"{p}: 2 malformed line(s): line 2: invalid JSON")
    assert "line 4: expected a JSON object, got list" in msg
    assert "2 example(s) cannot be trained on: line 3: missing field 'completion'" in msg
    assert "line 5: 'messages' must be a non-empty list" in msg
    assert msg.count("data.skip_bad_examples=true") == 1
    examples, rep = load_examples(p, tokenizer, max_seq_len=64, skip_bad=True)
    assert len(examples) == 1 and len(rep.malformed) == 2 and len(rep.invalid) == 2

    p = _write(tmp_path / "many.jsonl", [good] + ["{oops"] * 7 + [json.dumps({"q": 1})] * 7)
    with pytest.raises(DataError) as e:
        load_examples(p, tokenizer, max_seq_len=64)
    msg = str(e.value)
    assert "7 malformed line(s): line 2: " in msg and "line 6: invalid JSON" in msg
    assert "7 example(s) cannot be trained on: line 9: " in msg and "line 13: no known fields" in msg
    assert msg.count("; ... and 2 more") == 2 and "line 7:" not in msg and "line 14:" not in msg


def test_a_folder_as_data_file_is_named_as_such(tmp_path):
    """A folder given as the data file (a dataset saved by another tool) is not 'missing'."""
    with pytest.raises(DataError, match="is a folder; expected a JSONL file"):
        read_jsonl(tmp_path)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-16-le", "utf-32"])
def test_utf8_utf16_and_utf32_files_are_read(tmp_path, tokenizer, encoding):
    """JSONL in UTF-8, UTF-16 (PowerShell 5's Out-File and "> file" write it with a byte-order mark)
    or UTF-32, with a byte-order mark or without, is read as JSON defines it (no line is malformed),
    with CRLF line ends, a blank line and no newline at the end, and the same line numbers."""
    rows = [{"prompt": "caf\u00e9 ", "completion": "\u00fcber \U0001f600"}, {"text": "ok"}]
    text = json.dumps(rows[0], ensure_ascii=False) + "\r\n\r\n" + json.dumps(rows[1])
    bom = {"utf-16-be": "\ufeff", "utf-16-le": ""}.get(encoding, "")  # utf-16 / utf-32 write their own
    p = tmp_path / "w.jsonl"
    p.write_bytes((bom + text).encode(encoding))
    recs, rep = read_jsonl(p)
    assert [r.data for r in recs] == rows and [r.line for r in recs] == [1, 3]
    assert rep.blank == 1 and not rep.malformed
    examples, _ = load_examples(str(p), tokenizer, max_seq_len=64)
    assert len(examples) == 2


def test_bad_utf16_line_is_malformed_with_its_line(tmp_path, tokenizer):
    """A lone surrogate in a UTF-16 file spoils its own line only (no UnicodeDecodeError)."""
    good = '{"text": "a"}\n'.encode("utf-16-le")
    bad = '{"text": "'.encode("utf-16-le") + b"\x00\xd8" + '"}\n'.encode("utf-16-le")
    p = tmp_path / "bad16.jsonl"
    p.write_bytes(b"\xff\xfe" + good + bad + good)
    with pytest.raises(DataError, match=r"bad16\.jsonl: 1 malformed line\(s\): line 2: not valid UTF-16"):
        read_jsonl(p)
    examples, report = load_examples(str(p), tokenizer, max_seq_len=64, skip_bad=True)
    assert len(examples) == 2 and [ln for ln, _ in report.malformed] == [2]


def test_lines_json_cannot_read_are_malformed_with_their_line(tmp_path, tokenizer):
    """A line nested deeper than the parser can go ('[' * 100000, open or closed) or holding an
    integer of more digits than Python converts is a malformed line naming the file and line, not
    a bare RecursionError / ValueError that stops the run, even when bad lines are to be skipped.
    (Python 3.13's parser reads 5000 levels, 3.10-3.12's do not: 100000 is too deep for all.)"""
    good = json.dumps({"prompt": "1+1=", "completion": "2"})
    deep = "[" * 100_000
    deep_closed = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    big = '{"text": "a", "id": ' + "7" * 5000 + "}"
    p = _write(tmp_path / "d.jsonl", [good, deep, deep_closed, big, '{"text": "ok"}'])
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: 3 malformed line(s): line 2: JSON nested too deeply")
    assert "line 3: JSON nested too deeply" in msg and "line 4: JSON that cannot be read" in msg
    recs, rep = read_jsonl(p, skip_malformed=True)
    assert [r.line for r in recs] == [1, 5] and [ln for ln, _ in rep.malformed] == [2, 3, 4]
    examples, report = load_examples(p, tokenizer, max_seq_len=64, skip_bad=True)
    assert len(examples) == 2 and [ln for ln, _ in report.malformed] == [2, 3, 4]


_NO_RECORD = {"empty": b"", "blank": b"\n \n\r\n", "bom_only": b"\xef\xbb\xbf"}


@pytest.mark.parametrize("content", _NO_RECORD.values(), ids=_NO_RECORD.keys())
def test_a_file_without_records_says_so(tmp_path, tokenizer, content):
    """A data file with no record at all (an export that wrote nothing) is named as empty, not
    only as a file of 0 examples."""
    p = tmp_path / "e.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=r"e\.jsonl: no record \(the file is empty or has only blank"):
        load_examples(str(p), tokenizer, max_seq_len=64)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_a_lone_carriage_return_inside_a_record_is_whitespace(tmp_path, tokenizer, encoding):
    """JSONL lines end at "\\n" (or "\\r\\n"): a lone "\\r" between a record's tokens is JSON
    whitespace, and the record is one line, as datasets' JSON reader (so TRL) reads it; a file
    with lone "\\r" line ends (old Mac) still gives one record per line."""
    rows = [{"prompt": "3+4=", "completion": "7", "id": 1}, {"text": "ok"}, {"text": "b"}]
    text = '{"prompt": "3+4=",\r"completion": "7",\r "id": 1}\r\n{"text": "ok"}\n\n{"text": "b"}\n'
    p = tmp_path / "cr.jsonl"
    p.write_bytes(text.encode(encoding))
    recs, rep = read_jsonl(p)
    assert [r.data for r in recs] == rows and [r.line for r in recs] == [1, 2, 4]
    assert rep.blank == 1 and not rep.malformed
    examples, _ = load_examples(str(p), tokenizer, max_seq_len=64)
    assert len(examples) == 3
    p.write_bytes('{"text": "a"}\r{"text": "b"}\r\r{"text": "c"}\r'.encode(encoding))
    recs, rep = read_jsonl(p)
    assert [r.data["text"] for r in recs] == ["a", "b", "c"] and not rep.malformed
    # each such record is named by its own line (all were "line 1"), and a bad one too
    assert [r.line for r in recs] == [1, 2, 4]
    p.write_bytes('{"text": "a"}\r\r[1]\r{"text": "c"}\r'.encode(encoding))
    recs, rep = read_jsonl(p, skip_malformed=True)
    assert [r.line for r in recs] == [1, 4] and rep.malformed == [(3, "expected a JSON object, got list")]
    # blank lines first, and "\n" lines after such a group (`cat mac.jsonl unix.jsonl`): counted on
    p.write_bytes('\r\r{"text": "a"}\r{"text": "b"}\r{"text": "c"}\n{"text": "d"}\n'.encode(encoding))
    recs, _ = read_jsonl(p)
    assert [(r.data["text"], r.line) for r in recs] == [("a", 3), ("b", 4), ("c", 5), ("d", 6)]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_is_named_as_one(tmp_path, skip, indent):
    """An array of records (one line, or indented over many) was 'N malformed line(s) ... or set
    data.skip_bad_examples=true', which then skipped everything."""
    path = tmp_path / "d.json"
    rows = [{"prompt": f"q{i}", "completion": "a"} for i in range(3)]
    # (a byte-order mark opening the file, and one opening a later line, as `cat` of two files gives)
    path.write_text("\ufeff\n\ufeff " + json.dumps(rows, indent=indent) + "\n")
    with pytest.raises(
        DataError, match=r"holds a JSON array, not JSONL: hoptune reads one JSON object per line"
    ):
        read_jsonl(path, skip_malformed=skip)
    # one object a line between the brackets: the last line parses as a record, the others do not
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    with pytest.raises(DataError, match=r"holds a JSON array, not JSONL"):
        read_jsonl(path, skip_malformed=skip)
    # an array as one bad line among records is a malformed line as before
    path.write_text(json.dumps(rows[0]) + "\n[1, 2]\n")
    records, report = read_jsonl(path, skip_malformed=True)
    assert len(records) == 1 and report.malformed == [(2, "expected a JSON object, got list")]


@pytest.mark.parametrize(
    "head, kind",
    [
        (b"\x1f\x8b\x08\x00", "gzip-compressed"),
        (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
        (b"PK\x03\x04", "a zip archive"),
    ],
)
def test_a_compressed_file_is_named_as_one(tmp_path, head, kind):
    path = tmp_path / "d.jsonl.x"
    path.write_bytes(head + bytes(range(256)))
    with pytest.raises(DataError, match=rf"is {kind}, not a JSONL text file; hoptune reads plain JSONL"):
        read_jsonl(path, skip_malformed=True)


def test_a_gzip_file_as_written_by_gzip(tmp_path):
    import gzip

    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"prompt": "q", "completion": "a"}\n')
    with pytest.raises(DataError, match=r"is gzip-compressed"):
        read_jsonl(path)


def test_examples_cut_to_max_seq_len_get_no_indexing_errors_warning(tmp_path, tokenizer):
    """transformers warned "Token indices sequence length is longer than the specified maximum
    sequence length for this model (... > 256). Running this sequence through the model will result
    in indexing errors" for a long example, which the data step then cut to data.max_seq_len. The
    warning stays for the user's own calls."""
    key = "sequence-length-is-longer-than-the-specified-maximum"  # (transformers' flag of that warning)
    text = "1+2=3 " * 100
    assert len(tokenizer(text, verbose=False)["input_ids"]) > tokenizer.model_max_length
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"text": text}) + "\n")
    examples, report = load_examples(str(p), tokenizer, max_seq_len=64)
    assert report.truncated == 1 and len(examples[0]) == 64
    # (transformers sets this flag whenever it warns, or would have)
    assert key not in tokenizer.deprecation_warnings
    tokenizer(text)
    assert tokenizer.deprecation_warnings.get(key) is True


def test_the_data_report_counts_the_tokens_of_the_examples_kept(tmp_path, tokenizer):
    lines = [
        json.dumps({"prompt": "What is 2+2?", "completion": " 4"}),
        json.dumps({"text": "a plain text row"}),
        json.dumps({"prompt": "no completion"}),  # (invalid: skipped, not counted)
        "{oops",  # (malformed: skipped, a line all the same)
    ]
    p = _write(tmp_path / "d.jsonl", lines)
    examples, report = load_examples(p, tokenizer, max_seq_len=64, skip_bad=True)
    assert len(examples) == 2 and [ln for ln, _ in report.invalid] == [3] and report.lines == 4
    tokens, loss = sum(len(e) for e in examples), sum(e.num_loss_tokens for e in examples)
    assert (report.tokens, report.loss_tokens) == (tokens, loss) and 0 < loss < tokens
    assert f"2 examples, {tokens} tokens ({loss} in the loss)" in report.summary()
