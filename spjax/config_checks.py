"""The checks every spjax.config group runs on itself: one ConfigError line naming the field.

Kept apart from the groups' declarations (spjax.config) so that those read as the list of settings.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import typing


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the field."""


def check(ok: bool, field: str, msg: str):
    if not ok:
        raise ConfigError(f"{field}: {msg}")


def one_of(value, field: str, choices: tuple):
    check(value in choices, field, f"{value!r} not in {choices}")


def typed_and_finite(cfg, group: str):
    """Every field of a config of its declared type (a config file's export="no" is a truthy string: the
    run exported; rounds="2" was a TypeError in a check), every float finite (inf or nan in a rate or a
    scale is always a mistake). Groups check their own fields when they are built."""
    prefix = f"{group}." if group else ""
    for f in dataclasses.fields(cfg):
        v, typ = getattr(cfg, f.name), _hints(type(cfg))[f.name]
        if typing.get_origin(typ) is typing.Union and v is not None:
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        if typ is tuple or typing.get_origin(typ) is tuple:
            inner = (typing.get_args(typ) or (None,))[0]
            ok = isinstance(v, (tuple, list)) and all(_IS.get(inner, lambda x: True)(x) for x in v)
        else:
            ok = v is None or dataclasses.is_dataclass(v) or _IS.get(typ, lambda x: True)(v)
        check(ok, prefix + f.name, f"expected {getattr(typ, '__name__', typ)}, got {v!r} ({type(v).__name__})")
        check(not isinstance(v, float) or math.isfinite(v), prefix + f.name, f"must be finite, got {v}")


_IS = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
       float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), str: lambda v: isinstance(v, str)}


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def iso_date(text: str) -> bool:
    try:
        return bool(datetime.date.fromisoformat(text))
    except ValueError:
        return False


# apply_chat_template's own parameters: a template variable of one of these names would change the call
_TEMPLATE_CALL = ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                  "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                  "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")


def template_kwargs(args, field: str = "data.template_args") -> dict:
    """{name: value} of NAME=VALUE texts (data.template_args): VALUE read as JSON (false, 3, "x"), else
    as the text itself. ConfigError naming the field for a text without a NAME or a reserved NAME."""
    out = {}
    for a in args:
        name, eq, value = str(a).partition("=")
        name = name.strip()
        check(bool(eq) and name.isidentifier(), field, f"{a!r} is not NAME=VALUE (e.g. enable_thinking=false)")
        check(name not in _TEMPLATE_CALL, field, f"{name} is apply_chat_template's own parameter, not a template "
              "variable: spjax sets it")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value.strip()
    return out
