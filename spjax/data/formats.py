"""The record formats: which fields each reads, and how a record becomes (prompt turns, response,
rejected, generated). Every parser reports each problem it finds through `report(field, what)`;
spjax.data.records locates them (file, line) and drops a record that has any.

Formats (DataConfig.format; 'auto' takes each file's from its first record, and a file holds one):
  prompt_response  {"prompt": str, "response": str, "system"?: str}
  messages         {"messages": [{"role", "content"}, ...]}: the last assistant turn is the response
  spin             UltraChat-200k ({"prompt", "messages"}) or SPIN ({"real", "generated"?, "prompt"?});
                   `real` and `generated` are chats (or strings next to a string `prompt`)
  preference       {"prompt", "chosen", "rejected"}: strings, or chats that carry the prompt
  sharegpt         {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...], "system"?: str}
                   (FastChat's layout: OpenHermes, SlimOrca, ...): the last gpt turn is the response
  alpaca           {"instruction": str, "input"?: str, "output": str, "system"?: str}: the user turn is the
                   instruction, then a blank line and the input when there is one
"""
from __future__ import annotations

from typing import Any, Callable, Optional

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "prompt_response", "messages", "spin", "preference", "sharegpt", "alpaca")
# A record with none of its format's key fields is in another format, not a record missing fields.
KEY_FIELDS = {"prompt_response": ("response",), "messages": ("messages",), "spin": ("real", "messages"),
              "preference": ("chosen", "rejected"), "sharegpt": ("conversations",), "alpaca": ("output",)}
EXPECTS = {"prompt_response": "prompt and response", "messages": "messages", "spin": "real or messages",
           "preference": "chosen and rejected", "sharegpt": "conversations", "alpaca": "instruction and output"}
# Keys some format reads: a record missing a field is told its other keys (a typo's 'respons' among them).
RECORD_KEYS = ("prompt", "system", "response", "messages", "real", "generated", "chosen", "rejected",
               "conversations", "instruction", "input", "output")
# ShareGPT's speakers as chat roles (FastChat names them so; some exports use the chat names).
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None



Report = Callable[[str, str], None]


def kind(v) -> str:
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
        report(field, f"expected a string, got {kind(v)}")
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
        report(field, f"expected a list of {{role, content}} turns, got {kind(turns)}")
        return None
    out, ok = [], True
    for i, m in enumerate(turns):
        at = f"{field}[{i}]"
        if not isinstance(m, dict):
            report(at, f"expected an object with role and content, got {kind(m)}")
            ok = False
            continue
        role = _field(m, "role", lambda _, what: report(f"{at}.role", what), known=("role", "content"))
        if role is None:
            ok = False
        elif not isinstance(role, str):
            report(f"{at}.role", f"expected a string, got {kind(role)}")
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
    return _with_system(obj, None if text is None else [{"role": "user", "content": text}], report)


def _diff(turns: list, prompt: list) -> str:
    """Where a chat answer's prompt turns first differ from the record's prompt, in a few words."""
    show = lambda m: f"{m['role']}: {m['content'][:40]!r}"  # noqa: E731
    for i, (a, b) in enumerate(zip(turns, prompt)):
        if a != b:
            return f"turn {i} is {show(a)} here, {show(b)} there"
    i = min(len(turns), len(prompt))  # one is the other's start: the first turn only one has
    longer, side = (turns, "here") if len(turns) > len(prompt) else (prompt, "there")
    return f"{len(turns)} turns here, {len(prompt)} there (turn {i}: {show(longer[i])} {side})"


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
            report(key, f"its prompt turns differ from the prompt given elsewhere in the record: {_diff(turns, prompt)}")
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


def _with_system(obj, prompt, report):
    """prompt with the record's optional `system` string first, unless it has a system turn."""
    system = _field(obj, "system", report, required=False)
    system = None if system is None else _text(system, "system", report)
    if system is None or prompt is None or (prompt and prompt[0]["role"] == "system"):
        return prompt
    return [{"role": "system", "content": system}] + prompt


def _sharegpt(obj, report):
    turns = _field(obj, "conversations", report)
    if turns is None:
        return None
    if not isinstance(turns, (list, tuple)):
        report("conversations", f"expected a list of {{from, value}} turns, got {kind(turns)}")
        return None
    if not any(isinstance(m, dict) and ("from" in m or "value" in m) for m in turns):
        split = _chat(turns, "conversations", report)  # {role, content} turns under this key: as messages'
        return None if split is None else (_with_system(obj, split[0], report), split[1], None, None)
    chat = []
    for i, m in enumerate(turns):  # as messages' turns, then checked as those are (order, text, ...)
        if not isinstance(m, dict):
            chat.append(m)
            continue
        turn = {k: v for k, v in m.items() if k not in ("from", "value", "role", "content")}  # (named if missing)
        if "from" in m:
            who = m["from"]
            if isinstance(who, str) and who not in SPEAKERS:
                report(f"conversations[{i}].from", f"unknown speaker {who!r} (expected one of {', '.join(SPEAKERS)})")
                return None
            turn["role"] = SPEAKERS.get(who, who) if isinstance(who, str) else who
        if "value" in m:
            turn["content"] = m["value"]
        chat.append(turn)
    renamed = lambda field, what: report(field.replace(".role", ".from").replace(".content", ".value"),
                                         what.replace("role and content", "from and value")
                                         .replace("assistant turn", "gpt turn").replace("a user turn", "a human turn"))
    split = _chat(chat, "conversations", renamed)
    if split is None:
        return None
    return _with_system(obj, split[0], report), split[1], None, None


def _alpaca(obj, report):
    instruction = _field(obj, "instruction", report)
    instruction = None if instruction is None else _text(instruction, "instruction", report)
    extra = obj.get("input")  # often "" when the instruction stands alone
    extra = None if extra is None or (isinstance(extra, str) and not extra.strip()) else _text(extra, "input", report)
    output = _field(obj, "output", report)
    output = None if output is None else _text(output, "output", report)
    if instruction is None:
        return None
    prompt = [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")}]
    return _with_system(obj, prompt, report), output, None, None


PARSERS = {"prompt_response": _prompt_response, "messages": _messages, "spin": _spin, "preference": _preference,
           "sharegpt": _sharegpt, "alpaca": _alpaca}
