"""How a chat is rendered with a tokenizer's chat template: its clock and its variables.

Every chat spjax tokenizes goes through `render`: prompts with the generation prompt, whole chats
(a reward model's input) without. Two things besides the messages decide the text, and a run fixes
both so that a resume renders the prompts its samples and reference scores were made from:
- the date a template prints as today's (Llama 3's "Today Date"): `clock_at`, data.template_date;
- the template's variables (Qwen3's enable_thinking): `with_template_args`, data.template_args.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
from typing import Optional, Sequence

from spjax.data.records import DataError, Problem

_ARGS = "spjax_template_args"  # the attribute with_template_args sets on its copy of a tokenizer


def encode(tokenizer, text: str) -> list:
    """Text as ids, special tokens as written (apply_chat_template(tokenize=True) encodes so too)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def with_template_args(tokenizer, args: dict):
    """`tokenizer` whose chat template `render`s every chat with these variables too ({} : the same
    tokenizer): a copy, so the tokenizer a caller shares elsewhere renders as before. E.g. Qwen3's
    {"enable_thinking": False}: its generation prompt then ends in an empty <think></think> block, and
    a real response after it is the answer alone (without it, a prompt ends at "assistant\n", and the
    template writes the empty block at the start of each real response, where a sample starts to think)."""
    if not args:
        return tokenizer
    out = copy.copy(tokenizer)
    setattr(out, _ARGS, dict(args))
    return out


def template_args(tokenizer) -> dict:
    """The variables `render` passes to `tokenizer`'s template (with_template_args'; {} for any other)."""
    return dict(getattr(tokenizer, _ARGS, None) or {})


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@contextlib.contextmanager
def clock_at(today: Optional[str]):
    """Chat templates that print today's date (Llama 3's 'Today Date') call transformers' strftime_now,
    which reads `datetime.now()` of transformers' chat-template module; with `today` (YYYY-MM-DD) that
    clock reads midnight of that day instead. So a resume on another day, or a host past midnight,
    renders the prompts the round's samples and reference scores were made from. (A template's
    variables cannot carry a function: transformers replaces them by inert strings.)"""
    from transformers.utils import chat_template_utils as ctu
    real = getattr(ctu, "datetime", None)
    if not today or not (isinstance(real, type) and issubclass(real, datetime.datetime)):
        yield
        return
    ctu.datetime = _pinned(real, today)
    try:
        yield
    finally:
        ctu.datetime = real


@functools.lru_cache(maxsize=None)
def _pinned(real: type, today: str) -> type:
    """`real` (a datetime class) whose now() is midnight of `today`; one class per date, not per render."""
    midnight = datetime.datetime.combine(datetime.date.fromisoformat(today), datetime.time())
    return type("PinnedDatetime", (real,), {"now": classmethod(lambda cls, tz=None: midnight)})


def render(tokenizer, messages, generation_prompt: bool, where: Problem, today: Optional[str]) -> str:
    try:
        with clock_at(today):
            return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                 add_generation_prompt=generation_prompt, **template_args(tokenizer))
    except Exception as e:  # jinja raises TemplateError (and templates raise their own exceptions)
        raise DataError([dataclasses.replace(where, what=f"the chat template refused this chat: {e}")]) from e


def chat_ids(tokenizer, messages: Sequence[dict], today: Optional[str] = None) -> list:
    """A whole chat (its last turn included, no generation prompt) as `tokenizer`'s chat template renders
    it: what a reward model trained on that template reads. DataError if the template refuses it."""
    where = Problem("<chat>", 0, "messages", "")
    return encode(tokenizer, render(tokenizer, messages, False, where, today))
