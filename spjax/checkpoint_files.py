"""A Hugging Face checkpoint's files: its JSON (a bad line named), its safetensors, single or index-sharded
(a missing shard or a truncated file one line naming it; names saved from the base model, without
'model.', read as transformers' CausalLM reads them; FP8 weights dequantized by their scales), and tensors
copied byte for byte into a new file."""
from __future__ import annotations

import json
import os

import numpy as np

from spjax.tensor_names import CheckpointError, TensorSource


def read_json(path):
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def open_safetensors(path: str):
    """safetensors' handle on `path`; a truncated or corrupt file (an interrupted download) is one line."""
    from safetensors import safe_open
    try:
        return safe_open(path, "np")
    except Exception as e:  # noqa: BLE001 - SafetensorError: "incomplete metadata, file not fully covered", ...
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}): truncated or corrupt? "
                              "download it again") from None


def safetensors_getter(directory: str, open_all: bool = False):
    """A TensorSource over a single or index-sharded safetensors checkpoint (open_all: every file's header
    read now, not as its first tensor is). An FP8 checkpoint's weights (transformers' quant_method 'fp8': float8
    weights beside float32 `weight_scale_inv` multipliers, per tensor or per block) come dequantized to float32,
    their scales out of the names; `quantized`: the names that were."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map", {})
    elif os.path.exists(single):
        with open_safetensors(single) as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        bins = sorted(f for f in os.listdir(directory) if f.startswith("pytorch_model") and f.endswith(".bin"))
        hint = (f" ({bins[0]} is PyTorch's pickle format, which spjax does not read: convert it to safetensors)"
                if bins else "")
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json found{hint}")
    # Saved from the base model (LlamaModel, Qwen2Model: no "model." prefix): transformers' CausalLM loads
    # those names as model.*, and so do we.
    stored = {k: k for k in weight_map}
    if weight_map and not any(k.startswith("model.") for k in weight_map) and "embed_tokens.weight" in weight_map:
        stored = {(k if k.startswith("lm_head.") else "model." + k): k for k in weight_map}
    handles, headers = {}, {}
    scales = {n[:-len("_scale_inv")]: n for n in stored if n.endswith(".weight_scale_inv") and n[:-10] in stored}
    static = {n for n in stored if n.endswith((".activation_scale", ".input_scale"))  # (activations stay unquantized)
              and n.rsplit(".", 1)[0] + ".weight" in scales}
    block = _fp8_block(directory) if scales else None

    def handle(fname):
        path = os.path.join(directory, fname)
        if fname not in handles:
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: file not found (named by the safetensors index)")
            handles[fname] = open_safetensors(path)
        return handles[fname], path

    for fname in sorted(set(weight_map.values())) if open_all else ():
        handle(fname)

    def read(name):
        if name not in stored:
            raise CheckpointError(f"{directory}: tensor {name!r} missing from the checkpoint")
        f, path = handle(weight_map[stored[name]])
        try:
            return f.get_tensor(stored[name])
        except Exception as e:  # noqa: BLE001 - numpy has no bfloat16 or float8: read below
            if any(t in str(e) for t in ("bfloat16", "BF16", "float8")):
                return raw_tensor(path, stored[name], headers)
            raise CheckpointError(f"{path}: tensor {stored[name]!r}: {e}") from None

    def get(name):
        if name in scales:
            return fp8_dequantize(read(name), read(scales[name]), block, f"{directory}: tensor {stored[name]!r}")
        x = read(name)
        if "float8" in x.dtype.name:  # (its values are scaled: cast alone they would be a different model)
            raise CheckpointError(f"{directory}: tensor {stored[name]!r} is {x.dtype.name} without a weight_scale_inv "
                                  "beside it, which spjax does not read")
        return x

    source = TensorSource(get, {n: v for n, v in stored.items() if n not in static and n not in scales.values()})
    source.quantized = frozenset(scales)
    return source


# safetensors dtypes numpy has no name for, read with ml_dtypes' (bfloat16 weights; FP8 checkpoints' float8 ones)
_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def raw_tensor(path, name, headers=None):
    """A bfloat16 or float8 tensor, which safetensors' numpy reader refuses, read from the file's bytes in its
    dtype: one copy on the host (through safetensors' flax reader a bf16 one was four, a device's among them,
    and a float32 one). `headers`: {path: (data start, header)} read before (filled here)."""
    import ml_dtypes
    headers = {} if headers is None else headers
    if path not in headers:
        headers[path] = _header(path)
    base, header = headers[path]
    meta = header[name]
    if meta["dtype"] not in _RAW_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {meta['dtype']}, which spjax does not read")
    dtype = np.dtype(getattr(ml_dtypes, _RAW_DTYPES[meta["dtype"]]))
    start, end = meta["data_offsets"]
    with open(path, "rb") as f:
        f.seek(base + start)
        x = np.fromfile(f, dtype=dtype, count=(end - start) // dtype.itemsize)
    if x.size * dtype.itemsize != end - start:
        raise CheckpointError(f"{path}: truncated in tensor {name!r}")
    return x.reshape(meta["shape"])


def quantization_config(hf: dict) -> dict:
    """A config.json dict's quantization_config ({} for none; a wrapped model's may sit in its text_config)."""
    quant = hf.get("quantization_config") or (hf.get("text_config") or {}).get("quantization_config") or {}
    return quant if isinstance(quant, dict) else {"quant_method": quant}


def _fp8_block(directory: str):
    """quantization_config.weight_block_size of an FP8 checkpoint's config.json, or None: then each scale grid's
    block is the weight's shape over it."""
    path = os.path.join(directory, "config.json")
    quant = quantization_config(read_json(path) if os.path.exists(path) else {})
    return tuple(quant["weight_block_size"]) if quant.get("weight_block_size") else None


