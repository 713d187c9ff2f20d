"""The sharded pair train step: policy forward+backward on real and generated responses, optax update.

Dimensions as in spjax.model, plus A (micro-batches per step) and b = B // A (pairs per micro-batch).
A pair batch is a PairBatch of B pairs of length L. The reference never enters the step as a
model: its log-probs are inputs (DESIGN.md §1 step 3).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from spjax import logprobs, lora, model, objectives, sharding
from spjax.config import ConfigError, ModelConfig, ObjectiveConfig, OptimConfig
from spjax.optim import learning_rate, make_optimizer, make_schedule, schedule_steps  # noqa: F401 (the step's optimizer)

@flax.struct.dataclass
class PairBatch:
    """B pairs (x, y, y') as R rows of L tokens (spjax.data.packing builds them): one sequence per
    row, right-padded (packed=False), or several sequences per row as segments (packed=True).

    Sequence slot 2j is pair j's real (or chosen) response, 2j+1 its second one, numbered within
    each micro-batch. The train step, the eval step, compile_check and the benches take this type.
    """

    tokens_RxL: Any  # int32: prompt + response of each sequence
    segments_RxL: Any  # int32: a sequence's segment id in its row (1, 2, ...), 0 on padding
    positions_RxL: Any  # int32: position within the sequence (restarts at each segment)
    targets_RxL: Any  # int32: 1 on the response tokens whose log-probs count
    seqs_RxL: Any  # int32: the slot each token's log-prob sums into
    ref_real_B: Any  # float32: the frozen reference's sequence log-probs, precomputed once per round
    ref_gen_B: Any
    win_real_B: Any  # float32: the judge's soft win rate of each side (judged pairs); else 1 and 0
    win_gen_B: Any
    packed: bool = flax.struct.field(pytree_node=False, default=False)


@flax.struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array  # int32 []: steps taken, skipped ones included (the data cursor)
    skipped: jax.Array  # int32 []: steps whose update was dropped because loss or grads were non-finite


# ---------------------------------------------------------------------------------------------
# State and shardings


def state_shardings(cfg: ModelConfig, mesh: Mesh, optimizer) -> TrainState:
    """NamedShardings of a TrainState: params by the RULES table, optimizer moments like their
    params (so FSDP shards them too), scalars (counts, step, lr) replicated. The optimizer holds
    state for the trainable params only (lora.split: the adapters of a LoRA policy)."""
    param_sh = sharding.param_shardings(cfg, mesh)
    abstract_opt = jax.eval_shape(optimizer.init, lora.split(cfg, model.param_shapes(cfg))[0])
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, lora.split(cfg, param_sh)[0],
                                   transform_non_params=lambda _: sharding.replicated(mesh))
    rep = sharding.replicated(mesh)
    return TrainState(params=param_sh, opt_state=opt_sh, step=rep, skipped=rep)


def abstract_state(cfg: ModelConfig, optimizer, mesh: Mesh) -> TrainState:
    """A TrainState of ShapeDtypeStructs with its shardings: what a checkpoint restores into and
    what ahead-of-time compiles take (nothing allocated)."""
    params = model.param_shapes(cfg)
    zero = jax.ShapeDtypeStruct((), jnp.int32)
    opt_state = jax.eval_shape(optimizer.init, lora.split(cfg, params)[0])
    shapes = TrainState(params=params, opt_state=opt_state, step=zero, skipped=zero)
    return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes,
                        state_shardings(cfg, mesh, optimizer))


def _mesh_of(tree) -> Mesh | None:
    leaf = jax.tree.leaves(tree)[0]
    sh = getattr(leaf, "sharding", None)
    return sh.mesh if isinstance(sh, NamedSharding) else None


def init_state(cfg: ModelConfig, params, optimizer, mesh: Mesh | None = None) -> TrainState:
    """A fresh TrainState born sharded (default mesh: the params'). The trainable params are copied,
    not donated: the caller usually keeps them as the frozen opponent/reference. A LoRA policy's
    frozen base is shared, not copied (no second copy of the model): the train step donates the
    state, so the caller's params are spent by the first step (rounds drops them before training)."""
    mesh = mesh or _mesh_of(params)
    if mesh is None:
        raise ValueError("init_state: pass a mesh, or params sharded with NamedShardings")
    train, frozen = lora.split(cfg, params)
    p, opt, step, skipped = _init_program(cfg, optimizer, mesh)(train)
    return TrainState(params=lora.join(p, frozen), opt_state=opt, step=step, skipped=skipped)


@functools.lru_cache(maxsize=8)
def _init_program(cfg: ModelConfig, optimizer, mesh: Mesh):
    """init_state's program, jitted once per (model, optimizer, mesh): a fresh closure's jit compiled
    again every round."""
    sh = state_shardings(cfg, mesh, optimizer)

    def init(p):
        zero = jnp.zeros((), jnp.int32)
        return p, optimizer.init(p), zero, zero

    return jax.jit(init, out_shardings=(lora.split(cfg, sh.params)[0], sh.opt_state, sh.step, sh.skipped))


def batch_shardings(mesh: Mesh, batch_shapes: PairBatch) -> PairBatch:
    """Each batch array split over the data-parallel axes along its leading (pair) dimension."""
    return jax.tree.map(lambda v: sharding.batch_sharding(mesh, len(_shape(v))), batch_shapes)


def _shape(x):
    return tuple(x.shape) if hasattr(x, "shape") else tuple(x)


def _check_batch(mesh: Mesh, batch_shapes: PairBatch, grad_accum: int):
    if not isinstance(batch_shapes, PairBatch):
        raise TypeError(f"a pair batch is a step.PairBatch, got {type(batch_shapes).__name__}")
    B, R = _shape(batch_shapes.ref_real_B)[0], _shape(batch_shapes.tokens_RxL)[0]
    dp = sharding.data_parallel_size(mesh)
    if B % grad_accum or R % grad_accum:
        raise ConfigError(f"optim.grad_accum: {B} pairs in {R} rows do not split into {grad_accum} micro-batches")
    if B % dp or R % dp:
        raise ConfigError(f"batch: {B} pairs in {R} rows do not split over {dp} data-parallel devices")


# ---------------------------------------------------------------------------------------------
# Loss and the step


def _constrain_batch(x, mesh):
    """Keep the leading dim split over data x fsdp where it divides (an uneven split would pad)."""
    if mesh is None or x.shape[0] % sharding.data_parallel_size(mesh):
        return x
    return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.ndim))


