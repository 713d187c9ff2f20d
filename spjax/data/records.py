"""Read SFT and preference records from local files into one canonical `Example`, refusing bad input.

Every problem is a `Problem` that prints as `file:line: field: what is wrong` (for Parquet the line
is the 1-based row). Parsing collects all problems of a file instead of stopping at the first, so
`python -m spjax.data validate` can list them; `load_file` raises them together as one DataError.

Formats (DataConfig.format; 'auto' takes each file's from its first record, and a file holds one):
  prompt_response  {"prompt": str, "response": str, "system"?: str}
  messages         {"messages": [{"role", "content"}, ...]}: the last assistant turn is the response
  spin             UltraChat-200k ({"prompt", "messages"}) or SPIN ({"real", "generated"?, "prompt"?});
                   `real` and `generated` are chats (or strings next to a string `prompt`)
  preference       {"prompt", "chosen", "rejected"}: strings, or chats that carry the prompt
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Optional

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "prompt_response", "messages", "spin", "preference")
# A record with none of its format's key fields is in another format, not a record missing fields.
KEY_FIELDS = {"prompt_response": ("response",), "messages": ("messages",), "spin": ("real", "messages"),
              "preference": ("chosen", "rejected")}
EXPECTS = {"prompt_response": "prompt and response", "messages": "messages", "spin": "real or messages",
           "preference": "chosen and rejected"}
# Keys some format reads: a record missing a field is told its other keys (a typo's 'respons' among them).
RECORD_KEYS = ("prompt", "system", "response", "messages", "real", "generated", "chosen", "rejected")
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


def detect_format(obj: dict) -> Optional[str]:
    """The format a record's fields say it is in, or None."""
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "real" in obj:
        return "spin"
    if "messages" in obj:
        return "spin" if "prompt" in obj else "messages"
    if "prompt" in obj and "response" in obj:
        return "prompt_response"
    return None


def parse_record(obj: dict, fmt: str, file: str, line: int) -> tuple[Optional[Example], list[Problem]]:
    """Check one record in format `fmt` and turn it into an Example (None if anything is wrong)."""
    problems: list[Problem] = []

    def report(field, what):
        problems.append(Problem(file, line, field, what))

    parsed = _PARSERS[fmt](obj, report)
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
                                        "expected prompt+response, messages, real/generated or prompt+chosen+rejected"))
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


# ----------------------------------------------------------------------------- per-format parsers

Report = Callable[[str, str], None]


def _kind(v) -> str:
    names = {type(None): "null", dict: "an object", list: "a list", bool: "a boolean"}
    return names.get(type(v), type(v).__name__)


def _text(v, field: str, report: Report) -> Optional[str]:
    """A non-empty string, or None after reporting what is wrong."""
    if isinstance(v, bytes):  # Parquet binary columns
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError as e:
            report(field, f"not valid UTF-8: byte 0x{v[e.start]:02x} at offset {e.start}")
            return None
    if not isinstance(v, str):
        report(field, f"expected a string, got {_kind(v)}")
        return None
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can escape half a UTF-16 pair ("\ud83c"); no text can hold it
            report(field, f"lone surrogate {v[e.start]!r} at character {e.start + 1} (half of a UTF-16 pair)")
            return None
    if not v.strip():
        report(field, "empty")
        return None
    return v


def _field(obj, key, report, required=True, known=RECORD_KEYS) -> Optional[Any]:
    if obj.get(key) is None:
        if required:  # "missing (null)": still "missing", as Parquet writes a missing value as null
            unknown = [repr(k) for k in obj if k not in known]
            why = f" (unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)})" if unknown else ""
            report(key, "missing (null)" if key in obj else "missing" + why)
        return None
    return obj[key]


