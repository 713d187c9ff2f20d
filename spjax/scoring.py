"""Reference scoring: sequence log-probs of a round's pairs under the frozen opponent (or pi_0).

Scored once per round and cached in the round's refs.npz; the train step reads them as inputs, so
no second model is ever live during training (DESIGN.md §1, step 3).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from spjax import artifacts, lora, metrics as metrics_lib, objectives, pairs as pairs_lib
from spjax import step as step_lib
from spjax import sharding as shd
from spjax.data import batching, packing

log = logging.getLogger("spjax")


def score_examples(ctx, params, examples: list, which: str) -> np.ndarray:
    """[n] fp32 log pi(response | prompt) of each example's `which` side ('real_ids'/'generated_ids'),
    run.score_batch_size rows a call: packed several to a row where training packs (step.packs),
    else one right-padded sequence per row."""
    dp = shd.data_parallel_size(ctx.mesh)
    B = -(-ctx.cfg.run.score_batch_size // dp) * dp
    out = np.zeros(len(examples), np.float32)
    if examples and step_lib.packs(ctx.cfg.data.pack, ctx.model_cfg, ctx.buckets[-1]):
        L = batching.bucket_for(max(len(e.prompt_ids) + len(getattr(e, which)) for e in examples), ctx.buckets)
        quantum = packing.row_quantum(B, dp)
        calls = packing.side_rows(examples, which, max_rows=B // quantum * quantum, row_len=L, quantum=quantum,
                                  pad_id=ctx.pad_id)
        for rows, lp_RxL in _one_behind(calls, lambda rows: step_lib.score_rows(ctx.model_cfg, params, rows,
                                                                                mesh=ctx.mesh)):
            scored_RxL = rows["targets_RxL"] > 0
            np.add.at(out, rows["seqs_RxL"][scored_RxL], lp_RxL[scored_RxL])
        return out

    def call(start):
        ids_G = np.full(B, -1)
        ids_G[:min(B, len(examples) - start)] = np.arange(start, min(start + B, len(examples)))
        side = batching.side_batch(examples, ids_G, which, buckets=ctx.buckets, pad_id=ctx.pad_id)
        return step_lib.score(ctx.model_cfg, params, side["input_ids_BxL"], side["attention_mask_BxL"],
                              side["target_mask_BxL"], mesh=ctx.mesh)

    for start, lp in _one_behind(range(0, len(examples), B), call):
        out[start:start + B] = lp[:len(examples) - start]
    return out


def _one_behind(items, dispatch):
    """(item, dispatch(item) on the host) for each item, each result read once the next item's call is
    dispatched: the device computes call i + 1 while the host reads call i and prepares call i + 2
    (read at once, the device idled while the host packed each next batch)."""
    last = None
    for item in items:
        result = dispatch(item)
        if last is not None:
            yield last[0], shd.to_host(last[1])
        last = item, result
    if last is not None:
        yield last[0], shd.to_host(last[1])


def _summed(examples: list, token_lp: dict) -> np.ndarray:
    # attach_generated may have cut a response to max_len: sum only the tokens that were kept
    return np.asarray([token_lp[e.id][:len(e.generated_ids)].sum() for e in examples], np.float32)


def sampler_agrees(full_n, sampled_n, lengths_n, compute_dtype: str) -> bool:
    """Whether the sampler's summed log-probs of n responses are the forward pass's. fp32 agrees to ~1e-5 a
    token (the sampler tests hold 1e-4); in bf16 the cached decode and the forward pass round differently
    (~1e-3 a token), which 1e-4 always refused (the check wasted, all rescored, a warning each round). A
    real mismatch (a position or mask off) is ~1 a token."""
    per_token = 1e-4 if compute_dtype == "float32" else 2e-2
    return bool(np.all(np.abs(np.asarray(full_n) - np.asarray(sampled_n)) <= per_token * np.maximum(lengths_n, 1)))


def score_phase(ctx, params, t: int, pairs: pairs_lib.RoundPairs) -> dict:
    """{split: (ref_real [n], ref_gen [n])}, cached in the round's refs.npz.

    Zeros for an objective that reads no reference. With run.reference=initial (data pairs, the
    same every round) round 0's scores, taken under pi_0, serve every round. An objective whose
    reference mixes in pi_0 (INPO) has the round's pairs scored under pi_0 too (`_initial_scores`),
    both kept in refs.npz. For splits with
    sampler log-probs the generated side comes from those (half the scoring work), after checking
    the first batch against a full forward pass; a mismatch falls back to scoring everything.
    """
    if not ctx.objective.reference:
        return {k: (np.zeros(len(v), np.float32),) * 2 for k, v in pairs.splits.items()}
    first = ctx.cfg.run.reference == "initial"
    path = os.path.join(ctx.round_dir(0 if first else t), "refs.npz")
    if os.path.exists(path):
        return _mixed(ctx, artifacts.load_arrays(path), pairs.splits)
    bar = metrics_lib.progress(2 * sum(len(v) for v in pairs.splits.values()), f"round {t} score", "seq")
    out = {}
    for split, ex in pairs.splits.items():
        real = score_examples(ctx, params, ex, "real_ids")
        bar.update(len(ex))
        ctx.fault("score")
        gen = None
        if split in pairs.sampler_lp:
            gen = _summed(ex, pairs.sampler_lp[split])
            head = ex[:ctx.cfg.run.score_batch_size]
            full = score_examples(ctx, params, head, "generated_ids")
            if not sampler_agrees(full, gen[:len(head)], [len(e.generated_ids) for e in head],
                                  ctx.model_cfg.compute_dtype):
                log.warning("round %d: sampler log-probs differ from a forward pass (max %.2e); scoring "
                            "all generated responses", t, float(np.max(np.abs(full - gen[:len(head)]))))
                gen = None
        if gen is None:
            gen = score_examples(ctx, params, ex, "generated_ids")
        bar.update(len(ex))
        out[split] = (real, gen)
    bar.close()
    z = {f"{s}_{k}": v for s, (r, g) in out.items() for k, v in (("real", r), ("gen", g))}
    if ctx.objective.initial:
        z.update(_initial_scores(ctx, params, t, pairs, z))
    artifacts.save_arrays(path, **z)
    return _mixed(ctx, z, pairs.splits)


def _initial_scores(ctx, params, t: int, pairs: pairs_lib.RoundPairs, z: dict) -> dict:
    """{split_real0, split_gen0}: the pairs' log-probs under the run's initial policy pi_0: round 0's
    opponent itself; later, a LoRA policy's base with its starting adapter (lora.initial: lora.init_path's
    or B = 0; the base is not copied), else the initial checkpoint reloaded (freed after)."""
    if t == 0:  # the opponent of round 0 is pi_0 (base + lora.init_path's adapter, if any)
        return {f"{k}0": v for k, v in z.items()}
    if ctx.model_cfg.lora.rank:
        params0 = lora.initial(ctx.model_cfg, params)
    else:
        params0 = ctx.initial_params()
    out = {}
    for split, ex in pairs.splits.items():
        out[f"{split}_real0"] = score_examples(ctx, params0, ex, "real_ids")
        out[f"{split}_gen0"] = score_examples(ctx, params0, ex, "generated_ids")
        ctx.fault("score")
    del params0
    return out


def _mixed(ctx, z: dict, splits) -> dict:
    """{split: (ref_real, ref_gen)}: the objective's reference (objectives.mixed_reference)."""
    mix = lambda s, k: objectives.mixed_reference(ctx.cfg.objective, z[f"{s}_{k}"], z.get(f"{s}_{k}0"))
    return {s: (mix(s, "real"), mix(s, "gen")) for s in splits}
