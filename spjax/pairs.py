"""Pair sources: where each prompt's second response comes from (DESIGN.md §1, "one game").

Every source turns a split's examples into pairs (x, y, y'): y is the real (SFT) or chosen response,
y' the second response. The round driver sees only the table below and the objective table:
  sampled   y' = the opponent's own sample, drawn on device each round (SPIN, chi2 self-play)
  data      y' = the record's rejected (or pre-generated) response, as given (offline DPO-style)
  judged    y, y' = the judge's preferred and dispreferred of the opponent's K samples (iterative
            DPO, SPPO, INPO), each with its soft win rate P(y_k beats the K samples)
A source is a function (ctx, params, t, split, examples) -> SplitPairs.

Sampling and judging are resumable: each chunk of samples or judgements is a file written
atomically, finished chunks are kept, and a sample depends only on (seed, round, example id, k).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from spjax import artifacts, judging, lora, metrics as metrics_lib, objectives, rope, sampler
from spjax.config import Config, ConfigError
from spjax.data import lengths as len_lib


@dataclasses.dataclass
class SplitPairs:
    """One split's pairs from a source. Pair ids are 0..n-1 (they index every per-pair array)."""

    pairs: list  # TokenizedExample: real_ids = y (real/chosen/winner), generated_ids = y'
    sampler_lp: Optional[dict] = None  # {pair id: y' token log-probs} when they are the opponent's
    win_real: Optional[np.ndarray] = None  # [n] P(y beats the K samples) (judged); None: 1 (y is the real one)
    win_gen: Optional[np.ndarray] = None  # [n] the same for y'; None: 0
    stats: dict = dataclasses.field(default_factory=dict)  # the source's own metrics (judge scores)


@dataclasses.dataclass
class RoundPairs:
    """A round's pairs by split ('train', 'held', and 'prev' for SPIN's D_{t-1}), both sides tokenized.

    sampler_lp: {split: {example id: token log-probs}} where the sampler's own log-probs are the
    opponent's (untempered sampling); the score phase then scores only the real side.
    wins: {split: (win_real [n], win_gen [n])}, the judge's soft win rates of the two sides.
    stats: {name: value} of the train split's source metrics, for the round's row.
    """

    splits: dict
    sampler_lp: dict
    wins: dict = dataclasses.field(default_factory=dict)
    stats: dict = dataclasses.field(default_factory=dict)

    def win_arrays(self, split: str) -> tuple:
        """(win_real [n], win_gen [n]) of a split: the judge's, or 1 and 0 (the real response wins)."""
        n = len(self.splits[split])
        return self.wins.get(split, (np.ones(n, np.float32), np.zeros(n, np.float32)))


def sampler_scores_usable(cfg: Config, model_cfg) -> bool:
    """Untempered, untruncated sampling: the sampler's token log-probs are the opponent's own. Not where a
    LongRoPE model's samples can pass its original context: the tokens sampled before that point were
    scored with its short divisors (as transformers' generate), a forward pass over the finished
    sequence scores every token with the long ones (spjax.rope)."""
    s = cfg.sampling
    crosses = (rope.long_inv_freq(model_cfg) is not None
               and cfg.data.max_prompt_len + s.max_new_tokens > model_cfg.rope_original_max_position)
    return s.temperature == 1.0 and s.top_k == 0 and s.top_p == 1.0 and not crosses


def resolve(cfg: Config, examples: list) -> str:
    """The pair source a run uses: run.pairs, with 'auto' decided by the records and the judge."""
    given = sum(e.generated_ids is not None for e in examples)
    source = cfg.run.pairs
    if source == "auto":  # (an objective without an opponent, sft, samples nothing: a judge scores held-out only)
        judged = cfg.judge.name and objectives.TABLE[cfg.objective.name].opponent
        source = "data" if examples and given == len(examples) else "judged" if judged else "sampled"
    elif source == "data" and given < len(examples):
        missing = next(e for e in examples if e.generated_ids is None)
        raise ConfigError(f"run.pairs: 'data' needs a rejected response in every record; {missing.source} "
                          f"has none ({len(examples) - given} of {len(examples)} lack one)")
    if cfg.run.reference == "initial" and source != "data":
        raise ConfigError(f"run.reference: 'initial' needs data pairs (a rejected response in every record: pi_0 "
                          f"scores them once, in round 0), and run.pairs=auto gives {source} pairs here "
                          f"({len(examples) - given} of {len(examples)} records have no rejected response)")
    if cfg.run.mix_previous and not objectives.TABLE[cfg.objective.name].opponent:  # (form_pairs skipped it)
        raise ConfigError(f"run.mix_previous: objective.name={cfg.objective.name} samples no opponent, so there is no "
                          "previous round's sampled pairs to mix in (it would be ignored)")
    if cfg.run.mix_previous and source != "sampled":  # D_{t-1} is last round's one sample per prompt
        raise ConfigError(f"run.mix_previous: only for sampled pairs (SPIN's D_{{t-1}}), and run.pairs="
                          f"{cfg.run.pairs} gives {source} pairs here")
    return source


