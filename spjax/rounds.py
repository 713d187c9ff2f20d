"""The self-play driver: rounds of sample -> score -> train -> checkpoint -> evaluate.

This is the one impure module: it reads files, moves batches to devices, writes checkpoints,
round artifacts and metrics. Every phase is resumable:
  sample    each chunk of opponent samples is a file written atomically; finished chunks are kept,
            so a round's sampling is never redone (samples depend only on (seed, round, example id))
  score     reference log-probs of the round's pairs under the frozen opponent, one file
  train     orbax checkpoints every `run.checkpoint_every` steps with the data cursor
  end       a checkpoint of the round's final params; then held-out evaluation (eval.json)
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import numpy as np

from spjax import checkpoint as ckpt_lib
from spjax import evaluate, hf, metrics as metrics_lib, sampler, step as step_lib
from spjax import sharding as shd
from spjax.config import Config, ConfigError
from spjax.data import batching, tokens as tok_lib

log = logging.getLogger("spjax")
_hits: dict = {}


def _fault(point: str):
    """Test hook: SPJAX_KILL_AT=point:n SIGKILLs this process the n-th time `point` is reached.

    The kill tests use it to stop a run at exact places (mid-sampling, mid-scoring, mid-training,
    mid-checkpoint-write) and check that --resume gives bitwise the same final model.
    """
    spec = os.environ.get("SPJAX_KILL_AT")
    if not spec or not spec.startswith(point + ":"):
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(spec.split(":")[1]):
        os.kill(os.getpid(), 9)


@dataclasses.dataclass
class Context:
    """What every phase needs, built once by `setup`."""

    cfg: Config
    workdir: str
    mesh: jax.sharding.Mesh
    model_cfg: object
    tokenizer: object
    train: list  # TokenizedExample (real responses; generated filled per round)
    held: list  # held-out TokenizedExample
    eos_ids: tuple
    pad_id: int
    buckets: tuple
    writer: metrics_lib.MetricWriter
    checkpointer: ckpt_lib.Checkpointer
    echo: object = print

    def round_dir(self, t: int) -> str:
        return os.path.join(self.workdir, "rounds", f"round_{t:03d}")


# ---------------------------------------------------------------------------------------------
# Set-up


def check_config(cfg: Config, n_devices: int):
    """Every check that needs no data and no compile; raises ConfigError with one clear line."""
    dp_shape = shd.mesh_shape(cfg.mesh, n_devices)
    dp = dp_shape[0] * dp_shape[1]
    for field, n in (("run.batch_size", cfg.run.batch_size), ("sampling.batch_size", cfg.sampling.batch_size)):
        if n % dp:
            raise ConfigError(f"{field}: {n} is not divisible by the data-parallel size {dp} "
                              f"(mesh data*fsdp = {dp_shape[0]}*{dp_shape[1]})")
    if (cfg.run.batch_size // cfg.optim.grad_accum) % dp:
        raise ConfigError(f"optim.grad_accum: micro-batches of {cfg.run.batch_size // cfg.optim.grad_accum} "
                          f"pairs do not split over {dp} data-parallel devices")
    if cfg.model_path and not os.path.exists(cfg.model_path):
        raise ConfigError(f"model_path: {cfg.model_path} does not exist")
    tok = cfg.tokenizer_path or cfg.model_path
    if not tok:
        raise ConfigError("tokenizer_path: a random model needs a tokenizer (a path, or 'bytes')")
    if tok != "bytes" and not os.path.exists(tok):
        raise ConfigError(f"tokenizer_path: {tok} does not exist")


def setup(cfg: Config, workdir: str, resume: bool, echo=print) -> tuple[Context, object]:
    """Mesh, tokenizer, data, model params (born sharded) and the checkpointer."""
    from spjax import data as data_lib

    shd.init_distributed()
    check_config(cfg, jax.device_count())
    marker = os.path.join(workdir, "config.txt")
    if os.path.exists(marker) and not resume:
        raise ConfigError(f"--workdir {workdir}: holds a run already; pass --resume to continue it, "
                          "or choose another workdir")
    shd.barrier("spjax-workdir-checked")  # before process 0 writes the marker below
    mesh = shd.make_mesh(cfg.mesh)
    tokenizer = hf.load_tokenizer(cfg.tokenizer_path or cfg.model_path)
    tfds_dir = cfg.data.tfds_dir or os.path.join(workdir, "tfds")
    if jax.process_index() == 0:  # one process prepares the TFDS dataset, the others then read it
        prepared = data_lib.prepare(cfg.data, tokenizer, tfds_dir)
    shd.barrier("spjax-data-prepared")
    if jax.process_index() != 0:
        prepared = data_lib.prepare(cfg.data, tokenizer, tfds_dir)
    for split, rep in prepared.reports.items():
        echo(f"data {split}: {rep}")
    if cfg.model_path:
        model_cfg, params = hf.load_pretrained(cfg.model_path, mesh=mesh, **cfg.model_overrides())
    else:
        model_cfg = dataclasses.replace(cfg.model, **cfg.model_overrides())
        params = shd.init_params(model_cfg, jax.random.key(cfg.run.seed), mesh)
    shd.check_sharded(params, mesh)
    eos = set(model_cfg.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    pad = data_lib.pad_token_id(tokenizer)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(marker, "w") as f:
            f.write(repr(cfg) + "\n")
    ctx = Context(cfg=cfg, workdir=workdir, mesh=mesh, model_cfg=model_cfg, tokenizer=tokenizer,
                  train=prepared.train, held=prepared.test, eos_ids=tuple(sorted(eos)), pad_id=int(pad),
                  buckets=prepared.buckets,
                  writer=metrics_lib.MetricWriter(workdir),
                  checkpointer=ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                     keep=cfg.run.keep_checkpoints,
                                                     async_save=cfg.run.async_checkpoint),
                  echo=echo)
    return ctx, params


# ---------------------------------------------------------------------------------------------
# Sample: the opponent answers every prompt (train and held-out), chunk by chunk


def sample_round(ctx: Context, params, t: int, examples: list, split: str) -> dict:
    """{example id: (generated token ids, their log-probs under the opponent)}, reusing chunks on disk."""
    s, n = ctx.cfg.sampling, len(examples)
    chunk_dir = os.path.join(ctx.round_dir(t), f"samples_{split}")
    done_path = os.path.join(ctx.round_dir(t), f"samples_{split}.npz")
    if os.path.exists(done_path):
        return _unpack(ckpt_lib.load_arrays(done_path))
    per_chunk = s.batch_size
    bar = metrics_lib.progress(n, f"round {t} sample {split}", "prompt")
    out = {}
    for k, start in enumerate(range(0, n, per_chunk)):
        path = os.path.join(chunk_dir, f"chunk_{k:05d}.npz")
        part = examples[start:start + per_chunk]
        if os.path.exists(path):
            got = _unpack(ckpt_lib.load_arrays(path))
        else:
            res = sampler.sample(ctx.model_cfg, params, [e.prompt_ids.tolist() for e in part],
                                 key=sampler.round_key(ctx.cfg.run.seed, t), example_ids=[e.id for e in part],
                                 max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                 top_p=s.top_p, eos_ids=ctx.eos_ids, batch_size=per_chunk, mesh=ctx.mesh,
                                 pad_id=ctx.pad_id)
            got = {e.id: (np.asarray(tk, np.int32), np.asarray(lp, np.float32))
                   for e, tk, lp in zip(part, res.tokens, res.logprobs)}
            ckpt_lib.save_arrays(path, **_pack(got))
            _fault("sample")
        out.update(got)
        bar.update(len(part))
    bar.close()
    ckpt_lib.save_arrays(done_path, **_pack(out))
    ckpt_lib.remove_tree(chunk_dir)
    return out


def _pack(gen: dict) -> dict:
    ids = np.asarray(sorted(gen), np.int64)
    lens = np.asarray([len(gen[i][0]) for i in ids], np.int64)
    cat = lambda k, dt: (np.concatenate([gen[i][k] for i in ids]) if len(ids) else np.zeros(0)).astype(dt)
    return {"ids": ids, "lengths": lens, "tokens": cat(0, np.int32), "logprobs": cat(1, np.float32)}


def _unpack(z: dict) -> dict:
    ends = np.cumsum(z["lengths"])
    return {int(i): (z["tokens"][e - n:e], z["logprobs"][e - n:e]) for i, n, e in zip(z["ids"], z["lengths"], ends)}


# ---------------------------------------------------------------------------------------------
# Score: reference log-probs under the frozen opponent, once per round


def score_examples(ctx: Context, params, examples: list, which: str) -> np.ndarray:
    """[n] fp32 log pi(response | prompt) of each example's `which` side ('real_ids'/'generated_ids')."""
    B = ctx.cfg.run.score_batch_size
    B = -(-B // shd.data_parallel_size(ctx.mesh)) * shd.data_parallel_size(ctx.mesh)
    out = np.zeros(len(examples), np.float32)
    for start in range(0, len(examples), B):
        ids_G = np.full(B, -1)
        ids_G[:min(B, len(examples) - start)] = np.arange(start, min(start + B, len(examples)))
        side = batching.side_batch(examples, ids_G, which, buckets=ctx.buckets, pad_id=ctx.pad_id)
        lp = step_lib.score(ctx.model_cfg, params, side["input_ids_BxL"], side["attention_mask_BxL"],
                            side["target_mask_BxL"], mesh=ctx.mesh)
        n = min(B, len(examples) - start)
        out[start:start + n] = shd.to_host(lp)[:n]
    return out


def sampler_scores_usable(cfg: Config) -> bool:
    """Untempered, untruncated sampling: the sampler's token log-probs are the opponent's own."""
    s = cfg.sampling
    return s.temperature == 1.0 and s.top_k == 0 and s.top_p == 1.0


def _summed(examples: list, token_lp: dict) -> np.ndarray:
    # attach_generated may have cut a response to max_len: sum only the tokens that were kept
    return np.asarray([token_lp[e.id][:len(e.generated_ids)].sum() for e in examples], np.float32)


def score_round(ctx: Context, params, t: int, pairs: dict, sampled_lp: dict) -> dict:
    """{split: (ref_real [n], ref_gen [n])} under the opponent, cached in the round's refs.npz.

    For splits in `sampled_lp` ({split: {id: token log-probs}}) the generated side comes from the
    sampler's own log-probs (half the scoring work), after checking the first batch against a
    full forward pass; a mismatch falls back to scoring everything.
    """
    path = os.path.join(ctx.round_dir(t), "refs.npz")
    if os.path.exists(path):
        z = ckpt_lib.load_arrays(path)
        return {s: (z[f"{s}_real"], z[f"{s}_gen"]) for s in pairs}
    bar = metrics_lib.progress(2 * sum(len(v) for v in pairs.values()), f"round {t} score", "seq")
    out = {}
    for split, ex in pairs.items():
        real = score_examples(ctx, params, ex, "real_ids")
        bar.update(len(ex))
        _fault("score")
        gen = None
        if split in sampled_lp:
            gen = _summed(ex, sampled_lp[split])
            head = ex[:ctx.cfg.run.score_batch_size]
            full = score_examples(ctx, params, head, "generated_ids")
            # fp32 per-token agreement is ~1e-5 (sampler tests hold it to 1e-4 per token)
            tol = 1e-4 * np.asarray([max(len(e.generated_ids), 1) for e in head])
            if not np.all(np.abs(full - gen[:len(head)]) <= tol):
                log.warning("round %d: sampler log-probs differ from a forward pass (max %.2e); scoring "
                            "all generated responses", t, float(np.max(np.abs(full - gen[:len(head)]))))
                gen = None
        if gen is None:
            gen = score_examples(ctx, params, ex, "generated_ids")
        bar.update(len(ex))
        out[split] = (real, gen)
    bar.close()
    ckpt_lib.save_arrays(path, **{f"{s}_{k}": v for s, (r, g) in out.items() for k, v in (("real", r), ("gen", g))})
    return out


# ---------------------------------------------------------------------------------------------
# Train


def device_batch(ctx: Context, batch: dict, ref_real: np.ndarray, ref_gen: np.ndarray) -> dict:
    """A host pair batch (this process's rows) as global arrays split over the data axes."""
    ids = batch["example_id_B"]
    host = {"real_ids_BxL": batch["real"]["input_ids_BxL"], "real_mask_BxL": batch["real"]["attention_mask_BxL"],
            "real_target_BxL": batch["real"]["target_mask_BxL"],
            "gen_ids_BxL": batch["generated"]["input_ids_BxL"],
            "gen_mask_BxL": batch["generated"]["attention_mask_BxL"],
            "gen_target_BxL": batch["generated"]["target_mask_BxL"],
            "ref_real_B": ref_real[ids].astype(np.float32), "ref_gen_B": ref_gen[ids].astype(np.float32)}
    return {k: jax.make_array_from_process_local_data(shd.batch_sharding(ctx.mesh, v.ndim), v)
            for k, v in host.items()}


def _shuffle_seed(cfg: Config, t: int) -> int:
    return cfg.run.seed * 100_003 + t


def abstract_state(ctx: Context, optimizer):
    """The TrainState structure (shapes, dtypes, shardings) to restore a checkpoint into."""
    from spjax import model
    sh = step_lib.state_shardings(ctx.model_cfg, ctx.mesh, optimizer)
    zero = jax.ShapeDtypeStruct((), np.int32)
    shapes = step_lib.TrainState(params=model.param_shapes(ctx.model_cfg),
                                 opt_state=jax.eval_shape(optimizer.init, model.param_shapes(ctx.model_cfg)),
                                 step=zero, skipped=zero)
    return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes, sh)


