"""JSONL reading with errors that point at the line: a malformed line stops the run (with its line
number and the parser's reason) unless the caller asks to skip such lines, and then every
skipped line is counted and reported."""

from __future__ import annotations

import codecs
import json
import os
import re
import sys
from dataclasses import dataclass, field

_BAD_BYTE = re.compile("[\udc00-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _escape_bad_bytes(e: UnicodeDecodeError) -> tuple[str, int]:
    # as "surrogateescape", but for every byte: a UTF-16 decoder's bad bytes (a lone surrogate, an odd
    # last byte) may be below 0x80, which surrogateescape refuses with a UnicodeDecodeError
    return "".join(chr(0xDC00 + b) for b in e.object[e.start : e.end]), e.end


codecs.register_error("hoptune.escape_bad_bytes", _escape_bad_bytes)


def _lone_surrogate(obj: object) -> str | None:
    """The first lone UTF-16 surrogate in the strings of a JSON value (JSON can spell one as
    ``\\ud800``; it is no character, and tokenizers cannot encode it), or None."""
    if isinstance(obj, str):
        m = _SURROGATE.search(obj)
        return m.group() if m else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _lone_surrogate(k) if isinstance(k, str) else None
        found = found or _lone_surrogate(v)
        if found:
            return found
    return None


def _values_per_cr(line: str, lineno: int) -> list | None:
    """The (line, JSON value) pairs of a line that is no JSON value but one per lone "\\r" line end
    (a file with old Mac line ends, which datasets' reader reads too), or None. ``line`` is the
    line without its "\\n" or "\\r\\n" end, ``lineno`` its first line's number; the pieces
    between lone "\\r" count as lines, blank ones too."""
    if "\r" not in line.strip():
        return None
    try:
        return [
            (lineno + i, json.loads(piece))
            for i, piece in enumerate(line.removeprefix("\ufeff").split("\r"))
            if piece.strip()
        ]
    except (ValueError, RecursionError):
        return None


class DataError(ValueError):
    """Bad training data; the message names the file, the line(s) and what to fix."""


@dataclass
class Record:
    """One JSON object of a JSONL file and where it came from (``line`` is 1-based)."""

    data: dict
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class ReadReport:
    path: str
    records: int = 0
    blank: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)


def show_lines(lines: list[tuple[int, str]], n: int = 5) -> str:
    """The first ``n`` of (line, reason) as "line 3: why; line 7: why", then how many more."""
    shown = "; ".join(f"line {ln}: {why}" for ln, why in lines[:n])
    more = f"; ... and {len(lines) - n} more" if len(lines) > n else ""
    return shown + more