# ---------------------------------------------------------------------------------------------
# The sources


def _sample_stats(ctx, t: int, split: str, gen: dict) -> dict:
    """Mean sample length, and the share of samples that hit sampling.max_new_tokens before an end of turn
    (said in one line: such a pair sets an unfinished answer against a finished one)."""
    unended = sum(len(g[0]) == 0 or int(g[0][-1]) not in ctx.eos_ids for g in gen.values())
    if unended and split == "train":
        ctx.echo(f"round {t}: {unended} of {len(gen)} {split} samples reached sampling.max_new_tokens="
                 f"{ctx.cfg.sampling.max_new_tokens} before an end of turn (raise it if that is many)")
    return {"sample_len": float(np.mean([len(g[0]) for g in gen.values()])) if gen else 0.0,
            "sample_unended": unended / max(len(gen), 1)}


def _sampled(ctx, params, t: int, split: str, examples: list) -> SplitPairs:
    gen = sample_round(ctx, params, t, examples, split)
    pairs = len_lib.attach_generated(examples, {i: g[0] for i, g in gen.items()}, max_len=ctx.cfg.data.max_len)[0]
    return SplitPairs(pairs, {i: g[1] for i, g in gen.items()} if sampler_scores_usable(ctx.cfg, ctx.model_cfg) else None,
                      stats=_sample_stats(ctx, t, split, gen))


def _data(ctx, params, t: int, split: str, examples: list) -> SplitPairs:
    del ctx, params, t, split  # the records' second responses, tokenized with the data
    return SplitPairs(list(examples))


def _judged(ctx, params, t: int, split: str, examples: list) -> SplitPairs:
    K = ctx.cfg.sampling.num_samples
    gen = sample_round(ctx, params, t, examples, split, K)
    scores_NxK, wins_NxKxK = judging.judge_round(ctx, t, split, examples, gen)
    pairs, win_real, win_gen = judging.judged_pairs(examples, gen, wins_NxKxK, K, ctx.cfg.judge.pairs,
                                                    ctx.cfg.data.max_len)
    empty = not len(scores_NxK)  # (no held-out examples: numpy warned "Mean of empty slice" each round)
    stats = {"judge_mean": np.nan if empty else float(scores_NxK.mean()),
             "judge_best": np.nan if empty else float(scores_NxK.max(axis=1).mean()),
             "judge_pairs": len(pairs) / max(len(examples), 1), **_sample_stats(ctx, t, split, gen)}
    return SplitPairs(pairs, None, win_real, win_gen, stats)


SOURCES = {"sampled": _sampled, "data": _data, "judged": _judged}


def _mirror(examples: list) -> list:
    """(y, y) pairs, for an objective that needs no opponent (the SFT baseline samples nothing)."""
    return [dataclasses.replace(e, generated_ids=e.real_ids) for e in examples]


def form_pairs(ctx, params, t: int, held: list) -> RoundPairs:
    """The round's pairs from ctx.source, the opponent being `params` (frozen for the round)."""
    out = RoundPairs({}, {})
    for split, ex in (("train", ctx.train), ("held", held)):
        if not ctx.objective.opponent and ctx.source != "data":
            out.splits[split] = _mirror(ex)
            continue
        got = SOURCES[ctx.source](ctx, params, t, split, ex)
        out.splits[split] = got.pairs
        if got.sampler_lp is not None:
            out.sampler_lp[split] = got.sampler_lp
        if got.win_real is not None:
            out.wins[split] = (got.win_real, got.win_gen)
        if split == "train":
            out.stats = got.stats
    if ctx.cfg.run.mix_previous and t > 0 and ctx.objective.opponent:
        out.splits["prev"] = previous_pairs(ctx, t)
    return out


def previous_pairs(ctx, t: int) -> list:
    """SPIN's D_{t-1}: last round's sampled pairs (ids shifted past this round's), to re-score under θ_t."""
    prev = unpack(artifacts.load_arrays(os.path.join(ctx.round_dir(t - 1), "samples_train.npz")))
    n = len(ctx.train)
    shifted = [dataclasses.replace(e, id=e.id + n) for e in ctx.train]
    return len_lib.attach_generated(shifted, {e.id + n: prev[e.id][0] for e in ctx.train},
                                    max_len=ctx.cfg.data.max_len)[0]


