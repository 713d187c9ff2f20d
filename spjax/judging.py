"""The judge phase of a judged round: K samples per prompt -> judgements on disk -> pairs.

`judge_round` asks ctx.judge (spjax.judges) about each prompt's K samples, a chunk of prompts at a
time; each finished chunk is a file written atomically that names its example ids, so a run killed
while judging resumes at the first unjudged prompts, whatever judge.batch_size it resumes with
(ctx.fault("judge") after each). `judged_pairs` turns the win matrices into pairs: best vs worst by
soft win rate (iterative DPO, SPPO, INPO), or every ordered pair with a winner. A prompt whose K
samples all tie gives no pair: there is nothing to prefer.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from spjax import artifacts, judges, metrics as metrics_lib


def _decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()


def queries(ctx, examples: list, gen: dict, K: int) -> list:
    """One judges.Query per example: its K samples (sample ids e.id*K + k) and its reference."""
    tok = ctx.tokenizer
    out = []
    for e in examples:
        ids = [gen[e.id * K + k][0] for k in range(K)]
        out.append(judges.Query(prompt=_decode(tok, e.prompt_ids), responses=tuple(_decode(tok, r) for r in ids),
                                reference=_decode(tok, e.reference_ids),  # uncut: a verifier's answer is at its end
                                prompt_ids=e.prompt_ids, response_ids=tuple(ids), messages=e.prompt_messages))
    return out


def _judged_on_disk(chunk_dir: str, K: int) -> dict:
    """{example id: (scores [K], wins [K, K])} from the chunk files in `chunk_dir`. A file names the
    example ids it holds, so rows are matched by id, never by position: a run resumed with another
    judge.batch_size (other chunk boundaries) reuses what it can and judges the rest. Files without
    ids (older runs) or with another K are ignored."""
    done = {}
    for z in artifacts.load_chunks(chunk_dir):
        ids = z.get("ids")
        if ids is None or z["scores"].shape != (len(ids), K) or z["wins"].shape != (len(ids), K, K):
            continue
        for i, s_K, w_KxK in zip(ids.tolist(), z["scores"], z["wins"]):
            done[i] = (s_K, w_KxK)
    return done


def judge_round(ctx, t: int, split: str, examples: list, gen: dict) -> tuple:
    """(scores [n, K], win probabilities [n, K, K]) of the split's samples, in example order,
    reusing judgements on disk."""
    K, n = ctx.cfg.sampling.num_samples, len(examples)
    done_path = os.path.join(ctx.round_dir(t), f"judged_{split}.npz")
    chunk_dir = os.path.join(ctx.round_dir(t), f"judged_{split}")
    if os.path.exists(done_path):  # remove_tree's barrier on both paths (see pairs.sample_round)
        z = artifacts.load_arrays(done_path)
        artifacts.remove_tree(chunk_dir)
        return z["scores"], z["wins"]
    done = _judged_on_disk(chunk_dir, K)
    per_chunk = ctx.cfg.judge.batch_size
    bar = metrics_lib.progress(n, f"round {t} judge {split}", "prompt")
    scores, wins = [], []
    with ctx.judge.on_device():  # (a reward model's params: on the devices for the phase, not per chunk)
        for c, start in enumerate(range(0, n, per_chunk)):
            part = examples[start:start + per_chunk]
            ids = [int(e.id) for e in part]
            todo = [e for e in part if int(e.id) not in done]  # judged on disk: reused, never judged again
            if todo:
                s_new, w_new = judges.judge_all(ctx.judge, queries(ctx, todo, gen, K))
                done.update((int(e.id), (s_new[j], w_new[j])) for j, e in enumerate(todo))
            s = np.stack([done[i][0] for i in ids]) if ids else np.zeros((0, K))
            w = np.stack([done[i][1] for i in ids]) if ids else np.zeros((0, K, K))
            if todo:
                # overwriting a file of other chunk boundaries is safe: its rows were read into `done` (a kill
                # now costs at most judging them again)
                artifacts.save_arrays(os.path.join(chunk_dir, f"chunk_{c:05d}.npz"), ids=np.asarray(ids, np.int64),
                                     scores=s, wins=w)
                ctx.fault("judge")
            scores.append(s)
            wins.append(w)
            bar.update(len(part))
    bar.close()
    out = {"scores": np.concatenate(scores) if scores else np.zeros((0, K)),
           "wins": np.concatenate(wins) if wins else np.zeros((0, K, K))}
    artifacts.save_arrays(done_path, **out)
    artifacts.remove_tree(chunk_dir)
    return out["scores"], out["wins"]


def pair_indices(wins_KxK: np.ndarray, how: str) -> list:
    """[(winner k, loser k')] of one prompt's samples: best vs worst by soft win rate (the row
    mean), or (how='all') every ordered pair where the first beats the second (P > 1/2)."""
    rate_K = wins_KxK.mean(axis=1)
    if how == "best_worst":
        w, l = int(np.argmax(rate_K)), int(np.argmin(rate_K))
        if not rate_K[w] > rate_K[l]:
            return []
        # A pairwise judge need not be transitive: the best by row mean can lose to the worst head to
        # head. The pair's label is the judge's own verdict on these two (INPO's y_w, y_l ~ lambda_p;
        # DPO's chosen), never contradicted; a head-to-head tie is no preference. (Scores, BT or graded,
        # are transitive: there P[w, l] > 1/2 whenever rate_K[w] > rate_K[l], and nothing changes.)
        if wins_KxK[w, l] == 0.5:
            return []
        return [(w, l)] if wins_KxK[w, l] > 0.5 else [(l, w)]
    K = len(rate_K)
    return [(i, j) for i in range(K) for j in range(K) if wins_KxK[i, j] > 0.5]


def judged_pairs(examples: list, gen: dict, wins_NxKxK: np.ndarray, K: int, how: str, max_len: int) -> tuple:
    """(pairs, win_real [m], win_gen [m]): pair p is (prompt, winner sample, loser sample) with ids
    0..m-1; win_* are the two samples' soft win rates P(y_k beats the K samples)."""
    pairs, win_real, win_gen = [], [], []
    for e, wins_KxK in zip(examples, wins_NxKxK):
        rate_K = wins_KxK.mean(axis=1)
        budget = max_len - len(e.prompt_ids)  # sampled responses are cut, never dropped
        side = lambda k, e=e, budget=budget: np.asarray(gen[e.id * K + k][0][:budget], np.int32)
        for w, l in pair_indices(wins_KxK, how):
            pairs.append(dataclasses.replace(e, id=len(pairs), real_ids=side(w), generated_ids=side(l),
                                             source=f"{e.source} samples {w}>{l}"))
            win_real.append(rate_K[w])
            win_gen.append(rate_K[l])
    return pairs, np.asarray(win_real, np.float32), np.asarray(win_gen, np.float32)
