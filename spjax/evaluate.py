"""Held-out evaluation: how close the model's own greedy answers are to the references (token F1
and ROUGE-L over words), what the judge makes of them, their side-by-side display, and the round
driver's evaluate phase. The held-out reward metrics come from the objective table
(spjax.objectives), the same code the train step runs.
"""
from __future__ import annotations

import collections
import functools
import os
import re
import sys
import unicodedata
from typing import Optional

import numpy as np


def _mark_ranges() -> str:
    """A regex class body of every combining mark (Unicode M*: Devanagari vowel signs and virama, Thai
    vowels, Arabic harakat, a nukta, accents NFKC cannot compose): parts of a word, which `\\w` is not."""
    out, start = [], None
    for c in range(sys.maxunicode + 2):
        mark = c <= sys.maxunicode and unicodedata.category(chr(c))[0] == "M"
        if mark and start is None:
            start = c
        elif not mark and start is not None:
            out.append(f"\\u{start:04x}" if c - 1 == start else f"\\U{start:08x}-\\U{c - 1:08x}")
            start = None
    return "".join(out)


@functools.cache
def _word():
    """A word: a letter or digit, then letters, digits and the marks on them. '_' is punctuation (rouge-score
    and SQuAD drop it), though `\\w` holds it. (Built at first use: the scan of Unicode takes 0.25 s.)"""
    return re.compile(r"[^\W_](?:[^\W_]|[%s])*" % _mark_ranges())


def words(text: str) -> list:
    """Lower-cased words, NFKC-normalised (a composed and a decomposed 'é' are one letter), a letter's
    combining marks kept with it (Hindi 'रहा' and 'रही' are two words); punctuation, '_' included, is no
    word (as in rouge-score and SQuAD: 'No.' and 'Yes.' share nothing)."""
    return _word().findall(unicodedata.normalize("NFKC", text).lower())


def token_f1(pred: str, ref: str) -> float:
    """Bag-of-words F1 (SQuAD's, without its removal of articles)."""
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


# ---------------------------------------------------------------------------------------------
# The round driver's evaluate phase (ctx: a spjax.rounds.Context)

COLUMNS = ["loss", "accuracy", "margin", "reward_real", "reward_gen", "frac_at_bound", "nll", "f1", "rouge_l",
           "eval_accuracy", "eval_margin", "sample_s", "score_s", "train_s"]
JUDGE_COLUMNS = ["judge_score", "win_rate", "judge_mean", "judge_best", "judge_pairs"]  # with a judge


def _answers_path(ctx, t: Optional[int]) -> str:
    return os.path.join(ctx.workdir, "rounds", "init_answers.json") if t is None else \
        os.path.join(ctx.round_dir(t), "answers.json")


def judge_metrics(ctx, t: Optional[int], answers: list, preds: list, refs_text: list) -> dict:
    """The judge on the greedy held-out answers: their mean score (a verifier's: exact-match
    accuracy) and, after a round, the win rate of these answers over the previous model's."""
    from spjax import artifacts, judges
    held, tok = ctx.held, ctx.tokenizer
    prompts = [tok.decode(e.prompt_ids, skip_special_tokens=True).strip() for e in held]
    queries = [judges.Query(p, (a,), r, e.prompt_ids, (np.asarray(ids, np.int32),), e.prompt_messages)
               for p, a, r, e, ids in zip(prompts, preds, refs_text, held, answers)]
    scores, _ = judges.judge_all(ctx.judge, queries)
    out = {"judge_score": float(scores.mean()) if len(scores) else float("nan")}
    if len(scores) and np.isnan(out["judge_score"]) and ctx.cfg.run.keep_best == "judge_score":
        raise judges.JudgeError(f"run.keep_best: judge {ctx.judge.name} returns win matrices, which score no answer "
                                "alone, so there is no judge_score to keep the best round by; pick another metric")
    prev_path = _answers_path(ctx, None if not t else t - 1) if t is not None else None
    if prev_path and os.path.exists(prev_path):
        prev = artifacts.load_json(prev_path)
        out["win_rate"] = judges.win_rate(ctx.judge, prompts, preds, prev["text"], refs_text,
                                          [e.prompt_ids for e in held], [np.asarray(a, np.int32) for a in answers],
                                          [np.asarray(a, np.int32) for a in prev["tokens"]],
                                          [e.prompt_messages for e in held])
    artifacts.save_json(_answers_path(ctx, t), {"text": preds, "tokens": [list(map(int, a)) for a in answers]})
    return out


