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

from spjax.config import ModelConfig
from spjax.checkpoint_files import copy_tensors, read_json, safetensors_getter, stored_sizes
from spjax.hf_wrapped import copy_files, export_parts, text_config, text_tensors, wrapper
from spjax.hf_config import config_from_hf, config_to_hf  # noqa: F401 - public as spjax.hf.config_*
from spjax.hf_tokenizer import load_tokenizer, save_tokenizer  # noqa: F401 - spjax.hf.load_tokenizer is public
from spjax.tensor_names import (HF_ARCHS, CheckpointError, TensorSource,  # noqa: F401 (public names)
                                check_names, drain, host_pieces, params_from_tensors, params_to_tensors,
                                tensors_bytes)

# ---------------------------------------------------------------------------------------------
# Files


def load_model_config(path: str, **overrides) -> ModelConfig:
    """The ModelConfig of a HF directory or a .gguf file, without reading its weights."""
    path = os.fspath(path)
    if path.endswith(".gguf"):
        from spjax import gguf_io
        return gguf_io.config_from_gguf(gguf_io.read(path), path, **overrides)
    where = os.path.join(path, "config.json")
    hf = read_json(where)
    if wrapper(hf):  # a multimodal model: its language model's config (spjax.hf_wrapped), tied as its files say
        try:
            names = safetensors_getter(path).names
        except CheckpointError:  # (config.json alone: compile_check reads the shapes only)
            names = None
        hf = text_config(hf, where, names)
    return config_from_hf(_with_generation_eos(hf, path), where, **overrides)


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
    get = text_tensors(safetensors_getter(path))
    return cfg, with_init_adapter(cfg, params_from_tensors(cfg, get, path, mesh))