# ---------------------------------------------------------------------------------------------
# Sampling: the opponent answers every prompt, chunk by chunk


def split_key(seed: int, t: int, split: str):
    """The sampling key of a round's split. Example ids restart at 0 in every split, so with one key
    held-out example i would reuse training example i's random numbers: held-out pairs would not be
    independent of the trained ones. The held-out key is that of a round no run reaches, so none of its
    keys is a training example's or decode step's (fold_in(round key, 1) was training example 1's)."""
    return sampler.round_key(seed, t if split == "train" else 2**32 - 1 - t)


def sample_round(ctx, params, t: int, examples: list, split: str, num_samples: int = 1) -> dict:
    """{sample id: (generated token ids, their log-probs under the opponent)}, reusing chunks on disk.

    Sample k of example i has id i*K + k (K = num_samples; with one sample the example id). Chunk files
    are matched by sample id, not by position: a resume with another sampling.batch_size (other chunk
    boundaries) reuses every sample on disk and samples only the prompts missing (a sample depends on
    its ids alone, not on its batch).
    """
    s, n, K = ctx.cfg.sampling, len(examples), num_samples
    chunk_dir = os.path.join(ctx.round_dir(t), f"samples_{split}")
    done_path = os.path.join(ctx.round_dir(t), f"samples_{split}.npz")
    if os.path.exists(done_path):
        # Every process meets remove_tree's barrier on both paths: with every chunk on disk no collective
        # paces the processes, so process 0 can write done_path before a slower one checks for it; that one
        # skipped the barrier process 0 waited in, and their next collectives mismatched (both crashed).
        # It also clears chunks a process killed before that barrier left.
        out = unpack(artifacts.load_arrays(done_path))
        artifacts.remove_tree(chunk_dir)
        return out
    per_chunk = s.batch_size
    done = _sampled_on_disk(chunk_dir)
    bar = metrics_lib.progress(n, f"round {t} sample {split}", "prompt")
    out, sampling = {}, None
    for c, start in enumerate(range(0, n, per_chunk)):
        path = os.path.join(chunk_dir, f"chunk_{c:05d}.npz")
        part = examples[start:start + per_chunk]
        todo = [e for e in part if any(e.id * K + k not in done for k in range(K))]
        missing = {e.id for e in todo}
        got = {e.id * K + k: done[e.id * K + k] for e in part if e.id not in missing for k in range(K)}
        if todo:
            # A LoRA policy decodes merged (float base) or with its adapters on the fly (quantized base).
            sampling = sampling or lora.for_sampling(ctx.model_cfg, params)
            res = sampler.sample(*sampling, [e.prompt_ids.tolist() for e in todo],
                                 key=split_key(ctx.cfg.run.seed, t, split), example_ids=[e.id for e in todo],
                                 max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                 top_p=s.top_p, eos_ids=ctx.eos_ids, batch_size=per_chunk, mesh=ctx.mesh,
                                 pad_id=ctx.pad_id, num_samples=K, weights=s.weights)
            got.update({e.id * K + k: (np.asarray(res.tokens[j * K + k], np.int32),
                                       np.asarray(res.logprobs[j * K + k], np.float32))
                        for j, e in enumerate(todo) for k in range(K)})
            # overwriting a file of other chunk boundaries is safe: its samples were read into `done`
            # (a kill now costs at most sampling them again)
            artifacts.save_arrays(path, **pack(got))
            ctx.fault("sample")
        out.update(got)
        bar.update(len(part))
    bar.close()
    artifacts.save_arrays(done_path, **pack(out))
    artifacts.remove_tree(chunk_dir)
    return out


def _sampled_on_disk(chunk_dir: str) -> dict:
    """{sample id: (tokens, log-probs)} from every chunk file in chunk_dir (whatever its boundaries)."""
    done = {}
    for z in artifacts.load_chunks(chunk_dir):
        done.update(unpack(z))
    return done


def pack(gen: dict) -> dict:
    ids = np.asarray(sorted(gen), np.int64)
    lens = np.asarray([len(gen[i][0]) for i in ids], np.int64)
    cat = lambda k, dt: (np.concatenate([gen[i][k] for i in ids]) if len(ids) else np.zeros(0)).astype(dt)
    return {"ids": ids, "lengths": lens, "tokens": cat(0, np.int32), "logprobs": cat(1, np.float32)}


def unpack(z: dict) -> dict:
    ends = np.cumsum(z["lengths"])
    return {int(i): (z["tokens"][e - n:e], z["logprobs"][e - n:e]) for i, n, e in zip(z["ids"], z["lengths"], ends)}
