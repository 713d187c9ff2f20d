"""transformers' config.json dicts to ModelConfig and back, as transformers 4.x and 5.x read them.

Every family's quirks live here: where a key sits (rope settings nested in 5.x's rope_parameters,
Gemma 3's per layer type), which defaults a missing key takes (each family's config class), and what
spjax cannot compute (refused in one line naming the file and key).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spjax.checkpoint_files import quantization_config
from spjax.config import ROPE_TYPES, ModelConfig
from spjax.config_checks import export_arch
from spjax.hf_wrapped import WRAPPERS, text_config
from spjax.tensor_names import ARCHITECTURES, HF_ARCHS, CheckpointError

_ARCH_TO_HF = {v: k for k, v in HF_ARCHS.items()}
_MODEL_TYPES = {"gemma3": "gemma3_text"}  # where transformers' model_type is not spjax's architecture name
_HEAD_DIMS = {"qwen3": 128, "qwen3_moe": 128, "gemma2": 256, "gemma3": 256, "ministral3": 128}  # where not D / H
_THETAS = {"gemma3": 1e6, "smollm3": 2e6}  # config classes' rope theta where a config omits it, if not 10000
_EPS = {"phi3": 1e-5, "mixtral": 1e-5, "olmoe": 1e-5, "olmo2": 1e-5, "olmo3": 1e-5, "ministral3": 1e-5}  # if not 1e-6
# Ministral3Config's rope settings where a config gives none: YaRN to 16 times 16384 positions, and Llama 4's
# query scale past each 16384 of them
_MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}


def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from a transformers config dict (config.json; a multimodal model's: its language model's)."""
    quant = quantization_config(hf)
    method = quant.get("quant_method", "?") if quant else None
    # FP8 weights are read dequantized (spjax.checkpoint_files); other methods' packed weights would fail as
    # tensors of odd shapes or names
    if method not in (None, "fp8"):
        raise CheckpointError(f"{where}: quantization_config {method!r}: a quantized checkpoint, whose weights spjax "
                              "does not read (it reads FP8 ones): load the unquantized (bf16) release; "
                              "model.base_quant=int8/int4 quantizes a LoRA run's frozen base itself")
    hf = text_config(hf, where)
    archs = hf.get("architectures") or []
    arch = next((HF_ARCHS[a] for a in archs if a in HF_ARCHS), None)
    if arch is None:
        model_type = {v: k for k, v in _MODEL_TYPES.items()}.get(hf.get("model_type"), hf.get("model_type"))
        arch = model_type if model_type in ARCHITECTURES else None
    if arch is None:
        raise CheckpointError(f"{where}: architecture {archs or hf.get('model_type')} is not supported "
                              f"(supported: {', '.join([*HF_ARCHS, *WRAPPERS])})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise CheckpointError(f"{where}: required key(s) {', '.join(missing)} missing")
    # transformers 5 nests rope settings in rope_parameters; 4.x used rope_theta + rope_scaling. Where
    # both are present, transformers reads rope_scaling alone (a 4.x-style edit of a 5.x config), its
    # theta from the top level or 10000: so do we.
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or (_MINISTRAL3_ROPE if arch == "ministral3" else {}))
    gemma = _gemma(hf, arch, where) if arch in ("gemma2", "gemma3") else {}
    by_type = _rope_by_layer_type(hf, arch, where) if arch in ("gemma3", "olmo3") else {}
    rope = by_type.pop("rope", rope)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if arch == "phi3" and rope_type in ("su", "yarn"):  # Phi3Config's names of longrope in older configs
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{where}: rope scaling {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish") and not gemma:  # transformers reads both as SiLU; spjax's MLP is SwiGLU here
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (spjax's {arch} MLP computes silu)")
    partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0 and arch != "phi3":  # (transformers' other families rotate every dim whatever the key says)
        raise CheckpointError(f"{where}: partial_rotary_factor {partial} with {arch}: transformers' {arch} rotates "
                              f"every dimension of a head, so spjax cannot tell which model this is")
    # (transformers' Mistral and Qwen2 ignore these keys: their biases are fixed)
    if arch in ("llama", "qwen3", "qwen3_moe", "olmoe", "olmo2", "olmo3", "smollm3", "granite"):
        for key, what in (("attention_bias", "biases on q/k/v/o_proj"), ("mlp_bias", "biases on the MLP")):
            if hf.get(key) and (arch, key) not in (("qwen3", "mlp_bias"), ("qwen3_moe", "mlp_bias")):  # (no such key)
                raise CheckpointError(f"{where}: {key} is true ({what}), which spjax's {arch} does not implement: "
                                      f"it cannot load this model")
    eos = hf.get("eos_token_id")
    kw = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or _HEAD_DIMS.get(arch, 0),  # the families' defaults: not D / H
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", _THETAS.get(arch, 10000.0)))),
        rope_type=rope_type, rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        **_rope_scale(rope, rope_type, hf, arch), partial_rotary_factor=partial,
        rms_norm_eps=float(hf.get("rms_norm_eps", _EPS.get(arch, 1e-6))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", arch in ("gemma2", "gemma3", "smollm3"))),
        qkv_bias=arch in ("qwen2", "qwen2_moe"),
        qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3", "olmoe", "olmo2", "olmo3"),
        qk_norm_full=arch in ("olmoe", "olmo2", "olmo3"),
        **_windows(hf, arch, where), **gemma, **by_type, **_nope(hf, arch, where),
        max_position_embeddings=_max_positions(hf),
        architecture=arch, bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        pad_token_id=hf.get("pad_token_id"),
    )
    kw.update(_experts(hf, arch, where))
    if arch == "granite":  # (GraniteConfig's defaults: 1, scores included: its attention_multiplier replaces 1/sqrt(d))
        kw.update({k: float(hf.get(k, 1.0)) for k in ("embedding_multiplier", "attention_multiplier",
                                                        "residual_multiplier", "logits_scaling")})
    if rope.get("llama_4_scaling_beta") and arch == "ministral3":  # (scaled past each original context)
        if not rope.get("original_max_position_embeddings"):
            raise CheckpointError(f"{where}: llama_4_scaling_beta without original_max_position_embeddings in the "
                                  "rope settings: transformers' Ministral 3 needs both")
        kw["query_scale_beta"] = float(rope["llama_4_scaling_beta"])
    kw.update(overrides)
    return ModelConfig(**kw)


def _max_positions(hf: dict) -> int:
    """max_position_embeddings, ModelConfig's default when a config omits it (one default for the
    model's length limit and the rope scaling's pretraining context)."""
    return int(hf.get("max_position_embeddings", ModelConfig.max_position_embeddings))


def _rope_scale(rope: dict, rope_type: str, hf: dict, arch: str) -> dict:
    """The scaling fields of rope settings as transformers reads them. The pretraining context is
    the settings' original_max_position_embeddings, else max_position_embeddings (Phi-3: its config's
    top-level key, default 4096). A null YaRN or LongRoPE factor is the context's growth (max /
    original); YaRN's attention factor, when not given, is mscale's ratio when both mscale keys are
    set; else spjax.rope derives it from the factor, as transformers does."""
    max_pos = _max_positions(hf)
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


def _windows(hf: dict, arch: str, where: str) -> dict:
    """sliding_window and layer_types as transformers reads the config (layer_types only for a mix).

    Mistral and Phi-3 window every layer. Gemma and OLMo 3 window layer i when layer_types[i] is
    'sliding_attention', by default every other layer from the first (Gemma 2), five of every six (Gemma 3's
    sliding_window_pattern) or three of every four (OLMo 3). SmolLM3 windows layer i when use_sliding_window
    and layer_types[i] say so, by default its NoPE layers. Qwen2 and Qwen3 window layer i when use_sliding_window and layer_types[i]
    is 'sliding_attention'; without layer_types (transformers 4.x, and 5.x's default) when
    i >= max_window_layers.
    """
    window, n = hf.get("sliding_window", 4096), hf["num_hidden_layers"]  # 4096: the families' default
    if arch == "mistral":
        return dict(sliding_window=window)
    if arch in ("phi3", "mixtral", "ministral3"):  # every layer, as Mistral; their config classes' default is none
        return dict(sliding_window=hf.get("sliding_window"))
    if arch in ("gemma2", "gemma3", "olmo3"):
        every = {"gemma2": 2, "olmo3": 4}.get(arch) or int(hf.get("sliding_window_pattern") or 6)
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % every else "full_attention"
                                          for i in range(n)]
    elif arch == "smollm3":  # windows where use_sliding_window and layer_types say, by default on the NoPE layers
        on = bool(hf.get("use_sliding_window")) and hf.get("sliding_window") is not None
        nope = _nope(hf, arch, where)["nope_layers"]
        types = hf.get("layer_types") or ["sliding_attention" if on and i in nope else "full_attention"
                                          for i in range(n)]
        if not on and "sliding_attention" in types:  # (transformers' attention kernels disagree on such a model)
            raise CheckpointError(f"{where}: layer_types names sliding_attention layers, but use_sliding_window is "
                                  f"{hf.get('use_sliding_window')} and sliding_window {hf.get('sliding_window')}: set both "
                                  "or name no sliding layers")
        window = hf.get("sliding_window")
    elif arch not in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe") or not hf.get("use_sliding_window") or window is None:
        return dict(sliding_window=None)
    elif arch == "qwen2_moe" and not hf.get("layer_types"):
        # (Qwen2MoeConfig 5.x windows the odd layers below max_window_layers, Qwen2's rule the layers from it on)
        raise CheckpointError(f"{where}: use_sliding_window is true without layer_types: transformers versions "
                              "window different layers of such a Qwen2-MoE; name them in layer_types")
    else:
        first = hf.get("max_window_layers", 28)  # 28: transformers' default
        if not isinstance(first, int) and not hf.get("layer_types"):  # null: transformers refuses it too
            raise CheckpointError(f"{where}: max_window_layers is {first!r} with use_sliding_window true: it must "
                                  f"be the number of leading layers with full attention (an int)")
        types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    windowed = {t == "sliding_attention" for t in types}
    if window is None or windowed == {False}:
        return dict(sliding_window=None)
    return dict(sliding_window=window, layer_types=() if windowed == {True} else tuple(types))


def _experts(hf: dict, arch: str, where: str) -> dict:
    """A mixture of experts' settings (spjax.moe), with their config classes' defaults; {} for a dense model.
    Mixtral's experts are intermediate_size wide, Qwen2/3-MoE's moe_intermediate_size (their intermediate_size
    is the width of dense layers, which spjax refuses: every layer must be sparse, as released)."""
    if arch == "mixtral":
        return dict(num_experts=int(hf.get("num_local_experts", 8)), experts_per_token=int(hf.get("num_experts_per_tok", 2)))
    if arch == "olmoe":  # (OlmoeConfig's defaults: OLMoE-1B-7B's; its experts are intermediate_size wide)
        if hf.get("clip_qkv") is not None:
            raise CheckpointError(f"{where}: clip_qkv {hf['clip_qkv']}: clamping q, k and v is not implemented")
        return dict(num_experts=int(hf.get("num_experts", 64)), experts_per_token=int(hf.get("num_experts_per_tok", 8)),
                    norm_topk=bool(hf.get("norm_topk_prob", False)))
    if arch not in ("qwen2_moe", "qwen3_moe"):
        return {}
    if arch == "qwen2_moe" and not hf.get("qkv_bias", True):
        raise CheckpointError(f"{where}: qkv_bias is false, which spjax's qwen2_moe does not implement (transformers "
                              "4.x adds the biases whatever it says)")
    dense = sorted(set(hf.get("mlp_only_layers") or []) | {
        i for i in range(hf["num_hidden_layers"]) if (i + 1) % int(hf.get("decoder_sparse_step", 1) or 1)})
    if dense:
        raise CheckpointError(f"{where}: layers {dense[:8]} have a dense MLP (mlp_only_layers, decoder_sparse_step), "
                              f"which spjax's {arch} does not implement: every layer must be a mixture of experts")
    if arch == "qwen2_moe":  # (Qwen2MoeConfig's defaults: Qwen1.5-MoE-A2.7B's)
        return dict(num_experts=int(hf.get("num_experts", 60)), experts_per_token=int(hf.get("num_experts_per_tok", 4)),
                    norm_topk=bool(hf.get("norm_topk_prob", False)),
                    intermediate_size=int(hf.get("moe_intermediate_size", 1408)),
                    shared_expert_size=int(hf.get("shared_expert_intermediate_size", 5632)))
    experts = hf.get("num_experts", hf.get("num_local_experts", 128))  # (transformers 5 writes the second name)
    return dict(num_experts=int(experts), experts_per_token=int(hf.get("num_experts_per_tok", 8)),
                norm_topk=bool(hf.get("norm_topk_prob", False)), intermediate_size=int(hf.get("moe_intermediate_size", 768)))


def _gemma(hf: dict, arch: str, where: str) -> dict:
    """Gemma 2/3's settings, with their config classes' defaults, and the full layers' rope settings
    ("rope"): Gemma 3's rope_parameters in transformers 5 hold one set per layer type."""
    act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise CheckpointError(f"{where}: hidden_activation {act!r} is not supported (spjax's {arch} computes "
                              f"gelu_pytorch_tanh)")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(key):
            raise CheckpointError(f"{where}: {key} is true, which spjax's {arch} does not implement: it cannot "
                                  f"load this model")
    out = dict(query_scale=float(hf.get("query_pre_attn_scalar", 256)))
    caps = {"final_logit_softcapping": "final_softcap", "attn_logit_softcapping": "attn_softcap"}
    for key, field in caps.items():
        if arch == "gemma2" or field == "final_softcap":  # (transformers' Gemma 3 never caps scores)
            out[field] = float(hf.get(key, {"gemma2": 50.0 if field == "attn_softcap" else 30.0}.get(arch)) or 0)
    return out


def _rope_by_layer_type(hf: dict, arch: str, where: str) -> dict:
    """Gemma 3's and OLMo 3's rope: the full layers' settings ("rope") and the windowed layers' theta, whose
    rope is unscaled. transformers 5 holds a set per layer type in rope_parameters (a rope_scaling key updates
    the full layers', as 5.x reads it); 4.x, the full layers' as any model's, and the windowed layers' theta as
    rope_local_base_freq (Gemma 3) or the one rope_theta (OLMo 3: its rope_scaling scales the full layers alone).
    An OLMo 3 whose windowed layers rotate as its full ones gets no rope_local_theta (one rope for all)."""
    params = hf.get("rope_parameters") or {}
    out = {}
    if "full_attention" in params:
        out["rope"] = dict(params["full_attention"], **(hf.get("rope_scaling") or {}))
    full = out.get("rope") or dict(hf.get("rope_scaling") or params)
    theta = full.get("rope_theta", hf.get("rope_theta", _THETAS.get(arch)))
    if theta is None and arch == "olmo3":
        raise CheckpointError(f"{where}: rope_theta missing: transformers 4.x reads OLMo 3's as 10000, 5.x as 500000; "
                              "name it")
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    if local.get("rope_type", "default") != "default":
        raise CheckpointError(f"{where}: rope_parameters.sliding_attention is {local.get('rope_type')!r}: "
                              f"spjax's {arch} rotates its windowed layers by default rope")
    local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0) if arch == "gemma3" else theta))
    if arch == "gemma3" or full.get("rope_type", full.get("type", "default")) != "default" or local_theta != float(theta):
        out["rope_local_theta"] = local_theta
    return out


