"""LoRA policies: which leaves train, merging, and PEFT adapter files in and out.

The policy's params are one tree: the frozen base (optionally quantized, spjax.quant) plus leaves
`<proj>_lora_a` [N, *in, r] and `<proj>_lora_b` [N, r, *out] that model._project applies on the
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

import functools
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from spjax import quant
from spjax.config import ModelConfig
from spjax.tensor_names import PROJ_IN_DIMS, CheckpointError, base_config, export_arch, layer_table, peft_name

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


def describe(cfg: ModelConfig, params) -> str:
    """One line for the run log: trainable and total parameter counts."""
    train, _ = split(cfg, params)
    # The model's parameters, not the stored elements: int4 packs two weights a byte, and the scales
    # of a quantized base are storage, not parameters.
    layers = params["layers"]
    packed = 2 if cfg.base_quant == "int4" else 1
    n = count(train)
    total = (count({k: v for k, v in params.items() if k != "layers"})
             + sum(int(np.prod(v.shape)) * (packed if k in PROJ_IN_DIMS else 1) for k, v in layers.items()
                   if not (k.endswith("_scale") and k[:-len("_scale")] in PROJ_IN_DIMS)))
    if not cfg.lora.rank:
        return f"trainable params: {n:,} (full fine-tuning)"
    return (f"trainable params: {n:,} of {total:,} ({100 * n / total:.3f}%): LoRA r={cfg.lora.rank} "
            f"alpha={cfg.lora.alpha:g} on {','.join(cfg.lora.targets)}; base {cfg.base_quant}")


def merge(cfg: ModelConfig, params):
    """(base cfg, params with W + (alpha / r) A B in the compute dtype): a plain model for loops
    that rerun the weights many times (decode), instead of the adapters' extra matmuls per step."""
    out_cfg = base_config(cfg)
    if not cfg.lora.rank and cfg.base_quant == "none":
        return out_cfg, params
    cdt = jnp.dtype(cfg.compute_dtype)
    layers = dict(params["layers"])
    for leaf, n_in in PROJ_IN_DIMS.items():
        w = layers.pop(leaf)
        if cfg.base_quant != "none":
            w = quant.dequantize(w, layers.pop(f"{leaf}_scale"), cfg.base_quant, n_in, lead=1, dtype=jnp.float32)
        if cfg.lora.rank and leaf in cfg.lora.targets:
            a, b = layers.pop(f"{leaf}_lora_a"), layers.pop(f"{leaf}_lora_b")
            N, r = a.shape[0], a.shape[-1]
            delta = jnp.matmul(a.reshape(N, -1, r), b.reshape(N, r, -1)) * (cfg.lora.alpha / r)
            w = w.astype(jnp.float32) + delta.reshape(w.shape)
        layers[leaf] = w.astype(cdt)
    return out_cfg, {**params, "layers": layers}


def for_sampling(cfg: ModelConfig, params):
    """(cfg, params) the sampler should decode with: merged once per round for a float base, the
    policy as it is (adapter on the fly, int8/int4 read per step) for a quantized one.

    Measured on CPU (bench/lora_sample.py, SmolLM2-135M, r = 16 on every projection): merging made
    decode 1.03-1.19x faster over an fp32 base, but 0.81-0.89x as fast over an int8 one, whose
    merged copy reads 4x the bytes per step. A merged float base costs one dense copy of the model
    for the sampling phase (the adapters' memory saving is in training, where it matters).
    """
    if not cfg.lora.rank or cfg.base_quant != "none":
        return cfg, params
    return base_config(cfg), _merged(cfg, params)


@functools.partial(jax.jit, static_argnums=0)
def _merged(cfg: ModelConfig, params):
    return merge(cfg, params)[1]


# ---------------------------------------------------------------------------------------------
# PEFT adapter directories (adapter_config.json + adapter_model.safetensors)


