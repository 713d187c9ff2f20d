"""Tokenization with the model's chat template, and the length policy.

The one rule this module exists for (DESIGN.md §1, step 2): the tokens the sampler is given as a
prompt are exactly the tokens that precede the response in the loss. Both come from `prompt_ids`,
and a loss sequence is always `prompt_ids + response_ids`, never a re-tokenization of the whole
chat (a response's tokens are those that follow the prompt's in the whole chat's tokens: `_continuation`).
Special tokens are exactly what the template writes (BOS included): text is encoded with
add_special_tokens=False, as transformers' own apply_chat_template(tokenize=True) does.

A response ends with the template's end of turn cut just after the tokenizer's EOS token (ChatML
`<|im_end|>`, Llama-2 `</s>`), or at the first of the run's other stop ids (the model's EOS ids:
Llama 3's `<|eot_id|>` where the tokenizer's EOS is `<|end_of_text|>`), because that is where the
sampler stops: real and generated responses end the same way. A tokenizer without a chat template
is used as a plain-text model (BOS as the tokenizer adds it, prompt text, response text, EOS), which
is only defined for a prompt of one user turn: a system prompt or several turns need a template.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np

from spjax.data.lengths import LengthReport, apply_length_policy, check_lengths
from spjax.data.records import DataError, Example, Problem
from spjax.data.templates import clock_at, encode, has_chat_template, render

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """An example as token ids (int32), after the length policy. `id` is its index in its split."""

    id: int
    prompt_ids: np.ndarray  # the sampler's prompt and the loss's prefix, the same array
    real_ids: np.ndarray  # the real (SFT) or chosen (preference) response, ending in EOS unless truncated
    generated_ids: Optional[np.ndarray] = None  # the opponent's response, or the rejected one
    source: str = ""  # "file:line" of the record it came from
    uncut_real_ids: Optional[np.ndarray] = None  # the real response before max_len cut it (None: not cut)
    # The chat turns prompt_ids were rendered from (after whole-turn truncation): a judge with its own
    # chat template (a reward model's) renders them.
    prompt_messages: tuple = ()
    example_index: int = -1  # its record's place in the examples tokenize_examples was given (dropped ones count)

    @property
    def reference_ids(self) -> np.ndarray:
        """The whole real response: a judge's reference (a verifier's answer often sits at its end)."""
        return self.real_ids if self.uncut_real_ids is None else self.uncut_real_ids

    @property
    def length(self) -> int:
        """Tokens of the longer side of the pair."""
        other = 0 if self.generated_ids is None else len(self.generated_ids)
        return len(self.prompt_ids) + max(len(self.real_ids), other)


def _plain_prompt(tokenizer, prompt_messages, where: Problem) -> list:
    if len(prompt_messages) != 1 or prompt_messages[0]["role"] != "user":
        raise DataError([dataclasses.replace(
            where, what="a system prompt or several turns need a chat template, and the tokenizer has none")])
    text = prompt_messages[0]["content"]
    bare = encode(tokenizer, text)
    full = list(tokenizer.encode(text, add_special_tokens=True))
    # Keep the special tokens the tokenizer puts in front of plain text (its BOS), none behind it.
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k] + bare
    return bare


def prompt_ids(tokenizer, prompt_messages: Sequence[dict], *, where: Optional[Problem] = None,
               today: Optional[str] = None) -> np.ndarray:
    """THE prompt tokens (int32): the chat rendered with its generation prompt, special tokens as written.

    Both the sampler's input and the loss's prefix are this array; nothing else tokenizes prompts.
    `where` locates errors (DataError), e.g. `example.problem("prompt", "")`.
    """
    return np.asarray(_prompt(tokenizer, prompt_messages, where or Problem("<prompt>", 0, "prompt", ""), today)[1],
                      np.int32)


@functools.lru_cache(maxsize=8)
def _control_texts(tokenizer):
    """A pattern of the tokenizer's special tokens' texts (<|im_end|>, <|eot_id|>, </s>, [INST], ...): encoded,
    text holding one gets that control token, not its characters. One scan per text (Llama-3 has 256)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = sorted({t.content for t in decoder.values() if getattr(t, "special", False) and t.content}, key=len)
    return re.compile("|".join(re.escape(t) for t in reversed(texts))) if texts else None