def _scored(batch):
    # What logprobs scores: targets on valid tokens, never column 0 (no context; the packer never
    # marks a later segment's first token).
    return (batch.targets_RxL.astype(bool) & (batch.segments_RxL > 0)).at[:, 0].set(False)


def _real_tokens(batch):
    """Scored tokens of the real sides (even slots) in the batch."""
    return jnp.sum(_scored(batch) & (batch.seqs_RxL % 2 == 0)).astype(jnp.float32)


def pair_loss_fn(params, batch, model_cfg: ModelConfig, obj_cfg: ObjectiveConfig, mesh=None,
                 n_real_per_micro=None):
    """Scalar objective loss of one pair batch and the objective's aux metrics (one forward of R rows).

    n_real_per_micro: the whole batch's scored real tokens / A. Given, the per-token NLL term is
    normalised by it instead of this micro-batch's own count, so the mean over A equal micro-batches
    is exactly the whole batch's token-weighted NLL.
    """
    rows = jax.tree.map(lambda x: _constrain_batch(x, mesh), (batch.tokens_RxL, batch.segments_RxL,
                                                             batch.positions_RxL, batch.targets_RxL))
    tokens, segments, positions, targets = rows
    packed = dict(segment_ids_BxL=segments, positions_BxL=positions) if batch.packed else {}
    lp_RxL = logprobs.token_logprobs(model_cfg, params, tokens, targets, segments > 0, **packed)
    # Each sequence's log-prob: its tokens' sum, wherever its row (one scatter of R*L values).
    S = 2 * batch.ref_real_B.shape[0]
    seqs = batch.seqs_RxL.reshape(-1)
    lp_Bx2 = jax.ops.segment_sum(lp_RxL.reshape(-1), seqs, num_segments=S).reshape(-1, 2)
    n_Bx2 = jax.ops.segment_sum(_scored(batch).reshape(-1).astype(jnp.float32), seqs, num_segments=S).reshape(-1, 2)
    n_real_B = n_Bx2[:, 0]
    if n_real_per_micro is not None:  # rescale so the counts sum to n_real_per_micro
        n_real_B = n_real_B * (n_real_per_micro / jnp.maximum(jnp.sum(n_real_B), 1.0))
    loss, aux = objectives.objective_loss(obj_cfg, lp_Bx2[:, 0], lp_Bx2[:, 1],
                                          batch.ref_real_B, batch.ref_gen_B, n_real_B,
                                          win_real_B=batch.win_real_B, win_gen_B=batch.win_gen_B)
    aux = dict(aux, len_real=jnp.mean(n_Bx2[:, 0]))  # response lengths, in scored tokens
    if "lp_gen" in aux:  # a pair objective (sft has no second side)
        aux["len_gen"] = jnp.mean(n_Bx2[:, 1])
    if "loss" in aux:  # aux's 'loss' is the pair loss alone (none for sft); 'loss' below is the total
        aux["pair_loss"] = aux.pop("loss")
    return loss, aux


