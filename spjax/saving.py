"""What a run's checkpoint holds, and reading it back: the trainable params, and the optimizer state
only where a resume needs it.

- A LoRA policy saves its adapters only. Its frozen base never changes during a run (the adapter
  carries over rounds), so a resume takes the base as the run loads it (model_path, quantized the
  same way) and checks it against per-leaf checksums saved with every checkpoint: a 7B bf16 base
  is 14 GB a checkpoint otherwise. Without LoRA everything trains and everything is saved.
- A round's end saves no optimizer state: the next round builds a fresh one (AdamW's moments are 2x
  the trainable params). Checkpoints inside a round keep it, for an exact resume there.
- Checkpoints of earlier layouts (the whole LoRA tree; the former optax-chain optimizer state) still
  restore, converted.
- A run says at its start what its checkpoints take (`disk_report`), and warns when the disk cannot
  hold even the round-end ones it keeps.
"""
from __future__ import annotations

import functools
import os
import shutil
from typing import Optional

import jax
from jax.sharding import Mesh

from spjax import checkpoint as ckpt_lib, lora, model, optim
from spjax.config import Config, ConfigError, ModelConfig, OptimConfig
from spjax.step import TrainState, abstract_state, make_optimizer


def checkpoint_bytes(cfg: ModelConfig, opt_cfg: OptimConfig) -> tuple[int, int]:
    """(a round's end, inside a round) bytes of one checkpoint: the trainable params; with their
    optimizer state."""
    train = lora.split(cfg, model.param_shapes(cfg))[0]
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return size(train), size(train) + size(jax.eval_shape(make_optimizer(opt_cfg, 1).init, train))


def disk_report(cfg: Config, model_cfg: ModelConfig, workdir: str) -> str:
    """What the run's checkpoints take, plus a warning where the disk under workdir cannot hold even
    the round-end checkpoints the run keeps: the run would stop at one of them (exit 3, nothing lost)."""
    end, mid = checkpoint_bytes(model_cfg, cfg.optim)
    keep = cfg.run.keep_checkpoints
    line = (f"checkpoints: {size_text(end)} at a round's end, {size_text(mid)} inside a round (with the optimizer "
            f"state); {keep} kept")
    need = min(cfg.run.rounds, keep + 1) * end  # orbax commits a new step before it drops the oldest
    where = os.path.abspath(workdir)
    while not os.path.isdir(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if free < need:
        line += (f"\nwarning: {size_text(free)} free under {where}, and the round-end checkpoints alone need "
                 f"{size_text(need)}: the run will stop (exit 3, nothing lost) when one does not fit; "
                 "free space, then --resume")
    return line


def size_text(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def to_save(cfg: ModelConfig, state: TrainState, optimizer: bool = True) -> TrainState:
    """The part of `state` a checkpoint holds (optimizer=False: a round's end)."""
    return state.replace(params=lora.split(cfg, state.params)[0], opt_state=state.opt_state if optimizer else None)


BASE_SUMS = "base_sums_v2"  # the meta key of base_sums (base_sums: the legacy checksums of earlier runs)


def base_sums(cfg: ModelConfig, params, legacy: bool = False) -> list | None:
    """Per-leaf checksums of a LoRA policy's frozen base (saved in checkpoint meta); None without LoRA."""
    if not cfg.lora.rank:
        return None
    return ckpt_lib.checksums(lora.split(cfg, params)[1], legacy)


def restore_latest(checkpointer, cfg: ModelConfig, opt_cfg: OptimConfig, mesh: Mesh, params=None, sums=None,
                   move_bad: bool = True):
    """(TrainState, meta) of the newest checkpoint that restores, or None.

    params: the run's params as loaded at its start; a LoRA policy's checkpoint (adapters only) is
    joined with their frozen base, which must be the one the run trained on (ConfigError if not).
    sums: base_sums(cfg, params) where the caller has them already (one pass over the base less).
    """
    if cfg.lora.rank and params is None:  # checked here: inside the restore it would read as a bad step
        raise ValueError("a LoRA checkpoint holds the adapters only: restore_latest needs the run's params")
    like = abstract_state(cfg, make_optimizer(opt_cfg, 1), mesh)
    states = [(like, None), (like.replace(opt_state=None), None),  # mid-round; a round's end
              (abstract_state(cfg, optim.legacy_optimizer(opt_cfg, 1), mesh),
               lambda s: s.replace(opt_state=optim.from_legacy(s.opt_state)))]
    layouts = states
    if cfg.lora.rank:  # the adapters joined with the run's base first; then the whole tree (earlier runs)
        trim = lambda s: s.replace(params=lora.split(cfg, s.params)[0])
        layouts = [(trim(x), functools.partial(_with_base, cfg, params, convert)) for x, convert in states] + states
    (first, convert), others = layouts[0], layouts[1:]
    got = checkpointer.restore_latest(first, others=others, convert=convert, move_bad=move_bad,
                                      mismatch=functools.partial(_mismatch, like.params))
    if got is not None and cfg.lora.rank:
        _check_base(cfg, params, got[1], sums)
    return got


def _mismatch(params_like, stored) -> Optional[str]:
    """Why a checkpoint's params (stored: {path: shape}) are another model's than params_like's, or None.
    A LoRA checkpoint may hold the adapters alone: base leaves it lacks are no mismatch, adapters are."""
    if stored is None:
        return None
    prefix = "['params']"
    got = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params_like)[0]}
    for k in sorted(got):
        if k not in want:
            return f"params{k} is not in the config's model"
        if got[k] != want[k]:
            return f"params{k} has shape {got[k]}, the config's model {want[k]}"
    adapters = [k for k in want if "_lora_" in k]
    if got and adapters and not any(k in got for k in adapters):
        return "no LoRA adapters, the config's model has them"
    # (a LoRA checkpoint holds no base leaves; every other leaf the config's model has, it must hold)
    lacking = [k for k in want if k not in got and (k in adapters or not adapters)] if got else []
    if lacking:
        return f"no params{lacking[0]}, which the config's model has"
    return None


def _with_base(cfg: ModelConfig, params, convert, state: TrainState) -> TrainState:
    state = convert(state) if convert else state
    return state.replace(params=lora.join(state.params, lora.split(cfg, params)[1]))


def _check_base(cfg: ModelConfig, params, meta: dict, sums=None):
    saved, legacy = meta.get(BASE_SUMS), False
    if saved is None:  # a checkpoint of an earlier version
        saved, legacy = meta.get("base_sums"), True
    if saved is not None and list(saved) != (sums if sums is not None and not legacy else
                                             base_sums(cfg, params, legacy)):
        raise ConfigError("model_path: the base weights differ from those this run's LoRA checkpoints were "
                          "trained on (per-leaf checksums); resume with the run's own model_path and base_quant")
