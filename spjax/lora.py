"""LoRA policies: which leaves train and merging (PEFT adapter files in and out: spjax.peft_io).

The policy's params are one tree: the frozen base (optionally quantized, spjax.quant) plus leaves
`<proj>_lora_a` [N, *in, r] and `<proj>_lora_b` [N, r, *out] that projection.project applies on the
fly. The driver keeps treating `state.params` as the policy (sampling, scoring, eval, checkpoint,
export); only the train step and the optimizer look inside, through `split`/`join`: gradients and
optimizer state exist for the adapter leaves alone. pi_0 is the base with the run's starting adapter
(`initial`): lora.init_path's, else the base itself (fresh adapters start at B = 0).

Why not qwix (Google's JAX LoRA/quantization library): qwix 0.1.8 on jax 0.10.2 fails on this
model's scanned linen Block (its einsum interception sets attributes on a frozen compact module:
flax SetAttributeFrozenModuleError "Can't set q_lora_einsum_str=BLD,Dr,rHk->BLHk"), and its
params (new leaves, QArray values) would still need this module's tree plumbing, PEFT names and
merge for export. Owning the ~60 lines of math keeps one state model (DESIGN principle 6).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from spjax import quant
from spjax.config import EXPERT_TARGETS, ModelConfig
from spjax.projection import lora_delta
from spjax.tensor_names import QUANTIZED, base_config

_ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")


def is_adapter(leaf: str) -> bool:
    return leaf.endswith(_ADAPTER_SUFFIXES)


def split(cfg: ModelConfig, tree):
    """(trainable, frozen) halves of a params-shaped tree (params, shapes or shardings).

    Without LoRA everything trains: (tree, {}). With it, trainable is {'layers': adapters}.
    """
    if not cfg.lora.rank:
        return tree, {}
    layers = tree["layers"]
    train = {"layers": {k: v for k, v in layers.items() if is_adapter(k)}}
    frozen = {**{k: v for k, v in tree.items() if k != "layers"},
              "layers": {k: v for k, v in layers.items() if not is_adapter(k)}}
    return train, frozen


def join(train, frozen):
    """Inverse of split."""
    if not frozen:
        return train
    return {**frozen, "layers": {**frozen["layers"], **train["layers"]}}


def adapter_off(cfg: ModelConfig, params):
    """pi_0 of a LoRA policy: the same tree with every B zeroed (the base alone; same shapes and
    shardings, so the policy's compiled programs serve it); params unchanged without LoRA."""
    if not cfg.lora.rank:
        return params
    return {**params, "layers": {k: (jnp.zeros_like(v) if k.endswith("_lora_b") else v)
                                 for k, v in params["layers"].items()}}


def initial(cfg: ModelConfig, params):
    """pi_0 of a LoRA policy: the same frozen base (shared, not copied) with the adapter the run started
    from: lora.init_path's, read again as the run's start read it (the same file on every process), or
    the fresh one's effect (B = 0: the base alone). Only the small adapter leaves are new."""
    if cfg.lora.rank and cfg.lora.init_path:
        return load_peft(cfg, params, cfg.lora.init_path)
    return adapter_off(cfg, params)


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def model_params(cfg: ModelConfig, params) -> int:
    """The model's parameter count (of params or their shapes), not its stored elements: int4 packs two
    weights a byte, and the scales of a quantized base are storage, not parameters."""
    packed = 2 if cfg.base_quant == "int4" else 1
    return (count({k: v for k, v in params.items() if k != "layers"})
            + sum(int(np.prod(v.shape)) * (packed if k in QUANTIZED else 1) for k, v in params["layers"].items()
                  if not (k.endswith("_scale") and k[:-len("_scale")] in QUANTIZED)))


def describe(cfg: ModelConfig, params) -> str:
    """One line for the run log: trainable and total parameter counts."""
    n = count(split(cfg, params)[0])
    if not cfg.lora.rank:
        return f"trainable params: {n:,} (full fine-tuning)"
    total = model_params(cfg, params)
    experts = f" (experts r={cfg.lora.expert_rank})" if cfg.lora.expert_rank else ""
    return (f"trainable params: {n:,} of {total:,} ({100 * n / total:.3f}%): LoRA r={cfg.lora.rank}{experts} "
            f"alpha={cfg.lora.alpha:g} on {','.join(cfg.lora.targets)}; base {cfg.base_quant}")


def merge(cfg: ModelConfig, params):
    """(base cfg, params with W + (alpha / r) A B in the compute dtype): a plain model for loops
    that rerun the weights many times (decode), instead of the adapters' extra matmuls per step."""
    out_cfg = base_config(cfg)
    if not cfg.lora.rank and cfg.base_quant == "none":
        return out_cfg, params
    cdt = jnp.dtype(cfg.compute_dtype)
    layers = dict(params["layers"])
    for leaf, (lead, n_in) in QUANTIZED.items():
        if leaf not in layers:  # (a mixture of experts: no dense MLP projections; a dense model: no experts)
            continue
        w = layers.pop(leaf)
        if cfg.base_quant != "none":
            w = quant.dequantize(w, layers.pop(f"{leaf}_scale"), cfg.base_quant, n_in, 1 + lead, dtype=jnp.float32)
        if cfg.lora.rank and leaf in cfg.lora.targets:
            a, b = layers.pop(f"{leaf}_lora_a"), layers.pop(f"{leaf}_lora_b")
            delta = lora_delta(a, b, cfg.lora.scale_of(leaf), batch=1 + lead)  # (per layer, per expert)
            w = w.astype(jnp.float32) + delta.reshape(w.shape)
        layers[leaf] = w.astype(cdt)
    return out_cfg, {**params, "layers": layers}


def for_sampling(cfg: ModelConfig, params):
    """(cfg, params) the sampler should decode with: merged once per round for a float base, the
    policy as it is (adapter on the fly, int8/int4 read per step) for a quantized one. A mixture's
    expert adapters stay on the fly in either case: merged, they would be a second copy of the experts,
    most of such a model (the returned cfg then adapts them alone).

    Measured on CPU (bench/lora_sample.py, SmolLM2-135M, r = 16 on every projection): merging made
    decode 1.03-1.19x faster over an fp32 base, but 0.81-0.89x as fast over an int8 one, whose
    merged copy reads 4x the bytes per step. A merged float base costs a dense copy of the adapted
    projections for the sampling phase (the adapters' memory saving is in training, where it matters).
    """
    out_cfg = sampling_config(cfg)
    if out_cfg is cfg:
        return cfg, params
    shared = shared_for_sampling(cfg, params)
    return out_cfg, {**shared, "layers": {**shared["layers"], **_merged_targets(cfg, params)}}


def _merged(cfg: ModelConfig) -> tuple:
    return tuple(t for t in cfg.lora.targets if t not in EXPERT_TARGETS)


def _adapting(cfg: ModelConfig, targets: tuple) -> ModelConfig:
    experts = cfg.lora.expert_rank if set(targets) & set(EXPERT_TARGETS) else 0  # (else it would adapt nothing)
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, targets=targets, init_path="",
                                                             expert_rank=experts))


