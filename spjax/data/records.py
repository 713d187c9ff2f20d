"""Read SFT and preference records from local files into one canonical `Example`, refusing bad input.

Every problem is a `Problem` that prints as `file:line: field: what is wrong` (for Parquet the line
is the 1-based row). Parsing collects all problems of a file instead of stopping at the first, so
`python -m spjax.data validate` can list them; `load_file` raises them together as one DataError.

The formats (which fields each reads) are spjax.data.formats'.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Optional

from spjax.data.formats import EXPECTS, FORMATS, KEY_FIELDS, PARSERS, detect_format  # noqa: F401 (re-exported)
from spjax.data.formats import kind as _kind

SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_SHOWN = 50  # problems spelled out in a DataError message; `.problems` keeps them all


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located as precisely as the input allows."""

    file: str
    line: int
    field: str
    what: str

    def __str__(self):
        return f"{self.file}:{self.line}: {self.field}: {self.what}"


class DataError(ValueError):
    """Bad input data; `.problems` lists every problem found, the message spells them out."""

    def __init__(self, problems):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems[:MAX_SHOWN]]
        if len(self.problems) > MAX_SHOWN:
            lines.append(f"... and {len(self.problems) - MAX_SHOWN} more problems")
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Example:
    """One canonical example: a chat prompt and its response (plus the pair's other side, if any)."""

    prompt_messages: list  # [{"role": "system"|"user"|"assistant", "content": str}], >= 1 user turn
    response: str  # the real (SFT) or chosen (preference) response
    rejected: Optional[str] = None  # preference data only
    generated: Optional[str] = None  # SPIN data that already holds the opponent's response
    file: str = ""  # where it came from, for error messages
    line: int = 0

    def problem(self, field: str, what: str) -> Problem:
        return Problem(self.file, self.line, field, what)


# ----------------------------------------------------------------------------- reading files


def read_objects(path: str) -> Iterator[tuple[int, Any]]:
    """Yield (line, object) for each record of a .jsonl/.json/.parquet file; a Problem in place of
    an object that cannot be read. An empty file yields one Problem."""
    if not os.path.isfile(path):
        yield 1, Problem(path, 1, "file", "no such file")
        return
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        yield 1, Problem(path, 1, "file", f"unknown file type {suffix!r} (expected {', '.join(SUFFIXES)})")
        return
    reader = _parquet_rows if suffix == ".parquet" else _json_records
    count = 0
    for line, obj in reader(path):
        count += 1
        if not isinstance(obj, (dict, Problem)):
            obj = Problem(path, line, "record", f"expected a JSON object, got {_kind(obj)}")
        yield line, obj
    if count == 0:
        yield 1, Problem(path, 1, "record", "empty file: no records")


def _json_records(path):
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):
        yield from _json_array(path)
        return
    with open(path, "rb") as f:  # JSON Lines (also what most `.json` exports really are)
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                what = f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                yield n, Problem(path, n, "record", what)
                continue
            try:
                yield n, json.loads(text)
            except json.JSONDecodeError as e:
                yield n, Problem(path, n, "record", f"invalid JSON: {e.msg} at column {e.colno}")


def _json_array(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        yield line, Problem(path, line, "record", f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {col}")
        return
    decoder = json.JSONDecoder()
    i = _skip_ws(text, text.index("[") + 1)
    line, counted = 1, 0  # line of text[counted], advanced incrementally (arrays can be large)
    while i < len(text) and text[i] != "]":
        line, counted = line + text.count("\n", counted, i), i
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield e.lineno, Problem(path, e.lineno, "record", f"invalid JSON: {e.msg} at column {e.colno}")
            return  # no way to resynchronise inside an array
        yield line, obj
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif i >= len(text) or text[i] != "]":
            line = text.count("\n", 0, i) + 1
            yield line, Problem(path, line, "record", "invalid JSON: expected ',' or ']' after an array element")
            return
    if i >= len(text):
        line = text.count("\n") + 1
        yield line, Problem(path, line, "record", "invalid JSON: the array is not closed with ']'")
    elif (rest := _skip_ws(text, i + 1)) < len(text):  # e.g. two arrays appended, or a list per line
        line = text.count("\n", 0, rest) + 1
        yield line, Problem(path, line, "record", "content after the JSON array's closing ']' (a file holds one "
                                                  "JSON array, or one JSON object per line)")


def _skip_ws(text, i):
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _parquet_rows(path):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        yield 1, Problem(path, 1, "file", f"cannot read Parquet: {e}")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            row += 1
            yield row, obj


# ----------------------------------------------------------------------------- records


def parse_record(obj: dict, fmt: str, file: str, line: int) -> tuple[Optional[Example], list[Problem]]:
    """Check one record in format `fmt` and turn it into an Example (None if anything is wrong)."""
    problems: list[Problem] = []

    def report(field, what):
        problems.append(Problem(file, line, field, what))

    parsed = PARSERS[fmt](obj, report)
    if parsed is None or problems:
        return None, problems
    prompt, response, rejected, generated = parsed
    if not prompt or not any(m["role"] == "user" for m in prompt):  # e.g. a chat of [system, assistant]
        report("prompt", "no user turn before the response")
        return None, problems
    return Example(prompt, response, rejected, generated, file, line), problems


def parse_file(path: str, fmt: str = "auto") -> tuple[list[Example], list[Problem], str]:
    """All examples of a file, every problem found, and the format used (detected if 'auto')."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} not in {FORMATS}")
    examples, problems, used, first = [], [], fmt, 0
    for line, obj in read_objects(path):
        if isinstance(obj, Problem):
            problems.append(obj)
            continue
        if used == "auto":
            used, first = detect_format(obj) or "auto", line
            if used == "auto":
                problems.append(Problem(path, line, "record", f"cannot tell the format from fields {sorted(obj)}: "
                                        "expected prompt+response, messages, real/generated, prompt+chosen+rejected, "
                                        "conversations (ShareGPT) or instruction+output (Alpaca)"))
                continue
        ex, found = parse_record(obj, used, path, line)
        looks = detect_format(obj) if found and fmt == "auto" else None
        if looks not in (None, used) and not any(k in obj for k in KEY_FIELDS[used]):
            # Say that the format changed, not that the first record's fields are missing.
            found = [Problem(path, line, "record", f"format {used} (from line {first}) expects {EXPECTS[used]}; "
                             f"this record looks like {looks}")]
        problems.extend(found)
        if ex is not None:
            examples.append(ex)
    return examples, problems, used


def load_file(path: str, fmt: str = "auto") -> list[Example]:
    """The examples of a file; DataError listing every problem if there is any."""
    examples, problems, _ = parse_file(path, fmt)
    if problems:
        raise DataError(problems)
    return examples