def evaluate_phase(ctx, params, name: str, pairs=None,
                   refs: Optional[dict] = None, t: Optional[int] = None) -> dict:
    """Held-out NLL, greedy-answer similarity (and the judge's view of those answers), and (after
    round t) the objective's metrics on held-out pairs, computed by the objective-table code the
    train step runs (ties count 1/2 there too)."""
    import jax
    from spjax import lora, objectives, sampler, scoring
    cfg, tok, held = ctx.cfg, ctx.tokenizer, ctx.held
    if not held:  # no held-out split (said at the start): the rows hold training metrics only
        return {}
    lp = scoring.score_examples(ctx, params, held, "real_ids")
    n_tok = np.asarray([max(len(e.real_ids), 1) for e in held], np.float32)
    out = {"nll": float(-(lp.sum() / n_tok.sum())), "held_lp_real": float(lp.mean())}
    res = sampler.sample(*lora.for_sampling(ctx.model_cfg, params), [e.prompt_ids.tolist() for e in held], key=0,
                         temperature=0.0, max_new_tokens=cfg.run.eval_max_new_tokens, eos_ids=ctx.eos_ids,
                         batch_size=cfg.sampling.batch_size, mesh=ctx.mesh, pad_id=ctx.pad_id,
                         weights=cfg.sampling.weights)
    preds = [tok.decode(t, skip_special_tokens=True).strip() for t in res.tokens]
    refs_text = [tok.decode(e.reference_ids, skip_special_tokens=True).strip() for e in held]  # not cut at max_len
    out.update(similarity(preds, refs_text))
    out["gen_len"] = float(np.mean(res.lengths))
    if ctx.judge is not None:
        out.update(judge_metrics(ctx, t, res.tokens, preds, refs_text))
        score = out["judge_score"]
        ctx.echo(f"[{name}] held-out judge score ({cfg.judge.name}, greedy answers): "
                 + ("none (a pairwise judge)" if np.isnan(score) else f"{score:.4f}")
                 + (f"; win rate over the previous model: {out['win_rate']:.3f}" if "win_rate" in out else ""))
    held_pairs = pairs.splits["held"] if pairs is not None else []
    if held_pairs:
        same = len(held_pairs) == len(held) and all(a.real_ids is b.real_ids for a, b in zip(held_pairs, held))
        lp_real = lp if same else scoring.score_examples(ctx, params, held_pairs, "real_ids")
        lp_gen = scoring.score_examples(ctx, params, held_pairs, "generated_ids")
        n_pair = np.asarray([max(len(e.real_ids), 1) for e in held_pairs], np.float32)
        win_real, win_gen = pairs.win_arrays("held")
        # one program (per pair count: judged rounds differ), not ~17 eager ops each compiled per count
        _, aux = jax.jit(objectives.objective_loss, static_argnums=0)(
            cfg.objective, lp_real, lp_gen, *refs["held"], n_pair, win_real_B=win_real, win_gen_B=win_gen)
        # named as the train step names them: aux's 'loss' is the pair loss (training's `pair_loss`; its
        # `loss` adds the NLL term)
        out.update({f"eval_{'pair_loss' if k == 'loss' else k}": float(v) for k, v in aux.items() if k != "nll"})
    # the prompt's tail: the last user turn (and the template's generation prompt)
    prompts = [" ".join(tok.decode(e.prompt_ids, skip_special_tokens=True).split())[-80:] for e in held]
    first = sorted({p: i for i, p in reversed(list(enumerate(prompts)))}.values())  # distinct prompts, in order
    pick = lambda xs: [xs[i] for i in first]
    ctx.echo(f"[{name}] held-out samples:\n" + side_by_side(pick(prompts), pick(preds), pick(refs_text),
                                                                       cfg.run.eval_show))
    return out


def evaluate_initial(ctx, params) -> dict:
    """The starting model's held-out row, computed once per run (a resume reads it back)."""
    from spjax import artifacts
    path = os.path.join(ctx.workdir, "rounds", "init_eval.json")
    if os.path.exists(path):
        return artifacts.load_json(path)
    row = evaluate_phase(ctx, params, "initial model")
    artifacts.save_json(path, row)
    return row
