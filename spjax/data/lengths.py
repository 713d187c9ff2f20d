"""The length policy: prompts and responses cut (or dropped) to data.max_prompt_len and data.max_len,
every cut counted and listed by file:line (a LengthReport, printed: never silent)."""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

OVERLONG = ("truncate", "drop")
log = logging.getLogger("spjax.data.tokens")  # (its lines were that module's)
if TYPE_CHECKING:
    from spjax.data.tokens import TokenizedExample


@dataclasses.dataclass
class LengthReport:
    """What the length policy did to one split; printed, never silent."""

    examples: int = 0
    kept: int = 0
    prompts_truncated: int = 0
    prompts_by_turns: int = 0  # of prompts_truncated: shortened by dropping their oldest whole turns
    responses_truncated: int = 0  # real or generated (or both) cut at max_len
    dropped_prompt: int = 0  # overlong="drop": prompt longer than max_prompt_len
    dropped_total: int = 0  # overlong="drop": prompt + a response longer than max_len
    dropped_unencodable: int = 0  # unencodable="drop": records the template or tokenizer cannot encode as written
    cut: list = dataclasses.field(default_factory=list)  # "file:line" of every example cut or dropped

    def __str__(self):
        turns = f" ({self.prompts_by_turns} by whole turns)" if self.prompts_by_turns else ""
        where = f" ({', '.join(self.cut[:3])}{', ...' if len(self.cut) > 3 else ''})" if self.cut else ""
        return (f"{self.examples} examples, {self.kept} kept; {self.prompts_truncated} prompts{turns} and "
                f"{self.responses_truncated} responses truncated; {self.dropped_prompt} dropped for a long "
                f"prompt, {self.dropped_total} for a long prompt+response"
                f"{f', {self.dropped_unencodable} as unencodable' if self.dropped_unencodable else ''}{where}")


def check_lengths(max_prompt_len: int, max_len: int, overlong: str):
    if overlong not in OVERLONG:
        raise ValueError(f"data.overlong: {overlong!r} not in {OVERLONG}")
    if not 0 < max_prompt_len < max_len:
        raise ValueError(f"data.max_prompt_len: must be in (0, max_len={max_len}), got {max_prompt_len}")


def truncate_prompt(ids: np.ndarray, max_prompt_len: int, bos_id: Optional[int]) -> np.ndarray:
    """Keep the end of a long prompt (the last question and the generation prompt), and its BOS."""
    if len(ids) <= max_prompt_len:
        return ids
    if bos_id is not None and len(ids) and ids[0] == bos_id:
        return np.concatenate([ids[:1], ids[len(ids) - max_prompt_len + 1:]])
    return ids[len(ids) - max_prompt_len:]


def apply_length_policy(prompt, real, generated, *, max_prompt_len, max_len, overlong, bos_id, report,
                        source: str = ""):
    """(prompt, real, generated) cut to fit, or None if dropped; counts it (from `source`) in `report`."""
    report.examples += 1
    sides = [real] if generated is None else [real, generated]
    long = len(prompt) > max_prompt_len or any(len(s) > max_len - min(len(prompt), max_prompt_len) for s in sides)
    if long and report.cut[-1:] != [source]:  # (a prompt that lost whole turns is listed already)
        report.cut.append(source)
    if len(prompt) > max_prompt_len:
        if overlong == "drop":
            report.dropped_prompt += 1
            return None
        prompt = truncate_prompt(prompt, max_prompt_len, bos_id)
        report.prompts_truncated += 1
    budget = max_len - len(prompt)
    if any(len(s) > budget for s in sides):
        if overlong == "drop":
            report.dropped_total += 1
            return None
        report.responses_truncated += 1
        sides = [s[:budget] for s in sides]
    report.kept += 1
    return prompt, sides[0], (sides[1] if len(sides) > 1 else None)


def attach_generated(examples: Sequence[TokenizedExample], generated: dict, *, max_len: int):
    """Examples with the sampler's responses ({id: token ids}) as their second side, cut to max_len.

    Sampled responses are never dropped (that would bias the pairs); returns (examples, n_truncated).
    """
    out, truncated = [], 0
    for ex in examples:
        if ex.id not in generated:
            raise KeyError(f"no generated response for example {ex.id} ({ex.source})")
        gen = np.asarray(generated[ex.id], np.int32)
        budget = max_len - len(ex.prompt_ids)
        if len(gen) > budget:
            gen, truncated = gen[:budget], truncated + 1
        out.append(dataclasses.replace(ex, generated_ids=gen))
    if truncated:
        log.warning("data: %d of %d generated responses truncated to max_len=%d", truncated, len(out), max_len)
    return out, truncated
