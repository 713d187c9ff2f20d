"""The run's ledger: what a run keeps besides its checkpoints, and what a resume must agree with.

  start.json   the first start's date (chat templates print it as today's) and its config: a
               resume that changes a field shaping the run (data, samples, pairs, objective,
               optimizer, batches) is refused in one line; other changes are said and kept
  round rows   each round's row in metrics.jsonl and the round's eval.json; the best round's model
               in best/ (run.keep_best); the stop rule (run.stop_when_worse), re-derived from the
               rows on a resume so a stopped run stays stopped
  opponent     each round's opponent's checksums beside its files (samples, scores): files of
               another opponent are moved aside, not reused
  the export   the best round's model (moved from best/, never deleted before its replacement is
               in place), else the last round's; then the report
Called by spjax.rounds, the driver: ctx is its Context.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import shutil
import time

import jax
import numpy as np

from spjax import artifacts, checkpoint as ckpt_lib, evaluate, hf, metrics as metrics_lib
from spjax.config import METRIC_GOALS, Config, ConfigError

# Fields a resume may change: paths, placement, speed knobs and bookkeeping, and the two a schedule
# changes between rounds (SPIN lowers the lr and raises beta in later iterations). Every other field
# shapes what the run trains on or how; changing one mid-run would mix two runs in one model.
MAY_CHANGE = ("model_path", "tokenizer_path", "attention", "remat", "mesh.", "data.tfds_dir", "objective.beta",
              "sampling.batch_size", "judge.batch_size", "optim.lr", "optim.clip_norm", "optim.nonfinite",
              "run.rounds", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints", "run.async_checkpoint",
              "run.eval_show", "run.stop_when_worse", "run.export", "run.score_batch_size")
# What `spjax export` reads of the config: the model's structure and storage, and the optimizer whose
# state a mid-round checkpoint holds. The rest (data, objective, schedule) shaped training, not the export.
EXPORT_READS = ("model.", "model at model_path.", "lora.", "base_quant", "param_dtype", "optim.name",
                "run.keep_best")  # keep_best: export/ then holds the best round, which an export must not replace


def _flat(obj, prefix: str = "") -> dict:
    """{dotted field: repr(value)} of a config."""
    if not dataclasses.is_dataclass(obj):
        return {prefix[:-1]: repr(obj)}
    return {k: v for f in dataclasses.fields(obj) for k, v in _flat(getattr(obj, f.name), f"{prefix}{f.name}.").items()}


def _recorded(cfg: Config) -> dict:
    """_flat(cfg), plus the model that model_path holds (the path may move; the model may not change:
    a resume reads its structure there) and a digest of lora.init_path's files (INPO rereads that
    adapter as pi_0 each round)."""
    out, d = _flat(cfg), cfg.lora.init_path
    if cfg.model_path and os.path.exists(cfg.model_path):  # (a missing one: loading says so)
        out.update(_flat(hf.load_model_config(cfg.model_path), "model at model_path."))
    if d:
        h = hashlib.sha256()
        for name in ("adapter_config.json", "adapter_model.safetensors"):  # (a missing one: loading says so)
            if os.path.isfile(os.path.join(d, name)):
                with open(os.path.join(d, name), "rb") as f:
                    h.update(f.read())
        out["lora.init_path (its files' sha256)"] = h.hexdigest()[:16]
    return out


def _dated(cfg: Config, date: str) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template_date=cfg.data.template_date or date))


def write_start(cfg: Config, workdir: str, resume: bool):
    """Process 0, before the processes meet: a fresh run's start.json (a resume keeps the first's; a
    start that failed before its setup finished, config.txt unwritten, counts as none)."""
    path = os.path.join(workdir, "start.json")
    if not (resume and os.path.exists(path) and os.path.exists(os.path.join(workdir, "config.txt"))):
        today = datetime.date.today().isoformat()
        artifacts.save_json(path, {"date": today, "config": _recorded(_dated(cfg, today))})


def check_start(cfg: Config, workdir: str, echo, resume: bool = True) -> Config:
    """`cfg` with data.template_date the first start's; ConfigError if it changes a field outside
    MAY_CHANGE since then (an export: one of EXPORT_READS), listed old -> new; other changes are echoed."""
    first = artifacts.load_json(os.path.join(workdir, "start.json"))
    cfg = _dated(cfg, first["date"])
    was, now = first.get("config", {}), _recorded(cfg)
    changed = sorted(k for k in set(was) & set(now) if was[k] != now[k])  # (fields of other versions: skipped)
    say = lambda keys: "; ".join(f"{k}: {was[k]} -> {now[k]}" for k in keys)
    reads = EXPORT_READS + (() if cfg.model_path else ("run.seed",))  # a random init's base: run.seed draws it
    fixed = [k for k in changed if (not k.startswith(MAY_CHANGE) if resume else k.startswith(reads))]
    if fixed and resume:
        raise ConfigError(f"--resume: {say(fixed)}: these shape the run {workdir} holds (its model, data, samples, "
                          "pairs, objective, optimizer or batches); use the values it started with, or start a new "
                          "workdir")
    if fixed:
        raise ConfigError(f"{say(fixed)}: these shape the model the run {workdir} holds; use the values it started with")
    if changed:
        echo(f"{'resuming' if resume else 'exporting'} with changed settings: {say(changed)}")
    return cfg


def data_digest(splits: dict) -> str:
    """A digest of the token ids a run trains and evaluates on ({split: [TokenizedExample]})."""
    h = hashlib.sha256()
    for name in sorted(splits):
        for e in splits[name]:
            for ids in (e.prompt_ids, e.real_ids, e.generated_ids, e.uncut_real_ids):
                h.update(b"-" if ids is None else np.asarray(ids, np.int64).tobytes() + b"|")
            h.update(f"{name}:{e.id};".encode())
    return h.hexdigest()


def check_data(workdir: str, splits: dict, resume: bool):
    """A resume must train on the token ids its run started with: a data file edited in place, or
    another tokenizer at the same path, would pair its samples and scores with other prompts."""
    from spjax import sharding as shd
    path = os.path.join(workdir, "data.json")
    digest = data_digest(splits)
    # Each host reads its own copy of the data: another copy on one of them would mix two datasets.
    other = shd.failed_processes(shd.from_process_0(lambda: [np.asarray([int(digest[:12], 16)])], [(1,)])[0][0]
                                 == int(digest[:12], 16))
    if other:
        raise ConfigError(f"the data (data.path, data.eval_path, tokenizer) gives other token ids on process {other[0]} "
                          "than on process 0: every host must read the same data")
    if resume and os.path.exists(path) and os.path.exists(os.path.join(workdir, "config.txt")):
        if artifacts.load_json(path)["digest"] != digest:
            raise ConfigError(f"--resume: the data (data.path, data.eval_path, tokenizer) gives other token ids than "
                              f"the run {workdir} started with: its samples and scores belong to those; resume with "
                              "the original data and tokenizer, or start a new workdir")
    elif jax.process_index() == 0:
        artifacts.save_json(path, {"digest": digest, **{k: len(v) for k, v in splits.items()}})


def check_initial(cfg: Config, workdir: str, params, resume: bool):
    """A resume must start from the weights its run started from: model_path may move, and start.json
    checks the model's config there, but other weights of the same shape would pass it, and a resume
    rereads pi_0 (the initial row; INPO's reference each round). <workdir>/initial.json keeps their
    checksums."""
    if not cfg.model_path:  # a random init: run.seed (start.json) draws it
        return
    path = os.path.join(workdir, "initial.json")
    sums = ckpt_lib.checksums(params)
    if resume and os.path.exists(path) and os.path.exists(os.path.join(workdir, "config.txt")):
        if artifacts.load_json(path) != sums:
            raise ConfigError(f"--resume: the model at model_path={cfg.model_path} has other weights than the run "
                              f"{workdir} started from (same config): resume with the original model, or start a "
                              "new workdir")
    elif jax.process_index() == 0:
        artifacts.save_json(path, sums)


def check_opponent(ctx, t: int, params):
    """Round t's files on disk must be its opponent's. A resume from a step before them (an unfinished
    async checkpoint, a damaged one) redoes round t - 1; with a changed optim.lr or objective.beta that
    ends at another model than the one that sampled and scored them: they are moved aside and remade."""
    from spjax import sharding as shd
    d = ctx.round_dir(t)
    path, sums = os.path.join(d, "opponent.json"), ckpt_lib.checksums(params)
    if os.path.exists(path) and artifacts.load_json(path) != sums:
        stale = f"{d}.stale-{int(time.time())}"
        if jax.process_index() == 0:
            os.rename(d, stale)
        ctx.echo(f"round {t}: its samples and scores on disk are another opponent's (round {t - 1} was redone "
                 f"from an earlier checkpoint and ended elsewhere, e.g. with another optim.lr): moved to {stale}, "
                 "made again")
    shd.barrier(f"spjax-opponent-{t}")
    if not os.path.exists(path):
        artifacts.save_json(path, sums)


def stop_here(ctx, summary: dict, t: int) -> bool:
    """run.stop_when_worse: whether the run stops after round t (said in one line)."""
    r = ctx.cfg.run
    stale = metrics_lib.rounds_since_best(summary, r.keep_best, METRIC_GOALS[r.keep_best]) if r.keep_best else 0
    if r.stop_when_worse and stale >= r.stop_when_worse and t + 1 < r.rounds:
        ctx.echo(f"stopping after round {t}: {stale} rounds without a better held-out {r.keep_best} "
                 f"(run.stop_when_worse={r.stop_when_worse})")
        return True
    return False


def record_round(ctx, t: int, params, summary: dict) -> bool:
    """Log round t's row and keep it in the round's eval.json; keep the best round's model
    (run.keep_best); print the summary table so far. True: stop here (run.stop_when_worse)."""
    r, row = ctx.cfg.run, summary[f"round {t}"]
    if summary["initial"].get("gen_len"):  # drift of the greedy answers' length from the start
        row["len_drift"] = row["gen_len"] / summary["initial"]["gen_len"] - 1.0
    if r.keep_best and metrics_lib.best_round(summary, r.keep_best, METRIC_GOALS[r.keep_best])[0] == t:
        hf.save_pretrained(ctx.model_cfg, params, os.path.join(ctx.workdir, "best"), tokenizer=ctx.tokenizer,
                           replace_any=True, source=ctx.cfg.model_path)
    ctx.writer.write("round", t, row)
    ctx.fault("record")  # (the line logged, eval.json not yet: a resume evaluates the round again)
    artifacts.save_json(os.path.join(ctx.round_dir(t), "eval.json"), row)
    ctx.echo(metrics_lib.table(f"self-play summary after round {t}", summary,
                               evaluate.COLUMNS + (evaluate.JUDGE_COLUMNS if ctx.judge is not None else [])))
    return stop_here(ctx, summary, t)


def _keep_best(ctx, last: int, t: int, value: float, initial):
    """Process 0: best/ (a round kept since the export was last made, if any) becomes the export."""
    best, export = os.path.join(ctx.workdir, "best"), os.path.join(ctx.workdir, "export")
    if os.path.isdir(best):
        old = export + ".replaced"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(export):
            os.replace(export, old)
        os.replace(best, export)
        shutil.rmtree(old, ignore_errors=True)
    elif not os.path.isdir(export):
        raise hf.CheckpointError(f"{best}: missing, and no {export} holds round {t}'s model (run.keep_best)")
    metric = ctx.cfg.run.keep_best
    ctx.echo(f"kept round {t}: held-out {metric} {value:.4g}, the best of rounds 0-{last} "
             f"(run.keep_best={metric}); exported it to {export}")
    sign = 1.0 if METRIC_GOALS[metric] == "min" else -1.0
    if isinstance(initial, (int, float)) and sign * initial < sign * value:
        ctx.echo(f"note: the initial model's held-out {metric}, {initial:.4g}, is better than every round's: "
                 "self-play did not improve it by this metric (the initial model is not exported)")


def finish(ctx, params, summary: dict):
    """The export (the best round's model with run.keep_best, else the last), and the report."""
    from spjax import report
    r = ctx.cfg.run
    if r.export and r.keep_best:  # a file move: process 0's alone
        if jax.process_index() == 0:
            _keep_best(ctx, len(summary) - 2, *metrics_lib.best_round(summary, r.keep_best, METRIC_GOALS[r.keep_best]),
                       summary["initial"].get(r.keep_best))
    elif r.export:  # every process: the export gathers sharded params
        out = hf.save_pretrained(ctx.model_cfg, params, os.path.join(ctx.workdir, "export"), tokenizer=ctx.tokenizer,
                                 replace_any=True, source=ctx.cfg.model_path)
        ctx.echo(f"exported the final model to {out}")
    elif os.path.isdir(os.path.join(ctx.workdir, "export")) and jax.process_index() == 0:
        ctx.echo(f"note: run.export=false: {os.path.join(ctx.workdir, 'export')} is an earlier start's export, "
                 "not this run's result")
    if jax.process_index() == 0:
        try:
            md, png = report.write([ctx.workdir], os.path.join(ctx.workdir, "report"))
            ctx.echo(f"per-round report: {md}, {png}")
        except ImportError as e:  # an environment of the user's own without matplotlib
            ctx.echo(f"no report.png: {e} (pip install matplotlib; then `spjax report {ctx.workdir}`)")
    ctx.writer.close()