def read_jsonl(path: str | os.PathLike, skip_malformed: bool = False) -> tuple[list[Record], ReadReport]:
    """Every JSON object of a JSONL file, in order; blank lines are ignored. A line ends at "\\n"
    (JSONL's line end; "\\r\\n" too): a lone "\\r" is whitespace, as JSON reads it.

    The file is UTF-8 (a byte-order mark opening it, or a line, is dropped), UTF-16 or UTF-32. A line that is not
    valid in the file's encoding, not valid JSON, or JSON but not an object, is malformed: DataError
    listing the malformed lines (all of them are found first, so one run shows every bad line), or,
    with ``skip_malformed``, skipped and listed in the report."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"data file {path!r} is a folder; expected a JSONL file (one JSON object per line)")
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    report = ReadReport(path=path)
    records: list[Record] = []
    # the encoding as JSON defines it (RFC 8259 / json.loads of bytes): UTF-8, or UTF-16 / UTF-32 as some
    # Windows tools write (PowerShell 5's "> file" and Out-File: UTF-16 with a byte-order mark), told
    # apart by a byte-order mark or by the zero bytes around the first character; a UTF-8 byte-order mark
    # opening the file (Windows editors and PowerShell write one) is dropped, not read as part of line 1
    with open(path, "rb") as f:
        head = f.read(4)
    for magic, kind in _NOT_TEXT:
        if head.startswith(magic):
            raise DataError(
                f"data file {path!r} is {kind}, not a JSONL text file; hoptune reads plain JSONL (one JSON "
                "object per line): decompress or convert it first"
            )
    encoding = json.detect_encoding(head)
    name = "UTF-" + encoding.split("-")[1]  # utf-8-sig, utf-16-le, ...: the name errors give
    # undecodable bytes come through as lone surrogates (U+DC00..U+DCFF), so a bad byte spoils its line
    # only and the lines around it are read as usual. Lines end at "\n" (a "\r" before it is
    # stripped): a lone "\r" is JSON whitespace, which may sit between a record's tokens (datasets
    # reads it so too), unless a line holds one record per lone "\r" (old Mac line ends): then each
    # "\r" ends a line, and the lines after count them
    with open(path, encoding=encoding, errors="hoptune.escape_bad_bytes", newline="\n") as f:
        extra = 0  # lines ended by a lone "\r" so far (in lines split at them below)
        for n, raw in enumerate(f, start=1):
            lineno = n + extra
            # a byte-order mark heading a later line is where a joined file began (`cat a.jsonl b.jsonl`
            # of files that each open with one): dropped as the file's first one is, never a character
            # of the record (json.loads would refuse the line)
            text = raw.strip().removeprefix("\ufeff").strip()
            if not text:
                report.blank += 1
                continue
            bad = _BAD_BYTE.search(raw)
            if bad is not None:
                byte = ord(bad.group()) - 0xDC00
                report.malformed.append(
                    (lineno, f"not valid {name} (byte 0x{byte:02x} at column {bad.start() + 1})")
                )
                continue
            try:
                values = [(lineno, json.loads(text))]
            except json.JSONDecodeError as e:
                line = raw.removesuffix("\n").removesuffix("\r")
                values = _values_per_cr(line, lineno)
                if values is not None:
                    extra += line.count("\r")
                if values is None:
                    # (json's messages may end in "at": "Invalid control character at")
                    what = e.msg[: -len(" at")] if e.msg.endswith(" at") else e.msg
                    report.malformed.append((lineno, f"invalid JSON ({what} at column {e.colno})"))
                    continue
            except RecursionError:
                # the parser recurses once per level of arrays / objects
                why = f"JSON nested too deeply (about {sys.getrecursionlimit()} levels or more)"
                report.malformed.append((lineno, why))
                continue
            except ValueError as e:  # valid JSON Python refuses: an integer of > 4300 digits
                report.malformed.append((lineno, f"JSON that cannot be read ({e})"))
                continue
            for line, obj in values:
                if not isinstance(obj, dict):
                    why = f"expected a JSON object, got {type(obj).__name__}"
                    report.malformed.append((line, why))
                    continue
                lone = _lone_surrogate(obj) if _ESCAPED_SURROGATE.search(text) else None
                if lone is not None:
                    u = f"\\u{ord(lone):04x}"
                    why = f"invalid Unicode (a lone surrogate {u}, which is no character)"
                    report.malformed.append((line, why))
                    continue
                records.append(Record(obj, path, line))
    report.records = len(records)
    if report.malformed and _opens_with_bracket(path, encoding):
        # (no JSONL file opens so; skipping its lines would keep at most the objects that sat alone
        # on a line: said whatever skip_malformed is)
        raise DataError(
            f"data file {path!r} holds a JSON array, not JSONL: hoptune reads one JSON object per line. "
            'Convert it, e.g. python -c "import json,sys; [print(json.dumps(r)) for r in '
            'json.load(open(sys.argv[1]))]" in.json > out.jsonl'
        )
    if report.malformed and not skip_malformed:
        raise DataError(
            f"{path}: {len(report.malformed)} malformed line(s): {show_lines(report.malformed)}. Fix them, or set "
            "data.skip_bad_examples=true to skip and report them"
        )
    return records, report


# files that are no JSONL text (compressed, an archive, Parquet), by their first bytes
_NOT_TEXT = (
    (b"\x1f\x8b", "gzip-compressed"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (b"BZh", "bzip2-compressed"),
    (b"\xfd7zX", "xz-compressed"),
    (b"PK\x03\x04", "a zip archive"),
    (b"PAR1", "a Parquet file"),
)


def _opens_with_bracket(path: str, encoding: str) -> bool:
    """Whether the file's first character other than whitespace (and a byte-order mark) is "["."""
    with open(path, encoding=encoding, errors="replace") as f:
        while chunk := f.read(4096):
            text = chunk.lstrip().lstrip("\ufeff").lstrip()
            if text:
                return text[0] == "["
    return False


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``rows`` as JSONL atomically."""
    from hoptune._io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
