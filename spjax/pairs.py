"""Pair sources: where each prompt's second response comes from (DESIGN.md §1, "one game").

Every source turns a split's examples into pairs (x, y, y'): y is the real (SFT) or chosen response,
y' the second response. The round driver sees only the table below and the objective table:
  sampled   y' = the opponent's own sample, drawn on device each round (SPIN, chi2 self-play)
  data      y' = the record's rejected (or pre-generated) response, as given (offline DPO-style)
A judged source (K samples ranked by a judge: iterative DPO, SPPO, INPO) is one more function of
the same signature: (ctx, params, t, split, examples) -> (pairs, sampler log-probs or None).

Sampling is resumable: each chunk of samples is a file written atomically, finished chunks are
kept, and a sample depends only on (seed, round, example id).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from spjax import checkpoint as ckpt_lib, metrics as metrics_lib, sampler
from spjax.config import Config, ConfigError
from spjax.data import tokens as tok_lib


@dataclasses.dataclass
class RoundPairs:
    """A round's pairs by split ('train', 'held', and 'prev' for SPIN's D_{t-1}), both sides tokenized.

    sampler_lp: {split: {example id: token log-probs}} where the sampler's own log-probs are the
    opponent's (untempered sampling); the score phase then scores only the real side.
    """

    splits: dict
    sampler_lp: dict


def sampler_scores_usable(cfg: Config) -> bool:
    """Untempered, untruncated sampling: the sampler's token log-probs are the opponent's own."""
    s = cfg.sampling
    return s.temperature == 1.0 and s.top_k == 0 and s.top_p == 1.0


def resolve(cfg: Config, examples: list) -> str:
    """The pair source a run uses: run.pairs, with 'auto' decided by the records."""
    given = sum(e.generated_ids is not None for e in examples)
    if cfg.run.pairs == "auto":
        return "data" if examples and given == len(examples) else "sampled"
    if cfg.run.pairs == "data" and given < len(examples):
        missing = next(e for e in examples if e.generated_ids is None)
        raise ConfigError(f"run.pairs: 'data' needs a rejected response in every record; {missing.source} "
                          f"has none ({len(examples) - given} of {len(examples)} lack one)")
    return cfg.run.pairs


# ---------------------------------------------------------------------------------------------
# The sources


def _sampled(ctx, params, t: int, split: str, examples: list):
    gen = sample_round(ctx, params, t, examples, split)
    pairs = tok_lib.attach_generated(examples, {i: g[0] for i, g in gen.items()}, max_len=ctx.cfg.data.max_len)[0]
    return pairs, ({i: g[1] for i, g in gen.items()} if sampler_scores_usable(ctx.cfg) else None)


def _data(ctx, params, t: int, split: str, examples: list):
    del ctx, params, t, split  # the records' second responses, tokenized with the data
    return list(examples), None


SOURCES = {"sampled": _sampled, "data": _data}


def _mirror(examples: list) -> list:
    """(y, y) pairs, for an objective that needs no opponent (the SFT baseline samples nothing)."""
    return [dataclasses.replace(e, generated_ids=e.real_ids) for e in examples]


def form_pairs(ctx, params, t: int, held: list) -> RoundPairs:
    """The round's pairs from ctx.source, the opponent being `params` (frozen for the round)."""
    splits, lps = {}, {}
    for split, ex in (("train", ctx.train), ("held", held)):
        if not ctx.objective.opponent and ctx.source == "sampled":
            splits[split] = _mirror(ex)
            continue
        splits[split], lp = SOURCES[ctx.source](ctx, params, t, split, ex)
        if lp is not None:
            lps[split] = lp
    if ctx.cfg.run.mix_previous and t > 0 and ctx.objective.opponent:
        splits["prev"] = previous_pairs(ctx, t)
    return RoundPairs(splits, lps)


def previous_pairs(ctx, t: int) -> list:
    """SPIN's D_{t-1}: last round's sampled pairs (ids shifted past this round's), to re-score under θ_t."""
    prev = unpack(ckpt_lib.load_arrays(os.path.join(ctx.round_dir(t - 1), "samples_train.npz")))
    n = len(ctx.train)
    shifted = [dataclasses.replace(e, id=e.id + n) for e in ctx.train]
    return tok_lib.attach_generated(shifted, {e.id + n: prev[e.id][0] for e in ctx.train},
                                    max_len=ctx.cfg.data.max_len)[0]


# ---------------------------------------------------------------------------------------------
# Sampling: the opponent answers every prompt, chunk by chunk


def sample_round(ctx, params, t: int, examples: list, split: str) -> dict:
    """{example id: (generated token ids, their log-probs under the opponent)}, reusing chunks on disk."""
    s, n = ctx.cfg.sampling, len(examples)
    chunk_dir = os.path.join(ctx.round_dir(t), f"samples_{split}")
    done_path = os.path.join(ctx.round_dir(t), f"samples_{split}.npz")
    if os.path.exists(done_path):
        return unpack(ckpt_lib.load_arrays(done_path))
    per_chunk = s.batch_size
    bar = metrics_lib.progress(n, f"round {t} sample {split}", "prompt")
    out = {}
    for k, start in enumerate(range(0, n, per_chunk)):
        path = os.path.join(chunk_dir, f"chunk_{k:05d}.npz")
        part = examples[start:start + per_chunk]
        if os.path.exists(path):
            got = unpack(ckpt_lib.load_arrays(path))
        else:
            res = sampler.sample(ctx.model_cfg, params, [e.prompt_ids.tolist() for e in part],
                                 key=sampler.round_key(ctx.cfg.run.seed, t), example_ids=[e.id for e in part],
                                 max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                 top_p=s.top_p, eos_ids=ctx.eos_ids, batch_size=per_chunk, mesh=ctx.mesh,
                                 pad_id=ctx.pad_id)
            got = {e.id: (np.asarray(tk, np.int32), np.asarray(lp, np.float32))
                   for e, tk, lp in zip(part, res.tokens, res.logprobs)}
            ckpt_lib.save_arrays(path, **pack(got))
            ctx.fault("sample")
        out.update(got)
        bar.update(len(part))
    bar.close()
    ckpt_lib.save_arrays(done_path, **pack(out))
    ckpt_lib.remove_tree(chunk_dir)
    return out


def pack(gen: dict) -> dict:
    ids = np.asarray(sorted(gen), np.int64)
    lens = np.asarray([len(gen[i][0]) for i in ids], np.int64)
    cat = lambda k, dt: (np.concatenate([gen[i][k] for i in ids]) if len(ids) else np.zeros(0)).astype(dt)
    return {"ids": ids, "lengths": lens, "tokens": cat(0, np.int32), "logprobs": cat(1, np.float32)}


def unpack(z: dict) -> dict:
    ends = np.cumsum(z["lengths"])
    return {int(i): (z["tokens"][e - n:e], z["logprobs"][e - n:e]) for i, n, e in zip(z["ids"], z["lengths"], ends)}