def sampling_config(cfg: ModelConfig) -> ModelConfig:
    """The model config for_sampling's params are decoded with (cfg itself where it merges nothing)."""
    if not cfg.lora.rank or cfg.base_quant != "none" or not _merged(cfg):
        return cfg
    kept = tuple(t for t in cfg.lora.targets if t in EXPERT_TARGETS)
    return _adapting(cfg, kept) if kept else base_config(cfg)


def shared_for_sampling(cfg: ModelConfig, params) -> dict:
    """The leaves of params that for_sampling's tree holds as they are (the policy's own arrays, not copies):
    all but the merged targets and their adapters."""
    merged = _merged(cfg) if sampling_config(cfg) is not cfg else ()
    gone = set(merged) | {f"{t}_lora_{x}" for t in merged for x in "ab"}
    return {**params, "layers": {leaf: w for leaf, w in params["layers"].items() if leaf not in gone}}


@functools.partial(jax.jit, static_argnums=0)
def _merged_targets(cfg: ModelConfig, params):
    # Only the merged projections: a jit's output is a copy even of an input it returns unchanged, and the
    # rest (the embedding, norms, a mixture of experts' experts: most of such a model) need none.
    merged = _merged(cfg)
    layers = merge(_adapting(cfg, merged), params)[1]["layers"]
    return {leaf: layers[leaf] for leaf in merged}


# ---------------------------------------------------------------------------------------------
# PEFT adapter directories: spjax.peft_io (re-exported: lora.save_peft, lora.load_peft, ...)
from spjax.peft_io import load_peft, peft_tensors, save_peft, write_peft  # noqa: E402


__all__ = ["is_adapter", "split", "join", "adapter_off", "initial", "count", "model_params", "describe", "merge",
           "for_sampling", "sampling_config", "peft_tensors", "write_peft", "save_peft", "load_peft"]
