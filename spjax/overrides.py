"""Command-line config: `key=value` overrides parsed against the dataclass field types, and config files.

A value for a whole group (`run=5`) is refused here; each dataclass's __post_init__ checks ranges
and names.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import os
import re
import traceback
import typing

from spjax.config import Config, ConfigError


def _coerce(value, typ, field):
    """Parse a command-line string (or check a Python value) against a dataclass field type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, [a for a in args if a is not type(None)][0], field)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{field}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{field}: expected {typ.__name__}, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{field}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{field}: expected int, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field}: expected str, got {value!r}")
        if value.startswith("~") and field.rsplit(".", 1)[-1].endswith(("path", "_dir")):
            return os.path.expanduser(value)  # a shell leaves the ~ of `data.path=~/x` as it is (not an assignment)
        return value
    if typ is tuple or origin is tuple:
        if isinstance(value, str):  # 32,64,96; also as Python writes it: [32, 64, 96], ('q', 'v')
            text = value.strip()
            if text[:1] + text[-1:] in ("[]", "()"):
                text = text[1:-1]
            value = [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
        inner = args[0] if args else None
        return tuple(_coerce(v, inner, field) if inner not in (None, Ellipsis) else v for v in value)
    return value


def override(cfg, dotted: str, value, _prefix: str = ""):
    """Return cfg with the field at `dotted` (e.g. 'objective.beta') set from `value` (str or typed)."""
    return apply(cfg, [(dotted, value)], _prefix)


def apply(cfg, items, _prefix: str = ""):
    """cfg with every (dotted key, value) of `items` set, each dataclass rebuilt once with all of its
    new values: its checks see the final config, whatever order the keys came in (one at a time,
    `run.stop_when_worse=1 run.keep_best=nll` failed where the reverse passed)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes, groups = {}, {}
    for dotted, value in items:
        head, _, rest = dotted.partition(".")
        where = _prefix + head
        if not head:
            raise ConfigError(f"{_prefix}{dotted or '='}: an empty key (overrides are key=value)")
        if head not in fields:
            near = difflib.get_close_matches(head, fields, n=1)
            hint = f"did you mean {_prefix}{near[0]}? " if near else ""
            raise ConfigError(f"{_prefix}{dotted}: unknown key ({hint}known: {', '.join(sorted(fields))})")
        if rest:
            sub = getattr(cfg, head)
            if sub is None and head == "model":
                raise ConfigError(f"{where}.{rest}: the model is read from model_path; `model` shapes a random "
                                  "init only (model_path empty). For a loaded model set param_dtype, compute_dtype, "
                                  "remat, attention, lora.* or base_quant (top level)")
            if not dataclasses.is_dataclass(sub):
                raise ConfigError(f"{_prefix}{dotted}: {where} has no sub-keys")
            groups.setdefault(head, []).append((rest, value))
            continue
        typ = hints[head]
        if any(dataclasses.is_dataclass(t) for t in (typ, *typing.get_args(typ))):
            raise ConfigError(f"{where}: a group of settings; set its keys, e.g. {where}.{_first_field(typ)}=...")
        changes[head] = _coerce(value, typ, where)
    for head, sub_items in groups.items():
        changes[head] = apply(getattr(cfg, head), sub_items, _prefix + head + ".")
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _first_field(typ) -> str:
    cls = next(t for t in (typ, *typing.get_args(typ)) if dataclasses.is_dataclass(t))
    return dataclasses.fields(cls)[0].name


def split_path(spec: str) -> tuple:
    """(file, arg or None) of a config spec `file.py[:arg]`: the arg may hold ':' and '/' (a path)."""
    m = re.match(r"(.*?\.py):(.*)\Z", spec, re.S)
    return (m.group(1), m.group(2)) if m else (spec, None)


def _where(path: str, tb) -> str:
    """`path:line` of the innermost frame of traceback `tb` that runs in the config file (else `path`)."""
    line = None
    for frame, lineno in traceback.walk_tb(tb):
        if os.path.abspath(frame.f_code.co_filename) == os.path.abspath(path):
            line = lineno
    return f"{path}:{line}" if line else path


def load(path: str, overrides=()) -> Config:
    """spjax.config.load_config: `get_config()` of a Python file (`file.py` or `file.py:arg`), then `key=value`s."""
    path, arg = split_path(path)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"spjax_config_{abs(hash(path))}", path)
    if spec is None or not os.path.isfile(path):  # a directory, README.md: no loader for it
        raise ConfigError(f"{path}: not a Python config file (a file.py defining get_config())")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: {e.msg}") from None
    except ConfigError as e:  # a value the file sets at its top level
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a misspelt import, a NameError: one line naming the file's line
        raise ConfigError(f"{_where(path, e.__traceback__)}: {type(e).__name__}: {e}") from None
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    params = inspect.signature(mod.get_config).parameters
    if arg is not None and not params:
        raise ConfigError(f"{path}: get_config() takes no stage argument (got {arg!r} after the ':')")
    if arg is None and any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                           for p in params.values()):
        raise ConfigError(f"{path}: get_config() needs an argument: pass it after a ':' ({path}:ARG)")
    try:
        cfg = mod.get_config(arg) if arg is not None else mod.get_config()
    except ConfigError as e:  # a value the file sets: say which file
        raise ConfigError(f"{path}: {e}") from None
    except ValueError as e:  # e.g. an unknown stage of a staged config
        raise ConfigError(f"{path}: get_config({'' if arg is None else repr(arg)}): {e}") from None
    except Exception as e:  # noqa: BLE001 - e.g. RunConfig(round=2), a missing env var: one line with the file's line
        raise ConfigError(f"{_where(path, e.__traceback__)}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not a spjax.config.Config")
    if isinstance(overrides, str):  # load_config(path, "a=1") would iterate its characters
        raise ConfigError(f"overrides: a list of key=value strings, got the string {overrides!r}")
    items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        twice = next((v for k, v in items if k == key), None)
        if twice is not None:
            raise ConfigError(f"{key}: given twice ({twice!r}, then {value!r}): give it once")
        items.append((key, value))
    cfg = apply(cfg, items)
    shaped = [k for k, _ in items if k.startswith("model.")]
    if shaped and cfg.model_path and os.path.exists(cfg.model_path):  # else it would be ignored, silently
        raise ConfigError(f"{shaped[0]}: the model is read from model_path={cfg.model_path}; `model` shapes a "
                          "random init only (model_path empty). For a loaded model set param_dtype, "
                          "compute_dtype, remat, attention, lora.* or base_quant (top level)")
    return cfg