def peft_exportable(cfg: ModelConfig) -> bool:
    """Whether spjax's adapters are PEFT's for cfg's exported family: not for Phi-3, whose q/k/v and
    gate/up are one fused module each in transformers (one adapter each there, one per part here).
    Said once, as the export then writes the merged model alone."""
    if export_arch(cfg) != "phi3":
        return True
    logging.getLogger(__name__).warning(
        "export: no adapter/ directory: transformers' Phi-3 fuses q/k/v and gate/up, so spjax's per-projection "
        "adapters have no PEFT layout there; the merged model is written")
    return False


def _peft_module(cfg: ModelConfig, target: str) -> str:
    return layer_table(cfg)[target].hf.split(".")[-2]  # q_proj, gate_proj, ...


def peft_tensors(cfg: ModelConfig, params) -> dict:
    """PEFT-named host tensors of the adapters (collective: every process calls it)."""
    from spjax import sharding as shd
    if not cfg.lora.rank:
        raise ValueError("the model has no adapters (lora.rank is 0)")
    tensors, r = {}, cfg.lora.rank
    for t in cfg.lora.targets:
        a = shd.to_host(params["layers"][f"{t}_lora_a"]).astype(np.float32)
        b = shd.to_host(params["layers"][f"{t}_lora_b"]).astype(np.float32)
        for i in range(cfg.num_layers):  # PEFT: lora_A [r, in_features], lora_B [out_features, r]
            tensors[peft_name(cfg, t, i, "A")] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            tensors[peft_name(cfg, t, i, "B")] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return tensors


def write_peft(cfg: ModelConfig, tensors: dict, out_dir: str, base_model: str = "") -> str:
    """Write peft_tensors' output as adapter_config.json + adapter_model.safetensors."""
    from safetensors.numpy import save_file
    os.makedirs(out_dir, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
              "target_modules": sorted(_peft_module(cfg, t) for t in cfg.lora.targets), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "base_model_name_or_path": base_model or None}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def save_peft(cfg: ModelConfig, params, out_dir: str, base_model: str = "") -> str:
    """The adapter alone in PEFT's layout: peft.PeftModel.from_pretrained(hf_base, out_dir) loads it."""
    tensors = peft_tensors(cfg, params)
    if jax.process_index() != 0:
        return out_dir
    return write_peft(cfg, tensors, out_dir, base_model)


