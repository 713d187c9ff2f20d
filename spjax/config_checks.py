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


def check_rope(cfg):
    """A ModelConfig's rope fields: positive where a zero or a negative gives NaN logits silently, a
    rotated part of each head of whole pairs, longrope's divisors one per rotated pair; and the q/k
    norms and q/k/v biases that no exported family computes together with what it has."""
    for name in ("rope_theta", "rope_factor", "rope_original_max_position", "rope_beta_fast", "rope_beta_slow"):
        check(getattr(cfg, name) > 0, f"model.{name}", f"must be > 0, got {getattr(cfg, name)}")
    check(cfg.rope_attention_factor >= 0, "model.rope_attention_factor",
          f"must be >= 0 (0: derived from rope_factor), got {cfg.rope_attention_factor}")
    check(0 < cfg.partial_rotary_factor <= 1, "model.partial_rotary_factor",
          f"must be in (0, 1], got {cfg.partial_rotary_factor}")
    check(cfg.rotary_dim % 2 == 0 and cfg.rotary_dim > 0, "model.head_dim" if cfg.partial_rotary_factor == 1
          else "model.partial_rotary_factor", f"RoPE rotates pairs of dims: {cfg.rotary_dim} of head_dim "
          f"{cfg.head_dim} is not a positive even number")
    check(not (cfg.qk_norm and cfg.qkv_bias), "model.qk_norm",  # Qwen3's attention_bias adds o's too
          "with qkv_bias: no transformers family computes both, so the model could not be exported")
    check(not ((cfg.qk_norm or cfg.qkv_bias) and (cfg.rotary_dim != cfg.head_dim or cfg.rope_type == "longrope")),
          "model.qk_norm" if cfg.qk_norm else "model.qkv_bias", "with partial rotary or longrope: no transformers "
          "family computes both, so the model could not be exported")
    phi3 = not (cfg.qk_norm or cfg.qkv_bias) and (  # exported as Phi-3 (tensor_names.export_arch)
        cfg.architecture == "phi3" or cfg.rotary_dim != cfg.head_dim or cfg.rope_type == "longrope")
    check(not phi3 or cfg.rope_type in ("default", "longrope"), "model.rope_type", f"{cfg.rope_type!r} with a "
          "Phi-3 model (partial rotary or architecture phi3): transformers' Phi3 computes default or longrope only")
    pairs = cfg.rotary_dim // 2
    for name in ("rope_short_factor", "rope_long_factor"):
        factors = getattr(cfg, name)
        if cfg.rope_type == "longrope" or factors:
            check(len(factors) == pairs and all(f > 0 for f in factors), f"model.{name}",
                  f"longrope needs {pairs} positive divisors (one per rotated pair of dims), got {len(factors)}"
                  + ("" if all(f > 0 for f in factors) else " with some <= 0"))


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