def _chat(turns, field: str, report: Report):
    """(prompt turns, response) from a chat whose last assistant turn is the response."""
    if not isinstance(turns, (list, tuple)):
        report(field, f"expected a list of {{role, content}} turns, got {_kind(turns)}")
        return None
    out, ok = [], True
    for i, m in enumerate(turns):
        at = f"{field}[{i}]"
        if not isinstance(m, dict):
            report(at, f"expected an object with role and content, got {_kind(m)}")
            ok = False
            continue
        role = _field(m, "role", lambda _, what: report(f"{at}.role", what), known=("role", "content"))
        if role is None:
            ok = False
        elif not isinstance(role, str):
            report(f"{at}.role", f"expected a string, got {_kind(role)}")
            ok = False
        elif role not in ROLES:
            report(f"{at}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
            ok = False
        elif role == "system" and i != 0:
            report(f"{at}.role", "a system turn may only come first")
            ok = False
        content = _field(m, "content", lambda _, what: report(f"{at}.content", what), known=("role", "content"))
        content = None if content is None else _text(content, f"{at}.content", report)
        ok = ok and content is not None
        out.append({"role": role, "content": content})
    if not ok:
        return None
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        report(field, "no assistant turn (the last assistant turn is the response)")
        return None
    if last != len(out) - 1:
        report(f"{field}[{last + 1}]", f"a {out[last + 1]['role']} turn after the last assistant turn")
        return None
    return out[:last], out[last]["content"]


def _prompt(obj, report, required=False) -> Optional[list]:
    """The prompt as chat turns: a string (plus an optional `system` string) or a list of turns."""
    value = _field(obj, "prompt", report, required)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") == "assistant":
            report("prompt", "a chat prompt must be a non-empty list of turns not ending with an assistant turn")
            return None
        split = _chat(list(value) + [{"role": "assistant", "content": "-"}], "prompt", report)
        return None if split is None else split[0]
    text = _text(value, "prompt", report)
    system = _field(obj, "system", report, required=False)
    system = None if system is None else _text(system, "system", report)
    if text is None:
        return None
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def _answer(obj, key, prompt, report, required=True):
    """(prompt, answer) from a string answer next to `prompt`, or a chat answer that carries it."""
    value = _field(obj, key, report, required)
    if value is None:
        return prompt, None
    if isinstance(value, (list, tuple)):
        split = _chat(value, key, report)
        if split is None:
            return prompt, None
        turns, answer = split
        if turns and prompt is not None and turns != prompt:
            report(key, "its prompt turns differ from the prompt given elsewhere in the record")
        return (prompt if prompt is not None else turns), answer
    if prompt is None and obj.get("prompt") is None:
        report("prompt", f"missing (needed next to a string {key})")
    return prompt, _text(value, key, report)


# Each parser reports every problem it finds; parse_record drops a record that has any.


def _prompt_response(obj, report):
    prompt = _prompt(obj, report, required=True)
    response = _field(obj, "response", report)
    return prompt, None if response is None else _text(response, "response", report), None, None


def _messages(obj, report):
    turns = _field(obj, "messages", report)
    split = None if turns is None else _chat(turns, "messages", report)
    if split is None:
        return None
    prompt, response = split
    if obj.get("prompt") is not None:  # UltraChat: `prompt` repeats the first user turn
        text = _text(obj["prompt"], "prompt", report)
        first_user = next((m["content"] for m in prompt if m["role"] == "user"), None)
        if text is not None and first_user is not None and text.strip() != first_user.strip():
            report("prompt", "differs from the first user turn of messages")
    return prompt, response, None, None


def _spin(obj, report):
    if "real" not in obj:
        return _messages(obj, report)
    prompt = _prompt(obj, report)
    prompt, real = _answer(obj, "real", prompt, report)
    prompt, generated = _answer(obj, "generated", prompt, report, required=False)
    return prompt, real, None, generated


def _preference(obj, report):
    prompt = _prompt(obj, report)
    prompt, chosen = _answer(obj, "chosen", prompt, report)
    prompt, rejected = _answer(obj, "rejected", prompt, report)
    return prompt, chosen, rejected, None


_PARSERS = {"prompt_response": _prompt_response, "messages": _messages, "spin": _spin, "preference": _preference}