def _micro_batches(x, A):
    # Strided split (micro-batch a holds pairs a, a+A, ...) so every micro-batch keeps the full
    # data-parallel split of the pair dimension; the split is free, and pair losses are means, so
    # which pairs share a micro-batch does not change the result.
    return x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1)


def train_step(state: TrainState, batch: PairBatch, schedule=None, *, model_cfg: ModelConfig,
               obj_cfg: ObjectiveConfig, optimizer, grad_accum: int = 1, mesh: Mesh | None = None):
    """One optimizer step on a pair batch: (new state, metrics). Pure; jit it via make_train_step.
    schedule: optim.schedule_steps of the round (int32 [2]), else the optimizer's own total_steps'.

    Gradients are taken for the trainable params alone (lora.split): with LoRA the frozen base never
    gets a gradient buffer, and passes through to the new state untouched (donated, so not copied).
    """
    A = grad_accum
    train_params, frozen = lora.split(model_cfg, state.params)
    grad_fn = jax.value_and_grad(lambda tp, *a: pair_loss_fn(lora.join(tp, frozen), *a), has_aux=True)
    f32 = jnp.float32
    if A == 1:
        (loss, aux), grads = grad_fn(train_params, batch, model_cfg, obj_cfg, mesh)
        grads = jax.tree.map(lambda g: g.astype(f32), grads)
    else:
        n_real = jnp.maximum(_real_tokens(batch), 1.0) / A  # the batch's count: a micro-batch's may be 0
        micro = jax.tree.map(lambda v: _micro_batches(v, A), batch)

        def body(g_sum, mb):
            mb = jax.tree.map(lambda v: _constrain_batch(v, mesh), mb)
            (l, x), g = grad_fn(train_params, mb, model_cfg, obj_cfg, mesh, n_real)
            return jax.tree.map(lambda s, gi: s + gi.astype(f32), g_sum, g), (l, x)

        # fp32 accumulators shaped and sharded like the params (FSDP: each device sums its shard).
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, f32), train_params)
        if mesh is not None:
            zeros = jax.lax.with_sharding_constraint(
                zeros, lora.split(model_cfg, sharding.param_shardings(model_cfg, mesh))[0])
        g_sum, (loss_A, aux_A) = jax.lax.scan(body, zeros, micro)
        # Equal micro-batches of a mean-over-pairs loss: the plain mean is the full-batch gradient.
        grads = jax.tree.map(lambda g: g / A, g_sum)
        loss, aux = jnp.mean(loss_A), jax.tree.map(jnp.mean, aux_A)

    grad_norm = optax.tree.norm(grads)
    # A NaN/Inf loss or gradient drops the whole update: the optimizer (spjax.optim) then returns
    # zero updates and its state unchanged (also in 'raise' mode, so the driver can stop with a
    # clean state to checkpoint). Done inside its one fused pass: a select over the new and old
    # state here would cost three more passes over params and moments.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optax.with_extra_args_support(optimizer).update(grads, state.opt_state, train_params,
                                                                       finite=finite, schedule=schedule)
    new_state = TrainState(params=lora.join(optax.apply_updates(train_params, updates), frozen), opt_state=new_opt,
                           step=state.step + 1, skipped=state.skipped + (~finite).astype(jnp.int32))
    n_tokens = jnp.sum(batch.segments_RxL > 0)
    metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": learning_rate(new_opt),
               "finite": finite, "skipped": new_state.skipped, "step": state.step, "n_tokens": n_tokens}
    return new_state, metrics