def train_round(ctx: Context, state, train_step, t: int, examples: list, ref_real, ref_gen, meta: dict,
                done_rows: list):
    """Optimizer steps over the round's pairs from meta's step/cursor; checkpoints on the way.

    done_rows: the metric rows this round logged before a resume (they enter the round's means).
    """
    cfg, r = ctx.cfg, ctx.cfg.run
    total = batching.batches_per_epoch(len(examples), r.batch_size) * r.epochs
    batches = batching.pair_batches(examples, r.batch_size, seed=_shuffle_seed(cfg, t), buckets=ctx.buckets,
                                    pad_id=ctx.pad_id, cursor=meta.get("cursor"), epochs=r.epochs,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    bar = metrics_lib.progress(total, f"round {t} train", "step")
    bar.update(meta["step"])
    pending, rows, t0, tokens = [], list(done_rows), time.perf_counter(), 0
    for s, (batch, cursor) in enumerate(batches, start=meta["step"]):
        state, m = train_step(state, device_batch(ctx, batch, ref_real, ref_gen))
        pending.append(m)
        meta = dict(meta, step=s + 1, cursor=cursor, global_step=meta["global_step"] + 1)
        last = s + 1 == total
        if len(pending) >= r.log_every or last:
            host = [jax.tree.map(shd.to_host, m_host) for m_host in pending]
            for m_host in host:
                step_lib.check_finite(m_host, cfg.optim)
            dt = time.perf_counter() - t0
            tokens = sum(float(m_host["n_tokens"]) for m_host in host)
            # Scalars averaged over the interval; the optimizer's step counter is not a metric.
            row = metrics_lib.mean_metrics([{k: v for k, v in m_host.items() if np.ndim(v) == 0 and k != "step"}
                                            for m_host in host])
            row.update(round=t, tokens_per_s=tokens / max(dt, 1e-9))
            ctx.writer.write("train", meta["global_step"], row)
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('accuracy', float('nan')):.2f}")
            pending, t0 = [], time.perf_counter()
        bar.update(1)
        _fault("train")
        if not last and (s + 1) % r.checkpoint_every == 0:
            ctx.checkpointer.save(meta["global_step"], state, dict(meta, phase="train"))
            _fault("checkpoint")
    bar.close()
    return state, meta, metrics_lib.mean_metrics(rows) if rows else {}