def check_weights(path: str, cfg: ModelConfig):
    """A HF directory's weight files (each one's header) and tensor names against `cfg`, before the data is
    tokenized: a missing shard or tensor, or a truncated file, was said only once the data was ready."""
    if path and os.path.isdir(path):  # (a .gguf's tensors are listed with the header load_model_config read)
        check_names(cfg, text_tensors(safetensors_getter(path, open_all=True)), path)


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

    Only process 0 writes; every process must call it (params are gathered collectively, a layer at a time
    as the tensors are written; where process 0 fails, it still takes its part in the rest before raising).
    A LoRA policy is written merged (base + adapter), with the adapter alone in PEFT's layout
    under adapter/ (peft.PeftModel.from_pretrained(<the base>, out_dir + "/adapter")).
    source: the HF directory the model came from: its generation_config.json (a greedy or a sampling
    default, temperature, top_p, ...) is the export's, with bos/eos ids as exported. A multimodal source's
    export is that model again, its language model as trained (spjax.hf_wrapped).
    """
    from spjax import lora
    adapter = lora.peft_tensors(cfg, params) if cfg.lora.rank else None
    pieces = host_pieces(params)  # (gathered as taken: every process takes every piece)
    if jax.process_index() != 0:
        drain(pieces)
        return out_dir
    try:
        return _save(cfg, params_to_tensors(cfg, params, dtype, pieces), adapter, out_dir, tokenizer, dtype,
                     max_shard_bytes, replace_any, source)
    except Exception:
        drain(pieces)  # the other processes' gathers still need this one's part: they would wait in them
        raise


def _save(cfg: ModelConfig, tensors, adapter, out_dir: str, tokenizer, dtype, max_shard_bytes: int,
          replace_any: bool, source: str) -> str:
    """save_pretrained on process 0: (name, tensor) pairs in, the directory out."""
    from spjax import artifacts, lora
    dtype = jnp.dtype(dtype or cfg.param_dtype)
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
    text_hf = hf = config_to_hf(dataclasses.replace(cfg, param_dtype=str(dtype)))
    wrapped = export_parts(source, hf)  # (a multimodal source: this model again, spjax.hf_wrapped)
    hf, rename, carried = wrapped or (hf, None, [])
    carried_bytes = sum(stored_sizes(source, carried).values()) if carried else 0
    # Refused before a byte is written (as checkpoints are): a full disk midway is a slow way to learn it.
    total = tensors_bytes(cfg, dtype) + carried_bytes
    need = total + sum(a.nbytes for a in (adapter or {}).values()) + (8 << 20)
    free = shutil.disk_usage(parent).free
    if free < need:
        import errno
        raise OSError(errno.ENOSPC, f"No space left on device: the export needs {need / 2**20:.1f} MiB, "
                      f"{free / 2**20:.1f} MiB free", parent)
    tmp = artifacts.temp_dir(parent, os.path.basename(out_dir))
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        with open(os.path.join(tmp, EXPORT_MARK), "w") as f:
            f.write("written by spjax.save_pretrained; a later export may replace this directory\n")
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(_generation_config(cfg, text_hf, source), f, indent=2)
        shards = _write_shards(tmp, tensors, max_shard_bytes, rename)
        n = len(shards) + bool(carried)  # (a multimodal source's other tensors: a shard of their own, last)
        if n == 1:
            os.rename(shards[0][0], os.path.join(tmp, "model.safetensors"))
        else:
            weight_map, name = {}, lambda i: f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            for i, (path, names) in enumerate(shards):
                os.rename(path, os.path.join(tmp, name(i)))
                weight_map.update(dict.fromkeys(names, name(i)))
            if carried:
                copy_tensors(source, carried, os.path.join(tmp, name(n - 1)))
                weight_map.update(dict.fromkeys(carried, name(n - 1)))
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if wrapped:
            copy_files(source, tmp)
        if adapter is not None:
            # its base: the HF directory the run loaded (AutoPeftModelForCausalLM reads it); unknown for a GGUF
            base = os.path.abspath(source) if source and os.path.isdir(source) else ""
            lora.write_peft(cfg, adapter, os.path.join(tmp, "adapter"), base, wrapped=wrapped is not None)
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


def _write_shards(tmp: str, tensors, max_shard_bytes: int, rename=None) -> list:
    """(file, its tensor names) of each shard written from (name, tensor) pairs as they come: one shard in
    memory at a time. Files are named part-N here; the caller names them once all are counted."""
    from safetensors.numpy import save_file
    shards, cur, size = [], {}, 0

    def flush():
        path = os.path.join(tmp, f"part-{len(shards):05d}.safetensors")
        save_file(cur, path, metadata={"format": "pt"})
        shards.append((path, list(cur)))

    for name, arr in tensors:
        if cur and size + arr.nbytes > max_shard_bytes:
            flush()
            cur, size = {}, 0
        cur[rename(name) if rename else name] = arr
        size += arr.nbytes
        del arr
        if size >= max_shard_bytes:  # full (an embedding alone): written now, not held while the next is made
            flush()
            cur, size = {}, 0
    if cur or not shards:
        flush()
    return shards


def _generation_config(cfg: ModelConfig, hf: dict, source: str) -> dict:
    """The export's generation_config.json: the source directory's, its bos/eos ids the exported ones."""
    path = os.path.join(source, "generation_config.json") if source and os.path.isdir(source) else ""
    gen = read_json(path) if path and os.path.isfile(path) else {}
    gen.update(bos_token_id=cfg.bos_token_id, eos_token_id=hf["eos_token_id"])
    return {k: v for k, v in gen.items() if v is not None}


def from_transformers(model, mesh=None, **overrides):
    """(cfg, params) from an in-memory transformers PyTorch model (tests use it as an oracle)."""
    hf = model.config.to_dict()
    hf["architectures"] = hf.get("architectures") or [type(model).__name__]
    cfg = config_from_hf(hf, f"<{type(model).__name__}>", **overrides)
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    get = text_tensors(TensorSource(lambda name: state[name] if name in state else _missing(name), state))
    return cfg, params_from_tensors(cfg, get, f"<{type(model).__name__}>", mesh)


def _missing(name):
    raise CheckpointError(f"<state_dict>: tensor {name!r} missing")
