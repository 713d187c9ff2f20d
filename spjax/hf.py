"""Hugging Face and GGUF checkpoints in, Hugging Face checkpoints out.

Import reads one tensor at a time from disk (safetensors are memory-mapped), turns it into spjax's
layout, and places it with `jax.make_array_from_callback`, so with a mesh each device receives only
its shard and no device ever holds a whole param tree. Export writes a directory that
transformers' AutoModelForCausalLM / AutoTokenizer load.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from spjax.config import ROPE_TYPES, ModelConfig
from spjax.checkpoint_files import read_json, safetensors_getter
from spjax.hf_tokenizer import load_tokenizer, save_tokenizer  # noqa: F401 - spjax.hf.load_tokenizer is public
from spjax.tensor_names import (ARCHITECTURES, HF_ARCHS, CheckpointError, TensorSource,  # noqa: F401
                                check_names, export_arch, params_from_tensors, params_to_tensors)

_ARCH_TO_HF = {v: k for k, v in HF_ARCHS.items()}


# ---------------------------------------------------------------------------------------------
# Configs


def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from a transformers config dict (config.json)."""
    archs = hf.get("architectures") or []
    arch = next((HF_ARCHS[a] for a in archs if a in HF_ARCHS), None)
    if arch is None:
        arch = hf.get("model_type") if hf.get("model_type") in ARCHITECTURES else None
    if arch is None:
        raise CheckpointError(f"{where}: architecture {archs or hf.get('model_type')} is not supported "
                              f"(supported: {', '.join(HF_ARCHS)})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise CheckpointError(f"{where}: required key(s) {', '.join(missing)} missing")
    # transformers 5 nests rope settings in rope_parameters; 4.x used rope_theta + rope_scaling. Where
    # both are present, transformers reads rope_scaling alone (a 4.x-style edit of a 5.x config), its
    # theta from the top level or 10000: so do we.
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if arch == "phi3" and rope_type in ("su", "yarn"):  # Phi3Config's names of longrope in older configs
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{where}: rope scaling {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers reads both as SiLU; spjax's MLP is SwiGLU only
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (spjax's MLP computes silu)")
    partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0 and arch != "phi3":  # (transformers' other families rotate every dim whatever the key says)
        raise CheckpointError(f"{where}: partial_rotary_factor {partial} with {arch}: transformers' {arch} rotates "
                              f"every dimension of a head, so spjax cannot tell which model this is")
    if arch in ("llama", "qwen3"):  # transformers' Mistral and Qwen2 ignore these keys (their biases are fixed)
        for key, what in (("attention_bias", "biases on q/k/v/o_proj"), ("mlp_bias", "biases on the MLP")):
            if hf.get(key) and (arch, key) != ("qwen3", "mlp_bias"):  # (Qwen3's MLP has no bias key)
                raise CheckpointError(f"{where}: {key} is true ({what}), which spjax's {arch} does not implement: "
                                      f"it cannot load this model")
    eos = hf.get("eos_token_id")
    kw = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or (128 if arch == "qwen3" else 0),  # Qwen3Config's default: not D / H
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_type=rope_type, rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        **_rope_scale(rope, rope_type, hf, arch), partial_rotary_factor=partial,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
        sliding_window=_sliding_window(hf, arch, where),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        architecture=arch, bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        pad_token_id=hf.get("pad_token_id"),
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def _rope_scale(rope: dict, rope_type: str, hf: dict, arch: str) -> dict:
    """The scaling fields of rope settings as transformers reads them. The pretraining context is
    the settings' original_max_position_embeddings, else max_position_embeddings (Phi-3: its config's
    top-level key, default 4096). A null YaRN or LongRoPE factor is the context's growth (max /
    original); YaRN's attention factor, when not given, is mscale's ratio when both mscale keys are
    set; else spjax.rope derives it from the factor, as transformers does."""
    max_pos = int(hf.get("max_position_embeddings", 8192))
    original = int(rope.get("original_max_position_embeddings") or max_pos)
    if arch == "phi3":
        original = int(hf.get("original_max_position_embeddings", 4096))
    factor = rope.get("factor")
    if factor is None:
        factor = max_pos / original if rope_type in ("yarn", "longrope") else 1.0
    out = dict(rope_factor=float(factor), rope_original_max_position=original)
    if rope_type == "longrope":
        return dict(out, rope_attention_factor=float(rope.get("attention_factor") or 0.0),
                    rope_short_factor=tuple(map(float, rope.get("short_factor") or ())),
                    rope_long_factor=tuple(map(float, rope.get("long_factor") or ())))
    if rope_type != "yarn":
        return out
    attention, mscale, mscale_all = rope.get("attention_factor"), rope.get("mscale"), rope.get("mscale_all_dim")
    if attention is None and mscale and mscale_all and factor > 1:
        attention = (0.1 * mscale * np.log(factor) + 1) / (0.1 * mscale_all * np.log(factor) + 1)
    return dict(out, rope_beta_fast=float(rope.get("beta_fast") or 32),
                rope_beta_slow=float(rope.get("beta_slow") or 1), rope_attention_factor=float(attention or 0.0),
                rope_truncate=bool(rope.get("truncate", True)))


def _sliding_window(hf: dict, arch: str, where: str):
    """spjax's one window for all layers, as transformers reads the config.

    Mistral windows every layer. Qwen2 and Qwen3 window layer i when use_sliding_window and layer_types[i] is
    'sliding_attention' (any other type is full attention); without layer_types (transformers 4.x,
    and 5.x's default) when i >= max_window_layers. A mix of windowed and full layers, which one
    window cannot represent, is refused.
    """
    window = hf.get("sliding_window", 4096)  # Mistral's and Qwen's config default when the key is absent
    if arch == "mistral":
        return window
    if arch == "phi3":  # every layer, as Mistral; Phi3Config's default is none
        return hf.get("sliding_window")
    if arch not in ("qwen2", "qwen3") or not hf.get("use_sliding_window") or window is None:
        return None
    n, first = hf["num_hidden_layers"], hf.get("max_window_layers", 28)  # 28: transformers' default
    if not isinstance(first, int) and not hf.get("layer_types"):  # null: transformers refuses it too
        raise CheckpointError(f"{where}: max_window_layers is {first!r} with use_sliding_window true: it must be "
                              f"the number of leading layers with full attention (an int)")
    types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    windowed = {t == "sliding_attention" for t in types}
    if len(windowed) > 1:
        why = "layer_types" if hf.get("layer_types") else f"max_window_layers {first}"
        raise CheckpointError(f"{where}: {arch.capitalize()} windows attention (sliding_window {window}) on some "
                              f"layers only ({why}), but spjax windows all layers or none: it cannot load this model")
    return window if windowed == {True} else None


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json dict that transformers 4.x and 5.x both read."""
    cfg = dataclasses.replace(cfg, architecture=export_arch(cfg))
    out = {
        "architectures": [_ARCH_TO_HF[cfg.architecture]], "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": cfg.param_dtype,
        "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": (list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
                         else cfg.eos_token_ids[0] if cfg.eos_token_ids else None),
        "initializer_range": 0.02, "use_cache": True,
    }
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "linear":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    if cfg.rope_type == "yarn":
        rope.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_position,
                    beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
        if cfg.rope_attention_factor > 0:
            rope["attention_factor"] = cfg.rope_attention_factor
    if cfg.rope_type == "longrope":
        rope.update(factor=cfg.rope_factor, short_factor=list(cfg.rope_short_factor),
                    long_factor=list(cfg.rope_long_factor))
        if cfg.rope_attention_factor > 0:
            rope["attention_factor"] = cfg.rope_attention_factor
    if cfg.rotary_dim != cfg.head_dim:
        rope["partial_rotary_factor"] = out["partial_rotary_factor"] = cfg.partial_rotary_factor
    if cfg.rope_type != "default":
        out["rope_scaling"] = dict(rope)
    out["rope_parameters"] = rope
    if cfg.architecture == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    if cfg.architecture in ("mistral", "phi3"):
        out["sliding_window"] = cfg.sliding_window
    if cfg.architecture == "phi3":  # (Phi3Config reads the pretraining context from the top level)
        out["original_max_position_embeddings"] = cfg.rope_original_max_position
    if cfg.architecture == "qwen3":
        out["attention_bias"] = False
    if cfg.architecture in ("qwen2", "qwen3"):  # every layer windowed or none, read alike by transformers 4.x, 5.x
        w = cfg.sliding_window
        out.update(use_sliding_window=w is not None, sliding_window=w, max_window_layers=0 if w else cfg.num_layers,
                   layer_types=["sliding_attention" if w else "full_attention"] * cfg.num_layers)
    return out


# ---------------------------------------------------------------------------------------------
# Files


def load_model_config(path: str, **overrides) -> ModelConfig:
    """The ModelConfig of a HF directory or a .gguf file, without reading its weights."""
    path = os.fspath(path)
    if path.endswith(".gguf"):
        from spjax import gguf_io
        return gguf_io.config_from_gguf(gguf_io.read(path), path, **overrides)
    where = os.path.join(path, "config.json")
    return config_from_hf(_with_generation_eos(read_json(where), path), where, **overrides)


def _with_generation_eos(hf: dict, path: str) -> dict:
    """config.json's keys, its eos_token_id joined with generation_config.json's: instruct models
    (Llama 3, Qwen2.5) keep their end-of-turn ids there, which generate() stops at."""
    gen_path = os.path.join(path, "generation_config.json")
    gen = read_json(gen_path).get("eos_token_id") if os.path.exists(gen_path) else None
    as_list = lambda v: list(v) if isinstance(v, list) else [] if v is None else [v]
    eos = as_list(hf.get("eos_token_id")) + [i for i in as_list(gen) if i not in as_list(hf.get("eos_token_id"))]
    return dict(hf, eos_token_id=eos or None)


def load_pretrained(path: str, mesh=None, **overrides):
    """(cfg, params) from a HF directory or a .gguf file; sharded over `mesh` when given.

    `overrides` set ModelConfig fields (e.g. param_dtype='bfloat16', compute_dtype='bfloat16').
    """
    path = os.fspath(path)
    if path.endswith(".gguf"):
        from spjax import gguf_io
        cfg, params = gguf_io.load_gguf(path, mesh=mesh, **overrides)
        return cfg, with_init_adapter(cfg, params)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory or a .gguf file")
    cfg = load_model_config(path, **overrides)
    get = safetensors_getter(path)
    return cfg, with_init_adapter(cfg, params_from_tensors(cfg, get, path, mesh))


def check_weights(path: str, cfg: ModelConfig):
    """A HF directory's weight files (each one's header) and tensor names against `cfg`, before the data is
    tokenized: a missing shard or tensor, or a truncated file, was said only once the data was ready."""
    if path and os.path.isdir(path):  # (a .gguf's tensors are listed with the header load_model_config read)
        check_names(cfg, safetensors_getter(path, open_all=True), path)


def initial_config(cfg) -> ModelConfig:
    """A run's pi_0's model config (cfg: a spjax.config.Config), without its weights: model_path's, or
    cfg.model's (a random init)."""
    if cfg.model_path:
        return load_model_config(cfg.model_path, **cfg.model_overrides())
    return dataclasses.replace(cfg.model, **cfg.model_overrides())


def load_initial(cfg, mesh) -> tuple:
    """(model config, params born sharded) of a run's pi_0: model_path's weights, or a random init."""
    if cfg.model_path:
        return load_pretrained(cfg.model_path, mesh=mesh, **cfg.model_overrides())
    from spjax import sharding
    model_cfg = initial_config(cfg)
    params = sharding.init_params(model_cfg, jax.random.key(cfg.run.seed), mesh)
    return model_cfg, with_init_adapter(model_cfg, params)


def with_init_adapter(cfg: ModelConfig, params):
    """params with cfg.lora.init_path's PEFT adapter loaded in place of fresh adapters (if set)."""
    if not cfg.lora.init_path:
        return params
    from spjax import lora
    return lora.load_peft(cfg, params, cfg.lora.init_path)


EXPORT_MARK = ".spjax-export"  # in every export: a directory without it is replaced only if empty


def save_pretrained(cfg: ModelConfig, params, out_dir: str, tokenizer=None, dtype=None,
                    max_shard_bytes: int = 4 << 30, replace_any: bool = False, source: str = ""):
    """Write a HF directory (config.json, safetensors, tokenizer) atomically: all or nothing.

    An existing out_dir is replaced only if it is empty or an earlier spjax export (EXPORT_MARK), so
    a mistyped path never deletes a run or a model; replace_any: a run's own export/ and best/.

    Only process 0 writes; every process must call it (params are gathered collectively).
    A LoRA policy is written merged (base + adapter), with the adapter alone in PEFT's layout
    under adapter/ (peft.PeftModel.from_pretrained(<the base>, out_dir + "/adapter")).
    source: the HF directory the model came from: its generation_config.json (a greedy or a sampling
    default, temperature, top_p, ...) is the export's, with bos/eos ids as exported.
    """
    from safetensors.numpy import save_file
    from spjax import artifacts, lora
    adapter = lora.peft_tensors(cfg, params) if cfg.lora.rank else None
    tensors = params_to_tensors(cfg, params)
    if jax.process_index() != 0:
        return out_dir
    if dtype is not None:
        tensors = {k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()}
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):  # e.g. --out naming a model file
        raise CheckpointError(f"{out_dir}: exists and is not a directory, so spjax will not replace it: choose a "
                              "new or empty directory (nothing was written)")
    if (os.path.isdir(out_dir) and os.listdir(out_dir) and not replace_any
            and not os.path.exists(os.path.join(out_dir, EXPORT_MARK))):
        raise CheckpointError(f"{out_dir}: exists and is not a spjax export, so spjax will not replace it: "
                              "choose a new or empty directory (nothing was written)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    artifacts.clear_interrupted(parent, os.path.basename(out_dir))
    # Refused before a byte is written (as checkpoints are): a full disk midway is a slow way to learn it.
    need = sum(a.nbytes for a in tensors.values()) + sum(a.nbytes for a in (adapter or {}).values()) + (8 << 20)
    free = shutil.disk_usage(parent).free
    if free < need:
        import errno
        raise OSError(errno.ENOSPC, f"No space left on device: the export needs {need / 2**20:.1f} MiB, "
                      f"{free / 2**20:.1f} MiB free", parent)
    tmp = artifacts.temp_dir(parent, os.path.basename(out_dir))
    try:
        hf = config_to_hf(dataclasses.replace(cfg, param_dtype=str(jnp.dtype(dtype or cfg.param_dtype))))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        with open(os.path.join(tmp, EXPORT_MARK), "w") as f:
            f.write("written by spjax.save_pretrained; a later export may replace this directory\n")
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(_generation_config(cfg, hf, source), f, indent=2)
        shards, cur, size = [], {}, 0
        for name, arr in tensors.items():
            if cur and size + arr.nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[name] = arr
            size += arr.nbytes
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(a.nbytes for a in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if adapter is not None:
            # its base: the HF directory the run loaded (AutoPeftModelForCausalLM reads it); unknown for a GGUF
            base = os.path.abspath(source) if source and os.path.isdir(source) else ""
            lora.write_peft(cfg, adapter, os.path.join(tmp, "adapter"), base)
        artifacts.umask_modes(tmp)
        if os.path.exists(out_dir):  # replace: move the old one aside first so a crash loses nothing
            old = tmp + ".old"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)  # the old export back in its place
                raise
            shutil.rmtree(old, ignore_errors=True)  # the new export is in place: a leftover is no failure
            if os.path.exists(old):
                print(f"spjax: the export is written; its predecessor could not be removed: {old}", flush=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _generation_config(cfg: ModelConfig, hf: dict, source: str) -> dict:
    """The export's generation_config.json: the source directory's, its bos/eos ids the exported ones."""
    path = os.path.join(source, "generation_config.json") if source and os.path.isdir(source) else ""
    gen = read_json(path) if path and os.path.isfile(path) else {}
    gen.update(bos_token_id=cfg.bos_token_id, eos_token_id=hf["eos_token_id"])
    return {k: v for k, v in gen.items() if v is not None}


def from_transformers(model, mesh=None, **overrides):
    """(cfg, params) from an in-memory transformers PyTorch model (tests use it as an oracle)."""
    hf = model.config.to_dict()
    hf.setdefault("architectures", [type(model).__name__])
    cfg = config_from_hf(hf, f"<{type(model).__name__}>", **overrides)
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    get = TensorSource(lambda name: state[name] if name in state else _missing(name), state)
    return cfg, params_from_tensors(cfg, get, f"<{type(model).__name__}>", mesh)


def _missing(name):
    raise CheckpointError(f"<state_dict>: tensor {name!r} missing")