# ---------------------------------------------------------------------------------------------
# Evaluate


def evaluate_model(ctx: Context, params, name: str, held_pairs=None, held_refs=None) -> dict:
    """Held-out NLL, greedy-answer similarity, and (after a round) reward metrics on held-out pairs."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    held = ctx.held[:cfg.run.eval_examples] if cfg.run.eval_examples else ctx.held
    lp = score_examples(ctx, params, held, "real_ids")
    n_tok = np.asarray([max(len(e.real_ids), 1) for e in held])
    out = {"nll": float(-(lp.sum() / n_tok.sum()))}
    res = sampler.sample(ctx.model_cfg, params, [e.prompt_ids.tolist() for e in held], key=0, temperature=0.0,
                         max_new_tokens=cfg.run.eval_max_new_tokens, eos_ids=ctx.eos_ids,
                         batch_size=cfg.sampling.batch_size, mesh=ctx.mesh, pad_id=ctx.pad_id)
    preds = [tok.decode(t, skip_special_tokens=True).strip() for t in res.tokens]
    refs = [tok.decode(e.real_ids, skip_special_tokens=True).strip() for e in held]
    out.update(evaluate.similarity(preds, refs))
    out["gen_len"] = float(np.mean(res.lengths))
    if held_pairs is not None:
        lp_gen = score_examples(ctx, params, held_pairs, "generated_ids")
        out.update({f"eval_{k}": v for k, v in evaluate.pair_metrics(
            lp[:len(held_pairs)], lp_gen, *held_refs, cfg.objective.beta, cfg.objective.c).items()})
    # the prompt's tail: the last user turn (and the template's generation prompt)
    prompts = [" ".join(tok.decode(e.prompt_ids, skip_special_tokens=True).split())[-80:] for e in held]
    first = list({p: i for i, p in reversed(list(enumerate(prompts)))}.values())[::-1]  # distinct prompts
    pick = lambda xs: [xs[i] for i in first]
    ctx.echo(f"[{name}] held-out samples:\n" + evaluate.side_by_side(pick(prompts), pick(preds), pick(refs),
                                                                      cfg.run.eval_show))
    return out


COLUMNS = ["loss", "accuracy", "margin", "reward_real", "reward_gen", "frac_at_bound", "nll", "f1", "rouge_l",
           "eval_accuracy", "eval_margin", "sample_s", "score_s", "train_s"]


def run(cfg: Config, workdir: str, resume: bool = False, echo=print) -> dict:
    """Run (or resume) all rounds; returns {row name: metrics} as printed in the summary table."""
    ctx, params = setup(cfg, workdir, resume, echo)
    r = cfg.run
    meta = {"round": 0, "phase": "sample", "step": 0, "cursor": None, "global_step": 0}
    state, done_rows = None, []
    if resume:
        restored = ctx.checkpointer.restore_latest(abstract_state(ctx, step_lib.make_optimizer(cfg.optim, 1)))
        if restored is not None:
            state, meta = restored
            params = state.params
            echo(f"resumed at round {meta['round']}, phase {meta['phase']}, step {meta['step']}")
        # Lines logged after the restored point are about to be logged again: drop them. Those of a
        # round resumed mid-training still count towards that round's summary.
        kept = ctx.writer.rewind(lambda row: row["step"] <= meta["global_step"] if row["kind"] == "train"
                                 else row["step"] < meta["round"])
        if meta["phase"] == "train":
            done_rows = [{k: v for k, v in row.items() if k not in ("kind", "step", "time")} for row in kept
                         if row["kind"] == "train" and row.get("round") == meta["round"]]
    summary, compiled = {}, {}
    init_path = os.path.join(workdir, "rounds", "init_eval.json")
    if os.path.exists(init_path):
        summary["initial"] = ckpt_lib.load_json(init_path)
    else:
        summary["initial"] = evaluate_model(ctx, params, "initial model")
        ckpt_lib.save_json(init_path, summary["initial"])
    for t in range(r.rounds):
        eval_path = os.path.join(ctx.round_dir(t), "eval.json")
        if t < meta["round"]:
            if os.path.exists(eval_path):
                summary[f"round {t}"] = ckpt_lib.load_json(eval_path)
            continue
        mid = meta["round"] == t and meta["phase"] == "train"
        times = {}
        # -- sample (the opponent = the current params, frozen for this round)
        t0 = time.perf_counter()
        held = ctx.held[:r.eval_examples] if r.eval_examples else ctx.held
        pairs, sampled_lp = {}, {}
        for split, ex in (("train", ctx.train), ("held", held)):
            if cfg.objective.name == "sft":  # the SFT baseline samples nothing: its pairs are (y, y)
                gen = {e.id: (e.real_ids, np.zeros(len(e.real_ids), np.float32)) for e in ex}
            else:
                gen = sample_round(ctx, params, t, ex, split)
            pairs[split] = tok_lib.attach_generated(ex, {i: g[0] for i, g in gen.items()},
                                                    max_len=cfg.data.max_len)[0]
            if sampler_scores_usable(cfg):
                sampled_lp[split] = {i: g[1] for i, g in gen.items()}
        if r.mix_previous and t > 0:  # SPIN's D_{t-1} ∪ D_t, previous pairs re-scored under θ_t
            prev = _unpack(ckpt_lib.load_arrays(os.path.join(ctx.round_dir(t - 1), "samples_train.npz")))
            shifted = [dataclasses.replace(e, id=e.id + len(ctx.train)) for e in ctx.train]
            pairs["prev"] = tok_lib.attach_generated(
                shifted, {e.id + len(ctx.train): prev[e.id][0] for e in ctx.train}, max_len=cfg.data.max_len)[0]
        times["sample_s"] = time.perf_counter() - t0
        # -- score
        t0 = time.perf_counter()
        if cfg.objective.name == "sft":  # its loss reads no reference scores
            refs = {k: (np.zeros(len(v), np.float32), np.zeros(len(v), np.float32)) for k, v in pairs.items()}
        else:
            refs = score_round(ctx, params, t, pairs, sampled_lp)
        times["score_s"] = time.perf_counter() - t0
        train_ex = pairs["train"] + pairs.get("prev", [])
        ref_real = np.concatenate([refs["train"][0]] + ([refs["prev"][0]] if "prev" in refs else []))
        ref_gen = np.concatenate([refs["train"][1]] + ([refs["prev"][1]] if "prev" in refs else []))
        # -- train
        t0 = time.perf_counter()
        total = batching.batches_per_epoch(len(train_ex), r.batch_size) * r.epochs
        if total not in compiled:  # rounds of the same length share one optimizer and compiled step
            optimizer = step_lib.make_optimizer(cfg.optim, total)
            compiled[total] = optimizer, step_lib.make_train_step(
                ctx.model_cfg, cfg.objective, cfg.optim, optimizer, ctx.mesh,
                step_lib.pair_batch_shapes(r.batch_size, ctx.buckets[0]))
        optimizer, train_step = compiled[total]
        if not mid:
            state = step_lib.init_state(ctx.model_cfg, params, optimizer, ctx.mesh)
            meta = dict(meta, round=t, phase="train", step=0, cursor=None)
        del params  # the opponent is no longer needed: its scores are on disk
        state, meta, train_row = train_round(ctx, state, train_step, t, train_ex, ref_real, ref_gen, meta,
                                             done_rows if mid else [])
        times["train_s"] = time.perf_counter() - t0
        meta = dict(meta, round=t + 1, phase="sample", step=0, cursor=None)
        ctx.checkpointer.save(meta["global_step"], state, meta)
        params, state = state.params, None  # the optimizer state is rebuilt next round: free it now
        # -- evaluate
        row = {**train_row, **evaluate_model(ctx, params, f"round {t}", pairs["held"], refs["held"]), **times}
        ctx.writer.write("round", t, row)
        ckpt_lib.save_json(eval_path, row)
        summary[f"round {t}"] = row
        echo(metrics_lib.table(f"self-play summary after round {t}", summary, COLUMNS))
    ctx.checkpointer.close()
    if r.export:
        out = hf.save_pretrained(ctx.model_cfg, params, os.path.join(workdir, "export"), tokenizer=ctx.tokenizer)
        echo(f"exported the final model to {out}")
    ctx.writer.close()
    return summary