def fp8_dequantize(w, scale_inv, block, where: str):
    """float32 w * scale_inv, the scale per tensor (one value) or per block of `block` [rows, cols] (the last
    blocks may be partial: DeepSeek-style grids of ceil(rows / block) scales), as transformers dequantizes."""
    w, scale = np.asarray(w, np.float32), np.asarray(scale_inv, np.float32)
    if scale.size == 1:
        return w * scale.reshape(())
    rows, cols = w.shape[-2:]
    grid = scale.shape[-2:]
    bm, bn = block or (rows // grid[0], cols // grid[1])
    if (-(-rows // bm), -(-cols // bn)) != tuple(grid) or w.shape[:-2] != scale.shape[:-2]:
        raise CheckpointError(f"{where}: weight {list(w.shape)} and its scale grid {list(scale.shape)} do not match "
                              f"blocks of {[bm, bn]}")
    if rows % bm == 0 and cols % bn == 0:  # (whole blocks: a broadcast, no scale array as large as w)
        lead = w.shape[:-2]
        blocks = w.reshape(*lead, grid[0], bm, grid[1], bn) * scale[..., :, None, :, None]
        return blocks.reshape(w.shape)
    return w * np.repeat(np.repeat(scale, bm, axis=-2)[..., :rows, :], bn, axis=-1)[..., :cols]


def _header(path: str) -> tuple:
    """(the first data byte, the header dict) of a safetensors file."""
    import struct
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return 8 + size, json.loads(f.read(size))


def _stored(directory: str, names) -> dict:
    """{name: (file path, its data's first byte, its header entry)} of a safetensors checkpoint's tensors."""
    index = os.path.join(directory, "model.safetensors.index.json")
    weight_map = (read_json(index).get("weight_map", {}) if os.path.exists(index)
                  else dict.fromkeys(names, "model.safetensors"))
    headers, out = {}, {}
    for name in names:
        path = os.path.join(directory, weight_map[name])
        if path not in headers:
            headers[path] = _header(path)
        out[name] = (path, headers[path][0], headers[path][1][name])
    return out


def stored_sizes(directory: str, names) -> dict:
    """{name: bytes} of tensors as a safetensors checkpoint stores them."""
    return {n: end - start for n, (_, _, meta) in _stored(directory, names).items()
            for start, end in [meta["data_offsets"]]}


def copy_tensors(directory: str, names, out_path: str):
    """Tensors of a safetensors checkpoint copied byte for byte (any dtype, one piece at a time) into a new file."""
    import struct
    stored, entries, offset = _stored(directory, names), {}, 0
    for name, (_, _, meta) in stored.items():
        start, end = meta["data_offsets"]
        entries[name] = dict(meta, data_offsets=[offset, offset + end - start])
        offset += end - start
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}).encode()
    header += b" " * (-len(header) % 8)  # (the data 8-byte aligned, as safetensors writes it)
    with open(out_path, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        for name, (path, base, meta) in stored.items():
            start, end = meta["data_offsets"]
            with open(path, "rb") as f:
                f.seek(base + start)
                left = end - start
                while left:  # (in 64 MiB pieces: a vision tower's embedding need not be in memory at once)
                    chunk = f.read(min(left, 64 << 20))
                    if not chunk:
                        raise CheckpointError(f"{path}: truncated in tensor {name!r}")
                    out.write(chunk)
                    left -= len(chunk)
