"""The self-play driver: rounds of sample -> score -> train -> checkpoint -> evaluate.

This is the one impure module: it reads files, moves batches to devices, writes checkpoints,
round artifacts and metrics. Each phase is one function with a typed result, and each resumes:
  sample      the pair source forms the round's pairs (spjax.pairs); sampled chunks are files
  score       reference log-probs of the round's pairs under the frozen opponent, one file
  train       orbax checkpoints every `run.checkpoint_every` steps with the data cursor
  checkpoint  the round's final params; then held-out evaluation (eval.json)
What a round needs (an opponent's samples, reference scores) comes from the objective table, and
where the pairs come from from the pair-source table: the driver branches on neither's names.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Optional

import jax
import numpy as np

from spjax import artifacts, checkpoint as ckpt_lib
from spjax import evaluate, hf, ledger, metrics as metrics_lib, objectives, pairs as pairs_lib, step as step_lib
from spjax import hf_wrapped, lora, preflight, saving, scoring, sharding as shd
from spjax.config import Config, ConfigError
from spjax.data import batching, packing

log = logging.getLogger("spjax")


@dataclasses.dataclass(frozen=True)
class RoundState:
    """Where a run stands; saved with every checkpoint. Samples draw from keys derived from
    (run.seed, round, example id), so the state carries no RNG key of its own."""

    round: int = 0
    phase: str = "sample"  # sample: the round starts from its params | train: mid-training
    step: int = 0  # optimizer steps taken in this round
    cursor: Optional[dict] = None  # the pair batches' data cursor (batching.pair_batches)
    global_step: int = 0  # optimizer steps over the whole run (checkpoint and log step numbers)

    @classmethod
    def from_meta(cls, meta: dict) -> "RoundState":
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name in meta})


@dataclasses.dataclass
class Context:
    """What every phase needs, built once by `setup`."""

    cfg: Config
    workdir: str
    mesh: jax.sharding.Mesh
    model_cfg: object
    tokenizer: object
    train: list  # TokenizedExample (real responses; the second side as the records give it, if any)
    held: list  # held-out TokenizedExample, cut to run.eval_examples
    eos_ids: tuple
    pad_id: int
    buckets: tuple
    writer: metrics_lib.MetricWriter
    checkpointer: ckpt_lib.Checkpointer
    source: str  # the pair source (spjax.pairs.SOURCES)
    objective: objectives.Objective  # its row of the objective table
    judge: Optional[object] = None  # spjax.judges.Judge when judge.name is set (judged pairs, held-out metrics)
    initial_params: Optional[Callable] = None  # () -> pi_0's params, loaded anew (objectives needing pi_0)
    base_sums: Optional[list] = None  # a LoRA policy's frozen-base fingerprint, saved with each checkpoint
    echo: Callable = print
    fault: Callable[[str], None] = lambda point: None  # test hook: called at each resumable point

    def round_dir(self, t: int) -> str:
        return os.path.join(self.workdir, "rounds", f"round_{t:03d}")


# ---------------------------------------------------------------------------------------------
# Set-up


def setup(cfg: Config, workdir: str, resume: bool, echo=print, fault=None) -> tuple[Context, object]:
    """Mesh, tokenizer, data, pair source, model params (born sharded) and the checkpointer."""
    from spjax import data as data_lib

    shd.init_distributed()
    shd.on_each_process(lambda: preflight.check_config(cfg, jax.device_count()), "checking the config")
    marker = os.path.join(workdir, "config.txt")
    if os.path.exists(marker) and not resume:
        raise ConfigError(f"--workdir {workdir}: holds a run already; pass --resume (in Python: resume=True) to "
                          "continue it, or choose another workdir")
    if resume and not os.path.exists(marker):
        echo(f"--resume: {workdir} holds no run yet: starting one")
    # process 0: the first start's date and config (the others wait: it is read next, and a marker follows)
    shd.on_process_0(lambda: ledger.write_start(cfg, workdir, resume), "writing start.json")
    cfg = shd.on_each_process(lambda: ledger.check_start(cfg, workdir, echo),  # a resume's changes: refused
                              "checking the config against start.json")  # or said
    mesh = shd.make_mesh(cfg.mesh)
    tokenizer = shd.on_each_process(lambda: hf.load_tokenizer(cfg.tokenizer_path or cfg.model_path),
                                    "loading the tokenizer")
    structure = hf.initial_config(cfg)  # (the weights load after the data: a data error costs no load)
    hf.check_weights(cfg.model_path, structure)  # (files and names now: a missing shard costs no tokenization)
    preflight.check_tokenizer(cfg, tokenizer)
    preflight.check_vocab(cfg, structure, tokenizer)
    stops = data_lib.stop_ids(structure, tokenizer)  # where real responses end, as sampled ones do
    tfds_dir = cfg.data.tfds_dir or os.path.join(workdir, "tfds")
    # Process 0 writes the TFDS dataset, then all tokenize it at once (~4 ms an example: one after another before)
    prepare = lambda: data_lib.prepare(cfg.data, tokenizer, tfds_dir, stops)  # noqa: E731
    if jax.process_count() == 1:
        prepared = prepare()
    else:  # host-local data (a path each host has its own copy at): read by each
        shd.on_process_0(lambda: data_lib.load_examples(cfg.data, tfds_dir) and None, "preparing the data")
        prepared = shd.on_each_process(prepare, "reading the data")
    for split, rep in prepared.reports.items():
        echo(f"data {split}: {rep}")
    ledger.check_data(workdir, {"train": prepared.train, "test": prepared.test}, resume)
    preflight.check_held_out(cfg, prepared, echo)
    source = pairs_lib.resolve(cfg, prepared.train)
    preflight.check_pairs(cfg, source, len(prepared.train), echo)
    preflight.check_examples(cfg, source, prepared.train, prepared.test, echo)
    model_cfg, params = shd.on_each_process(lambda: hf.load_initial(cfg, mesh), "loading the model")
    preflight.check_lengths(cfg, model_cfg, prepared.buckets, echo)
    ledger.check_initial(cfg, workdir, params, resume)
    shd.check_sharded(params, mesh)
    for line in shd.unsplit_notes(model_cfg, mesh):
        echo(line)
    echo(lora.describe(model_cfg, params))  # e.g. "trainable params: 1,234 of 5,678 (...): LoRA r=16 ..."
    wrapped = hf_wrapped.describe(cfg.model_path)  # (a multimodal model: what of it the run trains)
    if wrapped:
        echo(wrapped)
    echo(saving.disk_report(cfg, model_cfg, workdir))
    judge = None
    if cfg.judge.name:
        from spjax import judges
        judge = judges.build(cfg.judge.name, mesh=mesh, batch_size=cfg.judge.batch_size, policy_tokenizer=tokenizer,
                             today=cfg.data.template_date or None, dtype=cfg.compute_dtype)
        if judge.reads:
            echo(f"judge: the reward model reads {judge.reads}")
        if judge.waits:
            echo(f"judge: {judge.waits}")
    ctx = Context(cfg=cfg, workdir=workdir, mesh=mesh, model_cfg=model_cfg, tokenizer=tokenizer,
                  train=prepared.train, held=prepared.test[:cfg.run.eval_examples or None], eos_ids=stops,
                  pad_id=data_lib.pad_token_id(tokenizer, model_cfg), buckets=prepared.buckets,
                  writer=metrics_lib.MetricWriter(workdir),
                  checkpointer=ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                     keep=cfg.run.keep_checkpoints,
                                                     async_save=cfg.run.async_checkpoint),
                  source=source, objective=objectives.TABLE[cfg.objective.name], judge=judge,
                  initial_params=lambda: hf.load_initial(cfg, mesh)[1], base_sums=saving.base_sums(model_cfg, params),
                  echo=echo, fault=fault or (lambda point: None))
    return ctx, params


def _meta(ctx: Context, rs: RoundState) -> dict:
    return {**dataclasses.asdict(rs), **({saving.BASE_SUMS: ctx.base_sums} if ctx.base_sums else {})}


# ---------------------------------------------------------------------------------------------
# Train and checkpoint


def device_batch(ctx: Context, rows: dict, per_pair: tuple, packed: bool) -> step_lib.PairBatch:
    """A global pair batch (packing.pair_rows, every process holding all of it) as global arrays split
    over the data axes. per_pair: ([n] arrays indexed by pair id) ref_real, ref_gen, win_real, win_gen.

    Every process supplies the slices its devices own (shd.put_global): a mesh's device order need not
    follow process order (a TPU slice's topology-aware mesh interleaves hosts), and with each process
    supplying "its" rows the pairs' reference scores would have met other pairs' log-probs."""
    ref_real, ref_gen, win_real, win_gen = (np.asarray(a, np.float32)[rows["example_id_B"]] for a in per_pair)
    host = step_lib.PairBatch(rows["tokens_RxL"], rows["segments_RxL"], rows["positions_RxL"], rows["targets_RxL"],
                              rows["seqs_RxL"], ref_real, ref_gen, win_real, win_gen, packed=packed)
    return jax.tree.map(lambda v: shd.put_global(v, shd.batch_sharding(ctx.mesh, v.ndim)), host)


def _shuffle_seed(cfg: Config, t: int) -> int:
    return cfg.run.seed * 100_003 + t


def _trainer(ctx: Context, n_pairs: int, compiled: dict):
    """(optimizer, step(state, batch)) for a round of n_pairs. One jitted step serves every round: the
    round's length enters it as its schedule's step counts (optim.schedule_steps), an argument."""
    r = ctx.cfg.run
    total = max(1, batching.batches_per_epoch(n_pairs, r.batch_size) * r.epochs)  # (0 batches: no steps)
    if total not in compiled:
        optimizer = step_lib.make_optimizer(ctx.cfg.optim, total)  # (its init: the round's first lr)
        if "step" not in compiled:
            compiled["step"] = step_lib.make_train_step(
                ctx.model_cfg, ctx.cfg.objective, ctx.cfg.optim, optimizer, ctx.mesh,
                step_lib.pair_batch_shapes(r.batch_size, ctx.buckets[0],
                                           packed=step_lib.packs(ctx.cfg.data.pack, ctx.model_cfg, ctx.buckets[-1])),
                schedule_arg=True)
        jitted, steps_2 = compiled["step"], shd.put_global(step_lib.schedule_steps(ctx.cfg.optim, total),
                                                           shd.replicated(ctx.mesh))
        compiled[total] = optimizer, lambda state, batch: jitted(state, batch, steps_2)
    return compiled[total]


def _train_pairs(pairs: pairs_lib.RoundPairs, refs: dict):
    """(examples, (ref_real, ref_gen, win_real, win_gen)) of the pairs trained on this round."""
    keys = [k for k in ("train", "prev") if k in pairs.splits]
    columns = [(refs[k][0], refs[k][1], *pairs.win_arrays(k)) for k in keys]
    return sum((pairs.splits[k] for k in keys), []), tuple(np.concatenate(c) for c in zip(*columns))


def train_phase(ctx: Context, state, rs: RoundState, t: int, pairs: pairs_lib.RoundPairs, refs: dict,
                compiled: dict, done_rows: list):
    """Optimizer steps over the round's pairs from rs's step/cursor, checkpointing on the way:
    (state, RoundState, mean train metrics). done_rows: rows this round logged before a resume."""
    cfg, r = ctx.cfg, ctx.cfg.run
    examples, per_pair = _train_pairs(pairs, refs)
    _, train_step = _trainer(ctx, len(examples), compiled)
    total = batching.batches_per_epoch(len(examples), r.batch_size) * r.epochs
    if total == 0:  # e.g. a judge that found a winner for too few prompts: the round keeps its params
        ctx.echo(f"round {t}: {len(examples)} pairs, fewer than one batch of run.batch_size={r.batch_size}: "
                 "no training step this round")
        return state, rs, {}
    if len(examples) % r.batch_size and rs.step == 0:  # whole batches only: the remainder sits out, said
        ctx.echo(f"round {t}: {len(examples)} pairs make {len(examples) // r.batch_size} batches of "
                 f"{r.batch_size} an epoch; {len(examples) % r.batch_size} sit out each epoch (others each shuffle)")
    packed = step_lib.packs(cfg.data.pack, ctx.model_cfg, ctx.buckets[-1])
    order = dict(seed=_shuffle_seed(cfg, t), epochs=r.epochs)
    shape_of = packing.shape_rule(examples, [ids for ids, _ in batching.global_batches(len(examples), r.batch_size,
                                                                                      **order)],
                                  buckets=ctx.buckets, grad_accum=cfg.optim.grad_accum,
                                  data_parallel=shd.data_parallel_size(ctx.mesh), packed=packed)
    bar = metrics_lib.progress(total, f"round {t} train", "step")
    bar.update(rs.step)
    pending, rows, t0 = [], list(done_rows), time.perf_counter()
    batches = batching.global_batches(len(examples), r.batch_size, cursor=rs.cursor, **order)
    for s, (ids_G, cursor) in enumerate(batches, start=rs.step):
        n_rows, length = shape_of(ids_G)
        host = packing.pair_rows(examples, ids_G, rows=n_rows, row_len=length, grad_accum=cfg.optim.grad_accum,
                                 packed=packed, pad_id=ctx.pad_id)  # the whole global batch
        state, m = train_step(state, device_batch(ctx, host, per_pair, packed))
        if cfg.optim.nonfinite == "raise" and not bool(shd.to_host(m["finite"])):  # the update was dropped:
            if rs.global_step not in ctx.checkpointer.steps():  # keep this state, the one before the step
                ctx.checkpointer.save(rs.global_step, saving.to_save(ctx.model_cfg, state), _meta(ctx, rs), wait=True)
            step_lib.check_finite(jax.tree.map(shd.to_host, m), cfg.optim)  # raises FloatingPointError
        pending.append(m)
        rs = dataclasses.replace(rs, step=s + 1, cursor=cursor, global_step=rs.global_step + 1)
        last = s + 1 == total
        save = not last and (s + 1) % r.checkpoint_every == 0
        if len(pending) >= r.log_every or last or save:  # a resume restarts at `save`: log up to it
            row, t0 = _log_train(ctx, t, rs, pending, t0)
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('accuracy', float('nan')):.2f}")
            pending = []
        bar.update(1)
        ctx.fault("train")
        if save:
            ctx.checkpointer.save(rs.global_step, saving.to_save(ctx.model_cfg, state), _meta(ctx, rs))
            ctx.fault("checkpoint")
    bar.close()
    return state, rs, metrics_lib.mean_metrics(rows) if rows else {}


_COUNTERS = ("step", "skipped", "finite", "n_tokens")  # a step's metrics that are not metrics


def _log_train(ctx: Context, t: int, rs: RoundState, pending: list, t0: float) -> tuple[dict, float]:
    """(the interval's metrics row, its end): it ends once its steps' metrics are on the host (dispatch is
    asynchronous: once the device has run them)."""
    host = [jax.tree.map(shd.to_host, m) for m in pending]
    now = time.perf_counter()
    for m in host:
        step_lib.check_finite(m, ctx.cfg.optim)
    tokens = sum(float(m["n_tokens"]) for m in host)
    # Scalars averaged over the interval's finite steps (a skipped step's NaNs, and its NaN margins read
    # as ties, are no metric); `skipped` counts the others, `tokens` all. The counters are not metrics.
    scalars = lambda m: {k: v for k, v in m.items() if np.ndim(v) == 0 and k not in _COUNTERS}
    kept = [scalars(m) for m in host if bool(m["finite"])]
    row = metrics_lib.mean_metrics(kept) if kept else {k: float("nan") for k in scalars(host[0])}
    row.update(round=t, steps=len(kept), skipped=len(host) - len(kept), tokens=tokens, seconds=now - t0,
               tokens_per_s=tokens / max(now - t0, 1e-9))
    ctx.writer.write("train", rs.global_step, row)
    return row, now


def checkpoint_phase(ctx: Context, state, rs: RoundState, t: int) -> RoundState:
    """The round's final params, saved as the next round's starting point: without the optimizer
    state, which the next round rebuilds (spjax.saving)."""
    trained = rs.step > 0
    rs = RoundState(round=t + 1, phase="sample", global_step=rs.global_step)
    if trained:  # else the latest checkpoint holds these params: a resume redoes round t from its files
        ctx.checkpointer.save(rs.global_step, saving.to_save(ctx.model_cfg, state, optimizer=False), _meta(ctx, rs))
    return rs


# ---------------------------------------------------------------------------------------------
# Resume and the run


def restore(ctx: Context, params):
    """(RoundState, TrainState or None, {round: its logged train rows}) from the latest checkpoint
    (params: the run's as loaded; a LoRA checkpoint's frozen base)."""
    restored = saving.restore_latest(ctx.checkpointer, ctx.model_cfg, ctx.cfg.optim, ctx.mesh, params, ctx.base_sums)
    rs, state = RoundState(), None
    if restored is not None:
        state, rs = restored[0], RoundState.from_meta(restored[1])
        ctx.echo(f"resumed at round {rs.round}, phase {rs.phase}, step {rs.step}")
    # Lines logged after the restored point are about to be logged again: drop them. Those of a
    # round resumed mid-training still count towards that round's summary.
    # A round's line without its eval.json (killed between the two) is logged again when it is evaluated.
    kept = ctx.writer.rewind(lambda row: row["step"] <= rs.global_step if row["kind"] == "train"
                             else row["step"] < rs.round and os.path.exists(os.path.join(ctx.round_dir(row["step"]),
                                                                                          "eval.json")))
    logged = {}
    for row in kept:
        if row["kind"] == "train":
            row = {k: v for k, v in row.items() if k not in ("kind", "step", "time")}
            if "steps" not in row:  # an earlier version's row: a mean of log_every steps, skipped a running total
                row = {**{k: v for k, v in row.items() if k not in ("finite", "skipped")},
                       "steps": ctx.cfg.run.log_every}
            logged.setdefault(row.get("round"), []).append(row)
    return rs, state, logged


def run(cfg: Config, workdir: str, resume: bool = False, echo=print, fault=None) -> dict:
    """Run (or resume) all rounds; returns {row name: metrics} as printed in the summary table.

    fault: called with "sample", "judge", "score", "train", "checkpoint", "record" at each resumable
    point (tests kill there).
    """
    ctx, params = setup(cfg, workdir, resume, echo, fault)
    # Trace under the run's mesh: attention picks its kernel for the mesh's platform (spjax.attention).
    with jax.sharding.use_abstract_mesh(ctx.mesh.abstract_mesh):
        return _rounds(ctx, params, resume)


def _row(ctx: Context, params, t: int, pairs, refs: dict, train_row: dict, times: Optional[dict] = None) -> dict:
    """Round t's row: its mean train metrics, its pairs' stats, the held-out evaluation, phase times.
    The training batches' NLL is train_nll: `nll` is the held-out one (absent without held-out data)."""
    train_row = {("train_nll" if k == "nll" else k): v for k, v in train_row.items()}
    return {**train_row, **pairs.stats, **evaluate.evaluate_phase(ctx, params, f"round {t}", pairs, refs, t),
            **(times or {})}


def _rounds(ctx: Context, params, resume: bool) -> dict:
    cfg = ctx.cfg
    rs, state, logged = restore(ctx, params) if resume else (RoundState(), None, {})
    if rs.round > cfg.run.rounds or (rs.round == cfg.run.rounds and rs.phase == "train"):  # its latest state
        raise ConfigError(  # is of a later round: the export would be that model, not round {rounds - 1}'s
            f"run.rounds={cfg.run.rounds}: the run in {ctx.workdir} is past it (round {rs.round}, phase {rs.phase}); "
            f"resume with run.rounds >= {rs.round + (rs.phase == 'train')} (spjax export writes its latest checkpoint)")
    if jax.process_index() == 0:  # the setup finished and the config is accepted (a refused one is not recorded)
        os.makedirs(ctx.workdir, exist_ok=True)
        with open(os.path.join(ctx.workdir, "config.txt"), "w") as f:
            f.write(repr(cfg) + "\n")
    done_rows = logged.get(rs.round, []) if rs.phase == "train" else []
    if rs.round == cfg.run.rounds and resume:
        ctx.echo(f"the run's {cfg.run.rounds} rounds are done: its rows are read back"
                 f"{', and the model exported again' if cfg.run.export else ''}")
    if state is not None:  # a round start needs the params only: drop the optimizer state
        params, state = state.params, (state if rs.phase == "train" else None)
    summary, compiled = {"initial": evaluate.evaluate_initial(ctx, params)}, {}
    for t in range(cfg.run.rounds):
        if t < rs.round:  # finished before the resume: its row is on disk
            done = os.path.join(ctx.round_dir(t), "eval.json")
            if os.path.exists(done):
                summary[f"round {t}"] = artifacts.load_json(done)
            elif t + 1 == rs.round:  # killed after its checkpoint, before its row: evaluate it now (params
                pairs = pairs_lib.form_pairs(ctx, params, t, ctx.held)  # are its own; pairs, scores on disk)
                train_row = metrics_lib.mean_metrics(logged[t]) if logged.get(t) else {}
                times_path = os.path.join(ctx.round_dir(t), "times.json")
                summary[f"round {t}"] = _row(ctx, params, t, pairs, scoring.score_phase(ctx, params, t, pairs),
                                             train_row, artifacts.load_json(times_path) if os.path.exists(times_path)
                                             else None)
                if ledger.record_round(ctx, t, params, summary):
                    break
                continue
            # a run that stopped stays stopped (a rule changed since: applied at the last round done only)
            if t + 1 == rs.round and ledger.stop_here(ctx, summary, t):
                break
            continue
        if not (rs.round == t and rs.phase == "train"):  # (mid-training, params are no longer the opponent)
            ledger.check_opponent(ctx, t, params)
        times = {}
        with metrics_lib.timed(times, "sample_s"):
            pairs = pairs_lib.form_pairs(ctx, params, t, ctx.held)
        with metrics_lib.timed(times, "score_s"):
            refs = scoring.score_phase(ctx, params, t, pairs)
        with metrics_lib.timed(times, "train_s"):
            if not (rs.round == t and rs.phase == "train"):  # a fresh round starts from its opponent
                state, done_rows = step_lib.init_state(ctx.model_cfg, params, _trainer(
                    ctx, len(_train_pairs(pairs, refs)[0]), compiled)[0], ctx.mesh), []
                rs = dataclasses.replace(rs, round=t, phase="train", step=0, cursor=None)
            params = None  # the opponent is no longer needed (its scores are on disk): free it
            state, rs, train_row = train_phase(ctx, state, rs, t, pairs, refs, compiled, done_rows)
        artifacts.save_json(os.path.join(ctx.round_dir(t), "times.json"), times)  # for a row evaluated on resume
        rs = checkpoint_phase(ctx, state, rs, t)
        params, state = state.params, None  # the optimizer state is rebuilt next round: free it now
        summary[f"round {t}"] = _row(ctx, params, t, pairs, refs, train_row, times)
        if ledger.record_round(ctx, t, params, summary):
            break
    ctx.checkpointer.close()
    ledger.finish(ctx, params, summary)
    return summary