def _pattern(patterns: dict, module: str, default):
    """PEFT's per-module override (rank_pattern, alpha_pattern): the first key naming the module's end,
    matched as PEFT matches it (the key one group: 'q_proj|v_proj' names either)."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)


def load_peft(cfg: ModelConfig, params, adapter_dir: str):
    """params with their adapter leaves replaced by a PEFT adapter's (placed like the old leaves)."""
    from safetensors import safe_open
    where = os.path.join(adapter_dir, "adapter_config.json")
    if export_arch(cfg) == "phi3":
        raise CheckpointError(f"{where}: spjax does not read PEFT adapters of Phi-3 models (transformers fuses their "
                              f"q/k/v and gate/up projections, which spjax adapts one by one)")
    if not os.path.exists(where):
        raise CheckpointError(f"{where}: file not found (lora.init_path must be a PEFT adapter directory)")
    with open(where, encoding="utf-8") as f:
        pc = json.load(f)
    bad = {"peft_type": (pc.get("peft_type"), "LORA"), "use_rslora": (bool(pc.get("use_rslora")), False),
           "use_dora": (bool(pc.get("use_dora")), False), "bias": (pc.get("bias", "none"), "none"),
           "fan_in_fan_out": (bool(pc.get("fan_in_fan_out")), False), "r": (pc.get("r"), cfg.lora.rank),
           # Parts of the adapted model beyond the low-rank pairs, which spjax would not read:
           "modules_to_save": (pc.get("modules_to_save") or None, None), "lora_bias": (bool(pc.get("lora_bias")), False),
           "trainable_token_indices": (pc.get("trainable_token_indices") or None, None)}
    # PEFT variants whose forward is not W + (alpha/r)·B·A on every layer of the targets (aLoRA acts only
    # after its invocation tokens, KaSA/QALoRA/BD-LoRA/Arrow/MonteCLoRA change the product): all off.
    bad.update({k: (pc[k], None) for k in ("alora_invocation_tokens", "use_qalora", "layer_replication",
                                            "layers_to_transform", "target_parameters", "use_bdlora",
                                            "arrow_config", "kasa_config", "monteclora_config") if pc.get(k)})
    for field, (got, want) in bad.items():
        if got != want:
            raise CheckpointError(f"{where}: {field} is {got!r}; spjax needs {want!r}"
                                  + (" (set lora.rank to match)" if field == "r" else ""))
    mods = pc.get("target_modules") or []
    want_mods = {_peft_module(cfg, t) for t in cfg.lora.targets}
    if isinstance(mods, str) or set(mods) != want_mods:
        raise CheckpointError(f"{where}: target_modules {mods!r} differ from lora.targets {sorted(want_mods)}")
    # The file's scaling alpha_file / r (per module: PEFT's alpha_pattern) is folded into B, so cfg's
    # alpha reproduces the same policy; spjax's adapters share one rank, so rank_pattern must keep it.
    def rescale(t, i):
        module = layer_table(cfg)[t].hf.format(i=i)[:-len(".weight")]
        rank = _pattern(pc.get("rank_pattern") or {}, module, pc.get("r"))
        if rank != cfg.lora.rank:
            raise CheckpointError(f"{where}: rank_pattern gives {module} rank {rank}; spjax needs "
                                  f"lora.rank={cfg.lora.rank} for every adapter")
        alpha = _pattern(pc.get("alpha_pattern") or {}, module, pc.get("lora_alpha", cfg.lora.alpha))
        return float(alpha) / cfg.lora.alpha
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    layers = dict(params["layers"])
    with safe_open(path, "flax") as f:
        keys = set(f.keys())

        def get(t, i, which):
            name = peft_name(cfg, t, i, which)
            if name not in keys:  # PEFT also writes names with the adapter name ('.default.') left out or in
                alt = name.replace(f".lora_{which}.weight", f".lora_{which}.default.weight")
                if alt not in keys:
                    raise CheckpointError(f"{path}: tensor {name!r} missing")
                name = alt
            return np.asarray(f.get_tensor(name).astype(jnp.float32))

        read = {peft_name(cfg, t, i, w) for t in cfg.lora.targets for i in range(cfg.num_layers) for w in "AB"}
        left = sorted(k for k in keys if k not in read and k.replace(".default.weight", ".weight") not in read)
        if left:
            raise CheckpointError(f"{path}: tensor(s) {', '.join(left[:3])}{' ...' if len(left) > 3 else ''} are not "
                                  "LoRA pairs of lora.targets: spjax would start from another policy than the adapter's")
        for t in cfg.lora.targets:
            old_a, old_b = layers[f"{t}_lora_a"], layers[f"{t}_lora_b"]
            a = np.stack([get(t, i, "A").T for i in range(cfg.num_layers)])
            b = np.stack([get(t, i, "B").T * rescale(t, i) for i in range(cfg.num_layers)])
            try:
                a, b = a.reshape(old_a.shape), b.reshape(old_b.shape)
            except ValueError:
                raise CheckpointError(f"{path}: {t} adapter shapes {a.shape[1:]}, {b.shape[1:]} do not fit "
                                      f"{old_a.shape[1:]}, {old_b.shape[1:]}") from None
            layers[f"{t}_lora_a"] = jax.device_put(a.astype(old_a.dtype), old_a.sharding)
            layers[f"{t}_lora_b"] = jax.device_put(b.astype(old_b.dtype), old_b.sharding)
    return {**params, "layers": layers}


__all__ = ["is_adapter", "split", "join", "adapter_off", "initial", "count", "describe", "merge", "for_sampling",
           "peft_tensors", "write_peft", "save_peft", "load_peft"]
