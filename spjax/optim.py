"""The optimizer: global-norm clipping, then AdamW or RMSProp on a warmup/decay schedule, in one pass.

One optax transformation computes clipping, the moments, weight decay and the learning rate per
leaf in a single elementwise expression, and drops a non-finite step itself: given finite=False
(or a non-finite gradient norm) it returns zero updates and its state unchanged. The same maths
as optax.chain(clip_by_global_norm, adamw | scale_by_rms, ...) wrapped in inject_hyperparams,
whose selects over the new and the old state afterwards cost three passes over params and
moments: on the CPU the SmolLM2-135M update took 514 ms that way and 133 ms fused
(bench/optimizer.py prints both).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spjax.config import ConfigError, OptimConfig

SCHEDULES = ("linear", "cosine", "constant")


def schedule_steps(opt_cfg: OptimConfig, total_steps: int) -> np.ndarray:
    """int32 [2]: (warmup, decay) steps of a round of total_steps: a linear warmup from 0 over
    round(warmup_frac * total_steps) steps, then the decay (linear/cosine to 0, or constant) over the rest."""
    if total_steps < 1:
        raise ConfigError(f"optim: total_steps must be >= 1, got {total_steps}")
    if opt_cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: {opt_cfg.schedule!r} not in {SCHEDULES}")
    warmup = int(round(opt_cfg.warmup_frac * total_steps))
    return np.asarray([warmup, max(total_steps - warmup, 1)], np.int32)


def schedule_at(opt_cfg: OptimConfig, count, steps_2):
    """float32 []: the learning rate at update `count` of a round whose schedule_steps are steps_2. Both
    may be traced: one compiled step serves rounds of any length (a round's step count was a constant
    of the program: each new length, e.g. run.mix_previous's second round or a judged round with other
    pair counts, compiled the whole train step again). optax's linear/cosine/join schedules' values."""
    f32 = jnp.float32
    c, warmup, rest = (jnp.asarray(x, f32) for x in (count, steps_2[0], steps_2[1]))
    done = jnp.clip(c - warmup, 0.0, rest) / rest  # the decay's progress, 0 -> 1
    if opt_cfg.schedule == "linear":
        decay = 1.0 - done
    elif opt_cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + jnp.cos(jnp.pi * done))
    else:
        decay = jnp.ones_like(done)
    return opt_cfg.lr * jnp.where(c < warmup, c / jnp.maximum(warmup, 1.0), decay)


def make_schedule(opt_cfg: OptimConfig, total_steps: int):
    """count -> learning rate for a round of total_steps (schedule_at with its schedule_steps)."""
    steps_2 = schedule_steps(opt_cfg, total_steps)
    return lambda count: schedule_at(opt_cfg, count, steps_2)


def decay_mask(params):
    """True where weight decay applies. Norm scales and biases are not decayed (the usual AdamW
    practice); matched by name because the layer-stacked norm scales are 2-D ([N, D]) like a matrix."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(s in jax.tree_util.keystr(path) for s in ("norm", "bias")), params)


class OptState(NamedTuple):
    count: jax.Array  # int32 []: updates applied (skipped steps not counted): the schedule's step
    lr: jax.Array  # float32 []: the learning rate of the latest applied update
    mu: Any  # first moments like the params (adamw), None for rmsprop
    nu: Any  # second moments like the params