def make_train_step(model_cfg: ModelConfig, obj_cfg: ObjectiveConfig, opt_cfg: OptimConfig, optimizer,
                    mesh: Mesh, batch_shapes: PairBatch, schedule_arg: bool = False):
    """train_step jitted once for this mesh and batch shape: fn(state, batch) -> (state, metrics).

    The state argument is donated: its buffers become the new state's, so only one copy of params
    and optimizer state is live. Call check_finite(metrics, opt_cfg) on the host after each step.
    schedule_arg: fn(state, batch, schedule), schedule a round's optim.schedule_steps (int32 [2]): one
    program for rounds of any length (the optimizer's own total_steps then sets its initial state only).
    """
    _check_batch(mesh, batch_shapes, opt_cfg.grad_accum)
    state_sh = state_shardings(model_cfg, mesh, optimizer)
    fn = functools.partial(train_step, model_cfg=model_cfg, obj_cfg=obj_cfg, optimizer=optimizer,
                           grad_accum=opt_cfg.grad_accum, mesh=mesh)
    return jax.jit(
        fn,
        # state: params sharded by the logical-axis RULES (fsdp splits the width, tensor splits
        #   heads/mlp/vocab), optimizer moments exactly like their params, counters replicated.
        # batch: the pair dimension split over data x fsdp; sequence positions stay whole.
        in_shardings=(state_sh, batch_shardings(mesh, batch_shapes)) + ((sharding.replicated(mesh),) if schedule_arg
                                                                         else ()),
        # The new state lands where the old one was (so donation reuses its buffers and the next
        # call hits the same executable); metrics are replicated scalars every host can read.
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnames=("state",),
    )


def check_finite(metrics, opt_cfg: OptimConfig) -> bool:
    """Host side: True when the step was finite; raise FloatingPointError in nonfinite='raise' mode."""
    if bool(metrics["finite"]):
        return True
    if opt_cfg.nonfinite == "raise":
        raise FloatingPointError(
            f"step {int(metrics['step'])}: non-finite loss/grad (loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}); the update was dropped and the state is the "
            f"one before this step. Set optim.nonfinite=skip to count and skip such steps instead.")
    return False


# ---------------------------------------------------------------------------------------------
# Evaluation and reference scoring


def eval_step(params, batch, *, model_cfg: ModelConfig, obj_cfg: ObjectiveConfig, mesh=None):
    """Loss and the objective's aux on a pair batch, no update."""
    loss, aux = pair_loss_fn(params, batch, model_cfg, obj_cfg, mesh)
    return {"loss": loss, **aux}


def make_eval_step(model_cfg: ModelConfig, obj_cfg: ObjectiveConfig, mesh: Mesh, batch_shapes: PairBatch):
    """eval_step jitted for this mesh and batch shape: fn(params, batch) -> metrics."""
    _check_batch(mesh, batch_shapes, 1)
    fn = functools.partial(eval_step, model_cfg=model_cfg, obj_cfg=obj_cfg, mesh=mesh)
    # params as in training; batch split over data x fsdp; metrics replicated.
    return jax.jit(fn, in_shardings=(sharding.param_shardings(model_cfg, mesh), batch_shardings(mesh, batch_shapes)),
                   out_shardings=sharding.replicated(mesh))


@functools.partial(jax.jit, static_argnums=0)
def _score(cfg, params, ids_BxL, mask_BxL, target_BxL):
    return logprobs.sequence_logprobs(cfg, params, ids_BxL, target_BxL, mask_BxL)


@functools.partial(jax.jit, static_argnums=0)
def _score_rows(cfg, params, tokens_RxL, segments_RxL, positions_RxL, targets_RxL):
    return logprobs.token_logprobs(cfg, params, tokens_RxL, targets_RxL, segments_RxL > 0,
                                   segment_ids_BxL=segments_RxL, positions_BxL=positions_RxL)


def _put_rows(mesh: Mesh | None, arrays):
    """[B, L] host arrays split over the data-parallel axes of mesh when B divides, else replicated."""
    if mesh is None:
        return arrays
    B = np.shape(arrays[0])[0]
    sh = sharding.batch_sharding(mesh, 2) if B % sharding.data_parallel_size(mesh) == 0 \
        else sharding.replicated(mesh)
    return tuple(sharding.put_global(x, sh) for x in arrays)