def _nope(hf: dict, arch: str, where: str) -> dict:
    """SmolLM3's NoPE layers: no_rope_layers holds a 1 for each layer that rotates, by default all but every
    no_rope_layer_interval-th (4th)."""
    if arch != "smollm3":
        return {}
    n, every = hf["num_hidden_layers"], int(hf.get("no_rope_layer_interval") or 4)
    flags = hf.get("no_rope_layers")
    flags = [int((i + 1) % every != 0) for i in range(n)] if flags is None else flags
    if len(flags) < n:
        raise CheckpointError(f"{where}: no_rope_layers has {len(flags)} entries for {n} layers")
    return dict(nope_layers=tuple(i for i in range(n) if not flags[i]))


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
    if cfg.rope_type in ("linear", "dynamic"):
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
    if cfg.query_scale_beta:
        rope.update(llama_4_scaling_beta=cfg.query_scale_beta,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    if cfg.rope_type != "default":
        out["rope_scaling"] = dict(rope)
    out["rope_parameters"] = rope
    if cfg.architecture == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    if cfg.architecture in ("mistral", "phi3", "ministral3"):
        out["sliding_window"] = cfg.sliding_window
    if cfg.architecture == "phi3":  # (Phi3Config reads the pretraining context from the top level)
        out["original_max_position_embeddings"] = cfg.rope_original_max_position
    if cfg.architecture in ("qwen3", "qwen3_moe"):
        out["attention_bias"] = False
    if cfg.architecture == "mixtral":
        out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                   sliding_window=cfg.sliding_window)
    if cfg.architecture in ("qwen2_moe", "qwen3_moe"):  # (intermediate_size: dense layers' width; there are none)
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token, norm_topk_prob=cfg.norm_topk,
                   moe_intermediate_size=cfg.intermediate_size, decoder_sparse_step=1, mlp_only_layers=[])
    if cfg.architecture == "qwen2_moe":
        out.update(shared_expert_intermediate_size=cfg.shared_expert_size, qkv_bias=True)
    if cfg.architecture in ("olmo2", "olmo3", "smollm3", "granite"):
        out.update(attention_bias=False, mlp_bias=False)
    if cfg.architecture == "granite":
        out.update(embedding_multiplier=cfg.embedding_multiplier, residual_multiplier=cfg.residual_multiplier,
                   logits_scaling=cfg.logits_scaling,
                   attention_multiplier=cfg.attention_multiplier or (cfg.query_scale or cfg.head_dim) ** -0.5)
    if cfg.architecture == "olmoe":
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token, norm_topk_prob=cfg.norm_topk,
                   clip_qkv=None, attention_bias=False)
    types = ["sliding_attention" if w else "full_attention" for w in cfg.windowed]
    if cfg.architecture in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe"):
        # max_window_layers for transformers 4.x, which reads no layer_types: the leading full layers (a
        # mix other than full layers first, then windowed ones, is read as that by 4.x alone)
        lead = next((i for i, w in enumerate(cfg.windowed) if w), cfg.num_layers)
        out.update(use_sliding_window=any(cfg.windowed), sliding_window=cfg.sliding_window,
                   max_window_layers=lead, layer_types=types)
    if cfg.gemma:
        out.update(model_type=_MODEL_TYPES.get(cfg.architecture, cfg.architecture), hidden_act="gelu_pytorch_tanh",
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=_int_if_whole(cfg.query_scale or cfg.head_dim),
                   final_logit_softcapping=cfg.final_softcap or None, attn_logit_softcapping=cfg.attn_softcap or None,
                   sliding_window=cfg.sliding_window, layer_types=types, attention_bias=False)
    if cfg.architecture == "olmo3":  # (4.x: rope_scaling, written above, scales the full layers alone)
        out.update(layer_types=types, sliding_window=cfg.sliding_window)
    if cfg.architecture == "smollm3":
        out.update(no_rope_layers=[int(r) for r in cfg.roped], use_sliding_window=any(cfg.windowed),
                   sliding_window=cfg.sliding_window, layer_types=types)
    if cfg.architecture in ("gemma3", "olmo3"):  # 5.x: rope settings per layer type; 4.x: Gemma 3's local theta
        local = cfg.rope_local_theta or cfg.rope_theta  # on its own (OLMo 3's windowed layers: rope_theta's)
        out["rope_parameters"] = {"full_attention": rope, "sliding_attention": {"rope_type": "default",
                                                                                "rope_theta": local}}
        if cfg.architecture == "gemma3":
            out["rope_local_base_freq"] = local
    return out


def _int_if_whole(x: float):
    return int(x) if float(x).is_integer() else x  # (transformers 5's strict configs type some floats as int)
