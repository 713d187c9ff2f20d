"""How close the model's own greedy answers are to the references (token F1 and ROUGE-L over
words), and their side-by-side display. The held-out reward metrics come from the objective table
(spjax.objectives), the same code the train step runs; the driver calls both (rounds.evaluate_phase).
"""
from __future__ import annotations

import collections
import re

import numpy as np

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def words(text: str) -> list:
    return _WORD.findall(text.lower())


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style bag-of-words F1."""
    p, r = words(pred), words(ref)
    if not p or not r:
        return float(p == r)
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words)."""
    p, r = words(pred), words(ref)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def similarity(preds: list, refs: list) -> dict:
    return {"f1": float(np.mean([token_f1(p, r) for p, r in zip(preds, refs)])),
            "rouge_l": float(np.mean([rouge_l(p, r) for p, r in zip(preds, refs)]))}


def side_by_side(prompts: list, preds: list, refs: list, n: int, width: int = 100) -> str:
    """A few held-out prompts with the model's answer and the reference."""
    out = []
    for p, g, r in list(zip(prompts, preds, refs))[:n]:
        clip = lambda s: (s if len(s) <= width else s[:width - 3] + "...").replace("\n", " ")
        out += [f"  prompt:    {clip(p)}", f"  model:     {clip(g)}", f"  reference: {clip(r)}", ""]
    return "\n".join(out)