def score(cfg: ModelConfig, params, ids_BxL, mask_BxL, target_BxL, mesh: Mesh | None = None):
    """fp32 [B] sequence log-probs of the target tokens of right-padded rows, one sequence each.

    The batch is split over the data-parallel axes of `mesh` (default: the params' mesh) when B
    divides, else replicated; params stay where they are.
    """
    return _score(cfg, params, *_put_rows(mesh or _mesh_of(params), (ids_BxL, mask_BxL, target_BxL)))


def score_rows(cfg: ModelConfig, params, rows: dict, mesh: Mesh | None = None):
    """fp32 [R, L] token log-probs of packed rows (packing.side_rows), 0 where not scored: each
    segment sees only itself; summing by rows['seqs_RxL'] gives each sequence's log-prob."""
    keys = ("tokens_RxL", "segments_RxL", "positions_RxL", "targets_RxL")
    return _score_rows(cfg, params, *_put_rows(mesh or _mesh_of(params), tuple(rows[k] for k in keys)))


def packs(pack: str, model_cfg: ModelConfig, length: int) -> bool:
    """Whether training packs pairs into rows (data.pack; auto: unless cuDNN attention serves the step).
    Packed rows need attention masked per segment: XLA's einsum path (CPU) and splash (TPU) take
    segment ids, cuDNN's flash attention (GPU) does not, so a GPU run keeps one sequence per row.
    Traced under the target's mesh (as rounds and compile_check are), the answer is the target's."""
    if pack != "auto":
        return pack == "on"
    return model.attention_impl(model_cfg, cached=False, right_padded=True, q_len=length) != "cudnn"


def unpacked_batch(real_ids_BxL, real_mask_BxL, real_target_BxL, gen_ids_BxL, gen_mask_BxL, gen_target_BxL,
                   ref_real_B, ref_gen_B, win_real_B=None, win_gen_B=None, grad_accum: int = 1) -> PairBatch:
    """A host PairBatch with one right-padded sequence per row from the two sides' [B, L] arrays
    (ids, valid-token mask, response-token mask), laid out for `grad_accum` micro-batches like
    packing.pair_rows: micro-batch a (pairs j*A + a) has slot s = 2j + side at row s*A + a."""
    A, (B, L) = grad_accum, np.shape(real_ids_BxL)

    def rows(real, gen):  # [B, L] x 2 -> [2B, L]
        return np.stack([real, gen], 1).reshape(B // A, A, 2, L).transpose(0, 2, 1, 3).reshape(2 * B, L)

    valid = rows(real_mask_BxL, gen_mask_BxL).astype(np.int32)
    slot = np.broadcast_to((np.arange(2 * B) // A)[:, None], (2 * B, L))
    ones, zeros = np.ones(B, np.float32), np.zeros(B, np.float32)
    return PairBatch(rows(real_ids_BxL, gen_ids_BxL).astype(np.int32), valid,
                     np.broadcast_to(np.arange(L, dtype=np.int32), (2 * B, L)) * valid,
                     rows(real_target_BxL, gen_target_BxL).astype(np.int32) * valid, slot.astype(np.int32),
                     np.asarray(ref_real_B, np.float32), np.asarray(ref_gen_B, np.float32),
                     ones if win_real_B is None else np.asarray(win_real_B, np.float32),
                     zeros if win_gen_B is None else np.asarray(win_gen_B, np.float32))


def pair_batch_shapes(batch_size: int, length: int, rows: int | None = None, packed: bool = False) -> PairBatch:
    """ShapeDtypeStructs of a pair batch of `batch_size` pairs in `rows` rows (default: one per
    sequence, 2 * batch_size) of `length` tokens."""
    tokens = jax.ShapeDtypeStruct((rows or 2 * batch_size, length), jnp.int32)
    scores = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    return PairBatch(*([tokens] * 5 + [scores] * 4), packed=packed)


__all__ = ["TrainState", "PairBatch", "make_schedule", "make_optimizer", "state_shardings",
           "abstract_state", "init_state",
           "batch_shardings", "pair_loss_fn", "train_step", "make_train_step", "check_finite",
           "eval_step", "make_eval_step", "score", "pair_batch_shapes", "packs", "unpacked_batch"]