def _check_text(tokenizer, text: str, where: Problem, what: str):
    """DataError if a turn's text holds a special token's: a user who typed '<|im_end|>' would end the turn
    there, a response would carry a control token that the judges' decoded text loses."""
    found = _control_texts(tokenizer) and _control_texts(tokenizer).search(text)
    if found:
        raise DataError([dataclasses.replace(where, what=(
            f"{what}contains the special token text {found.group()!r}, which would be encoded as that control token"))])


def _prompt(tokenizer, prompt_messages, where: Problem, today: Optional[str]) -> tuple:
    """(rendered text or None without a chat template, token list) of a prompt."""
    for k, m in enumerate(prompt_messages):
        _check_text(tokenizer, m["content"], where, f"messages[{k}] ({m['role']}) " if len(prompt_messages) > 1 else "")
    if not has_chat_template(tokenizer):
        return None, _plain_prompt(tokenizer, prompt_messages, where)
    text = render(tokenizer, prompt_messages, True, where, today)
    return text, encode(tokenizer, text)


def stop_ids(model_cfg, tokenizer) -> tuple:
    """The ids a response ends at, sampled or real: the model's EOS ids and the tokenizer's EOS."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return tuple(sorted(set(model_cfg.eos_token_ids) | ({int(eos)} if eos is not None else set())))


def response_ids(tokenizer, prompt_messages: Sequence[dict], response: str, *, where: Optional[Problem] = None,
                 today: Optional[str] = None, prompt: Optional[tuple] = None, stops: Sequence[int] = ()) -> np.ndarray:
    """Tokens (int32) that follow `prompt_ids(prompt_messages)` for this response, up to and including EOS,
    or the first of `stops` (the run's stop ids, `stop_ids`) if one comes before it.
    prompt: the prompt's `_prompt` (text, tokens) if the caller has it, not to render and encode it again."""
    where = where or Problem("<response>", 0, "response", "")
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise DataError([dataclasses.replace(where, what="the tokenizer has no EOS token to end a response with")])
    for text in (eos,) + _stop_texts(tokenizer, tuple(stops), eos):
        if text in response:
            raise DataError([dataclasses.replace(where, what=f"contains the end-of-turn token text {text!r}")])
    _check_text(tokenizer, response, where, "")
    ids = _response_ids(tokenizer, prompt_messages, response, where, today, prompt, eos)
    first = next((k for k, i in enumerate(ids) if i in stops), len(ids) - 1)
    return np.asarray(ids[:first + 1], np.int32)


@functools.lru_cache(maxsize=8)
def _stop_texts(tokenizer, stops: tuple, eos: str) -> tuple:
    """The texts of the stop ids that are added tokens (as text in a response, they would end it), EOS aside:
    looked up once per tokenizer, not per response."""
    return tuple(t for t, i in tokenizer.get_added_vocab().items() if i in stops and t != eos) if stops else ()


def _response_ids(tokenizer, prompt_messages, response, where, today, prompt, eos) -> list:
    if not has_chat_template(tokenizer):
        return encode(tokenizer, response) + [tokenizer.eos_token_id]
    prompt_where = dataclasses.replace(where, field="prompt")
    prompt_text, prompt_tokens = prompt or _prompt(tokenizer, prompt_messages, prompt_where, today)
    # Whatever the template writes between the generation prompt and the response (Llama-2's
    # space, or a stripped response) belongs to the response: the sampler has to produce it too.
    tail = _tail(tokenizer, prompt_messages, prompt_text, response, prompt_where, today)
    if tail is None and prompt_messages and prompt_messages[0]["role"] == "system":
        # Mistral v0.3's template writes the system prompt into the last message only, when it is the
        # user's: the chat with the response has none. What follows the generation prompt does not
        # depend on it, so it is read from the chat without it (and follows the prompt that has it).
        bare = list(prompt_messages[1:])
        tail = _tail(tokenizer, bare, render(tokenizer, bare, True, prompt_where, today), response, prompt_where,
                     today)
    if tail is None:
        raise DataError([dataclasses.replace(where, what=(
            "the chat template does not render the prompt (with its generation prompt) as a prefix of the "
            "chat with this response, so sampling and loss prompts could not be the same tokens"))])
    end = tail.find(eos)
    tail = tail + eos if end < 0 else tail[:end + len(eos)]
    return _continuation(tokenizer, prompt_text, prompt_tokens, tail)


def _tail(tokenizer, prompt_messages, prompt_text: str, response: str, where, today) -> Optional[str]:
    """What the template writes after the prompt (with its generation prompt) in the chat with this
    response; None if the prompt is not a prefix of that chat."""
    full = render(tokenizer, list(prompt_messages) + [{"role": "assistant", "content": response}], False, where,
                   today)
    return full[len(prompt_text):] if full.startswith(prompt_text) else None


def _continuation(tokenizer, prompt_text: str, prompt: list, tail: str) -> list:
    """The tail's tokens as they follow the prompt's: the chat tokenized whole, cut after the prompt's tokens.

    Tokenized alone, a SentencePiece tail (Llama-2, Mistral, Zephyr) starts with a word-start '▁' that
    the model never sees after the generation prompt, nor samples there: every real response would
    carry a token that tells it from a generated one. Where the prompt's last token and the tail's
    first merge (byte-level BPE: a response that starts with whitespace after the template's newline),
    the whole chat's tokens do not begin with the prompt's; the tail alone is then what a sampler given
    exactly the prompt's tokens can produce; encoded after a newline whose tokens it is cut from, so a
    SentencePiece tail gets no word-start '▁' (a text's start) there either.
    """
    whole = encode(tokenizer, prompt_text + tail)
    if whole[:len(prompt)] == prompt:
        return whole[len(prompt):]
    anchor, after = encode(tokenizer, "\n"), encode(tokenizer, "\n" + tail)
    return after[len(anchor):] if after[:len(anchor)] == anchor else encode(tokenizer, tail)


# ----------------------------------------------------------------------------- length policy


def fit_turns(tokenizer, messages: Sequence[dict], max_prompt_len: int, where: Problem,
              today: Optional[str] = None) -> tuple:
    """(messages, prompt) for a chat: as given if its prompt fits max_prompt_len, else without its oldest
    whole turns (the system prompt kept; the kept part starts at a user turn, as templates require),
    the longest such chat that fits. None of them fitting: as given, for the token cut of the length policy.
    prompt: `_prompt`'s (text, tokens)."""
    prompt = _prompt(tokenizer, messages, where, today)
    if len(prompt[1]) <= max_prompt_len or not has_chat_template(tokenizer):
        return messages, prompt
    head = 1 if messages[0]["role"] == "system" else 0
    for start in range(head + 1, len(messages)):
        if messages[start]["role"] != "user":
            continue
        kept = list(messages[:head]) + list(messages[start:])
        shorter = _prompt(tokenizer, kept, where, today)
        if len(shorter[1]) <= max_prompt_len:
            return kept, shorter
    return messages, prompt


def tokenize_example(tokenizer, ex: Example, today: Optional[str] = None, *, max_prompt_len: Optional[int] = None,
                     report: Optional[LengthReport] = None, stops: Sequence[int] = ()) -> tuple:
    """(prompt, real, second side or None) token ids of one example, before the length policy."""
    out = _tokenized(tokenizer, ex, today, max_prompt_len, stops)
    count_turns_cut(report, ex, out[0])
    return out[1:]


def count_turns_cut(report: Optional[LengthReport], ex: Example, turns: tuple):
    if report is not None and len(turns) < len(ex.prompt_messages):
        report.prompts_truncated += 1
        report.prompts_by_turns += 1
        report.cut.append(f"{ex.file}:{ex.line}")


def _tokenized(tokenizer, ex: Example, today: Optional[str], max_prompt_len: Optional[int],
               stops: Sequence[int]) -> tuple:
    """(the prompt's kept chat turns, prompt, real, second side or None) of one example.

    The pair's second side is the record's `rejected` (preference) or `generated` (SPIN) response.
    today: the date the chat template prints as today's (YYYY-MM-DD; None: the clock's).
    max_prompt_len: a multi-turn prompt over it loses its oldest whole turns first (`fit_turns`); the
    responses are tokenized after the chat that is kept.
    stops: the run's stop ids (`stop_ids`): a response ends at the first.
    """
    messages, where = ex.prompt_messages, ex.problem("prompt", "")
    if max_prompt_len is None:
        prompt = _prompt(tokenizer, messages, where, today)  # rendered, encoded once
    else:
        messages, prompt = fit_turns(tokenizer, messages, max_prompt_len, where, today)
    side = lambda text, field: response_ids(tokenizer, messages, text, where=ex.problem(field, ""),
                                            today=today, prompt=prompt, stops=stops)
    other = ex.rejected if ex.rejected is not None else ex.generated
    gen = None if other is None else side(other, "rejected" if ex.rejected is not None else "generated")
    return tuple(messages), np.asarray(prompt[1], np.int32), side(ex.response, "response"), gen


CHUNK = 64  # examples a thread tokenizes at a time


def tokenize_all(tokenizer, examples: Sequence[Example], today: Optional[str] = None, *,
                 max_prompt_len: Optional[int] = None, stops: Sequence[int] = (), desc: str = "data: tokenize",
                 threads: Optional[int] = None) -> list:
    """`_tokenized` of each example, in order, a DataError in the place of one that fails; on `threads`
    threads (None: this process's cores, at most 32).

    tokenizers' encode (about 3/4 of the time on long chats) releases the GIL, the template's rendering
    does not: threads make a split's tokenization up to ~4x faster on a many-core host (1.9x on 2 cores).
    The template's clock is pinned once for all threads: each pinning its own would race on
    transformers' module-level clock."""
    from spjax import metrics  # a bar: a chat template renders each of 200k prompts in about a minute

    def chunk(part):
        out = []
        for ex in part:
            try:
                out.append(_tokenized(tokenizer, ex, None, max_prompt_len, stops))
            except DataError as e:
                out.append(e)
        return out

    parts = [examples[k:k + CHUNK] for k in range(0, len(examples), CHUNK)]
    bar, results = metrics.progress(len(examples), desc, "example"), []
    threads = threads or _threads()
    pool = ThreadPoolExecutor(threads) if len(parts) > 1 and threads > 1 else None
    try:
        with clock_at(today):
            for part, done in zip(parts, pool.map(chunk, parts) if pool else map(chunk, parts)):
                results.extend(done)
                bar.update(len(part))
    finally:
        if pool:  # on Ctrl-C, not after every queued chunk has run
            pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    return results


def _threads() -> int:
    """This process's cores (a container's or a job's share, not the host's), at most 32."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 32))


def tokenize_examples(tokenizer, examples: Sequence[Example], *, max_prompt_len: int, max_len: int,
                      overlong: str = "truncate", split: str = "", today: Optional[str] = None,
                      stops: Sequence[int] = (), threads: Optional[int] = None,
                      unencodable: str = "refuse") -> tuple[list, LengthReport]:
    """Tokenize a split and apply the length policy. DataError lists every example that fails, or with
    unencodable="drop" they are dropped, counted in the report and the first few logged.

    Ids are dense 0..n-1 over the kept examples; `source` says which record each came from.
    threads: `tokenize_all`'s.
    """
    check_lengths(max_prompt_len, max_len, overlong)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    report, out, problems = LengthReport(), [], []
    fit = max_prompt_len if overlong == "truncate" else None
    done = tokenize_all(tokenizer, examples, today, max_prompt_len=fit, stops=stops,
                        desc=f"data {split or 'split'}: tokenize", threads=threads)
    for k, (ex, result) in enumerate(zip(examples, done)):
        if isinstance(result, DataError):
            problems.extend(result.problems)
            if unencodable == "drop":
                report.examples, report.dropped_unencodable = report.examples + 1, report.dropped_unencodable + 1
                report.cut.append(f"{ex.file}:{ex.line}")
            continue
        turns, p, real, gen = result
        count_turns_cut(report, ex, turns)
        cut = apply_length_policy(p, real, gen, max_prompt_len=max_prompt_len, max_len=max_len,
                                  overlong=overlong, bos_id=bos_id, report=report, source=f"{ex.file}:{ex.line}")
        if cut is not None:
            out.append(TokenizedExample(len(out), cut[0], cut[1], cut[2], f"{ex.file}:{ex.line}",
                                        None if len(cut[1]) == len(real) else np.asarray(real, np.int32), turns, k))
    if problems and unencodable != "drop":
        raise DataError(problems)
    if problems:
        log.warning("data %s: dropped %d record%s that cannot be encoded as written (data.unencodable=drop), e.g. %s",
                    split or "split", report.dropped_unencodable, "s" * (report.dropped_unencodable > 1),
                    "; ".join(map(str, problems[:3])))
    if report.kept != report.examples:
        log.warning("data %s: %s", split or "split", report)
    else:
        log.info("data %s: %s", split or "split", report)
    return out, report