def make_optimizer(opt_cfg: OptimConfig, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """update(grads, state, params, finite=True, schedule=None) -> (updates, state); see the module
    docstring. total_steps sets the schedule; `schedule` (schedule_steps of another total, traced) the
    schedule of one update instead, so that a program compiled once serves rounds of any length.

    adamw: optax.adamw's bias-corrected moments, eps outside the square root, decoupled decay.
    rmsprop follows PyTorch's RMSprop (what SPIN ran): second-moment decay b2, eps outside the
    square root, no momentum, no bias correction; b1 is unused. Weight decay is decoupled for both.
    """
    if opt_cfg.name not in ("adamw", "rmsprop"):
        raise ConfigError(f"optim.name: {opt_cfg.name!r} not in ('adamw', 'rmsprop')")
    steps_2 = schedule_steps(opt_cfg, total_steps)
    adam, b1, b2, eps, wd, clip = (opt_cfg.name == "adamw", opt_cfg.b1, opt_cfg.b2, opt_cfg.eps,
                                   opt_cfg.weight_decay, opt_cfg.clip_norm)

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        first = 0.0 if steps_2[0] else opt_cfg.lr  # schedule_at(0), without eager ops (optax inits it eagerly)
        return OptState(count=jnp.zeros((), jnp.int32), lr=jnp.asarray(first, jnp.float32),
                        mu=zeros() if adam else None, nu=zeros())

    def update(grads, state, params=None, *, finite=True, schedule=None, **extra):
        del extra  # schedule: another round's schedule_steps (traced), else total_steps'
        g_norm = optax.tree.norm(grads)
        ok = jnp.logical_and(finite, jnp.isfinite(g_norm))
        lr = schedule_at(opt_cfg, state.count, steps_2 if schedule is None else schedule)
        t = (state.count + 1).astype(jnp.float32)
        decays = decay_mask(grads) if wd else jax.tree.map(lambda _: False, grads)

        # Every line below is elementwise in the leaf, so XLA fuses each output into one loop.
        scale = 1.0 if clip <= 0 else jnp.where(g_norm < clip, 1.0, clip / g_norm)

        def clipped(g):
            return g * scale.astype(g.dtype) if clip > 0 else g

        def moment(g, m, decay, power):  # kept in the dtype it was created in (bf16 params: bf16 moments),
            new = ((1 - decay) * clipped(g) ** power + decay * m).astype(m.dtype)  # so the state's types hold
            return jnp.where(ok, new, m)

        new_nu = jax.tree.map(lambda g, v: moment(g, v, b2, 2), grads, state.nu)
        new_mu = jax.tree.map(lambda g, m: moment(g, m, b1, 1), grads, state.mu) if adam else None

        def step(g, v, p, decays, m=None):
            if adam:
                u = (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
            else:
                u = clipped(g) / (jnp.sqrt(v) + eps)
            if decays:
                u = u + wd * p
            return jnp.where(ok, -lr * u, 0.0).astype(u.dtype)

        moments = (new_nu, params, decays) + ((new_mu,) if adam else ())
        updates = jax.tree.map(step, grads, *moments)
        return updates, OptState(count=state.count + ok.astype(jnp.int32), lr=jnp.where(ok, lr, state.lr),
                                 mu=new_mu, nu=new_nu)

    return optax.GradientTransformationExtraArgs(init, update)


def legacy_optimizer(opt_cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax chain spjax used before the fused transform (until 2026-12-01): here to read the
    optimizer state of checkpoints written then (`from_legacy`), and as the tests' reference."""
    mask = decay_mask if opt_cfg.weight_decay else None

    def chain(learning_rate):
        parts = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
        if opt_cfg.name == "adamw":
            parts.append(optax.adamw(learning_rate, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                                     weight_decay=opt_cfg.weight_decay, mask=mask))
        else:
            parts.append(optax.scale_by_rms(decay=opt_cfg.b2, eps=opt_cfg.eps, eps_in_sqrt=False))
            if opt_cfg.weight_decay:
                parts.append(optax.add_decayed_weights(opt_cfg.weight_decay, mask))
            parts.append(optax.scale_by_learning_rate(learning_rate))
        return optax.chain(*parts)

    return optax.inject_hyperparams(chain)(learning_rate=make_schedule(opt_cfg, total_steps))


def from_legacy(state) -> OptState:
    """legacy_optimizer's state as an OptState: the same count, latest lr and moments."""
    moments = (optax.ScaleByAdamState, optax.ScaleByRmsState)
    found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, moments)) if isinstance(x, moments)]
    if len(found) != 1 or not hasattr(state, "hyperparams"):
        raise ValueError("not the state of spjax's former optax chain (inject_hyperparams over clip + adamw/rmsprop)")
    m = found[0]
    return OptState(count=jnp.asarray(state.count, jnp.int32),
                    lr=jnp.asarray(state.hyperparams["learning_rate"], jnp.float32),
                    mu=getattr(m, "mu", None), nu=m.nu)


def learning_rate(opt_state):
    """The lr of the latest applied update, read from the state (NaN if it holds no OptState)."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, OptState)):
        if isinstance(s, OptState):
            return s.lr
    return jnp.float32(jnp.nan)
