"""The checks every spjax.config group runs on itself: one ConfigError line naming the field.

Kept apart from the groups' declarations (spjax.config) so that those read as the list of settings.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import typing


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the field."""


def check(ok: bool, field: str, msg: str):
    if not ok:
        raise ConfigError(f"{field}: {msg}")


def one_of(value, field: str, choices: tuple):
    check(value in choices, field, f"{value!r} not in {choices}")


def typed_and_finite(cfg, group: str):
    """Every field of a config of its declared type (a config file's export="no" is a truthy string: the
    run exported; rounds="2" was a TypeError in a check), every float finite (inf or nan in a rate or a
    scale is always a mistake). Groups check their own fields when they are built."""
    prefix = f"{group}." if group else ""
    for f in dataclasses.fields(cfg):
        v, typ = getattr(cfg, f.name), _hints(type(cfg))[f.name]
        if typing.get_origin(typ) is typing.Union and v is not None:
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        if typ is tuple or typing.get_origin(typ) is tuple:
            inner = (typing.get_args(typ) or (None,))[0]
            ok = isinstance(v, (tuple, list)) and all(_IS.get(inner, lambda x: True)(x) for x in v)
        else:
            ok = v is None or dataclasses.is_dataclass(v) or _IS.get(typ, lambda x: True)(v)
        check(ok, prefix + f.name, f"expected {getattr(typ, '__name__', typ)}, got {v!r} ({type(v).__name__})")
        check(not isinstance(v, float) or math.isfinite(v), prefix + f.name, f"must be finite, got {v}")


_IS = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
       float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), str: lambda v: isinstance(v, str)}


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_model(cfg):
    """A ModelConfig's fields: positive sizes, known names, rope (check_rope), Gemma's parts and windows
    by layer (check_family), and what a quantized base needs."""
    from spjax.config import ATTENTION, BASE_QUANTS, DTYPES, REMAT, ROPE_TYPES
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
        check(getattr(cfg, name) > 0, f"model.{name}", f"must be positive, got {getattr(cfg, name)}")
    check(cfg.num_heads % cfg.num_kv_heads == 0, "model.num_kv_heads",
          f"{cfg.num_heads} query heads are not a multiple of {cfg.num_kv_heads} kv heads")
    check(cfg.sliding_window is None or cfg.sliding_window >= 1, "model.sliding_window",
          f"must be >= 1 or None (full attention), got {cfg.sliding_window}")
    one_of(cfg.rope_type, "model.rope_type", ROPE_TYPES)
    check_rope(cfg)  # and the q/k norms and biases that no exported family computes with them
    check_family(cfg)
    check(cfg.rms_norm_eps >= 0, "model.rms_norm_eps", f"must be >= 0, got {cfg.rms_norm_eps}")
    from spjax.tensor_names import ARCHITECTURES  # the name table is the one list of names
    one_of(cfg.architecture, "model.architecture", ARCHITECTURES)
    one_of(cfg.param_dtype, "model.param_dtype", DTYPES)
    one_of(cfg.compute_dtype, "model.compute_dtype", DTYPES)
    one_of(cfg.remat, "model.remat", REMAT)
    one_of(cfg.attention, "model.attention", ATTENTION)
    one_of(cfg.base_quant, "model.base_quant", BASE_QUANTS)
    check(cfg.base_quant == "none" or cfg.lora.rank > 0, "model.base_quant",
          f"{cfg.base_quant} needs lora.rank > 0 (a quantized base is frozen; only adapters train)")
    check_experts(cfg)
    check_olmo(cfg)
    odd = [f"{n} {getattr(cfg, n)}" for n in ("hidden_size", "intermediate_size") if getattr(cfg, n) % 2]
    check(cfg.base_quant != "int4" or not odd, "model.base_quant",  # head_dim (o's last input) is even
          f"int4 packs two values a byte along each projection's last input dim, but {' and '.join(odd)} is odd")


MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # the families whose MLPs are mixtures of experts


def check_experts(cfg):
    """A mixture of experts only where a transformers family computes one (Mixtral: Mistral's attention;
    Qwen2-MoE: Qwen2's, and a shared expert; Qwen3-MoE: Qwen3's; OLMoE: q/k norms over all heads), with a
    router choosing 1..num_experts of them; adapters on a dense MLP's projections or experts only where they exist."""
    moe = cfg.architecture in MOE_ARCHITECTURES
    check(cfg.num_experts >= 0 and (cfg.num_experts > 0) == moe, "model.num_experts",
          f"{cfg.num_experts} with architecture {cfg.architecture}: " + (
              "a mixture of experts needs num_experts > 0" if moe else
              f"only {', '.join(MOE_ARCHITECTURES)} have experts" if cfg.num_experts > 0 else "must be >= 0"))
    shared = cfg.architecture == "qwen2_moe"
    check(cfg.shared_expert_size > 0 if shared else cfg.shared_expert_size == 0, "model.shared_expert_size",
          f"{cfg.shared_expert_size} with architecture {cfg.architecture}: " + (
              "qwen2_moe's shared expert needs a width > 0" if shared else "only qwen2_moe has a shared expert"))
    adapted = [t for t in cfg.lora.targets if t.startswith("shared_")] if cfg.lora.rank else []
    check(not adapted or shared, "lora.targets", f"{', '.join(adapted)} with {cfg.architecture}: only qwen2_moe has "
          "a shared expert")
    adapted = [t for t in cfg.lora.targets if t.startswith("experts_")] if cfg.lora.rank else []
    check(not adapted or moe, "lora.targets", f"{', '.join(adapted)} with {cfg.architecture}: only "
          f"{', '.join(MOE_ARCHITECTURES)} have experts (a dense MLP's projections are gate, up, down)")
    if not moe:
        return
    check(1 <= cfg.experts_per_token <= cfg.num_experts, "model.experts_per_token",
          f"must be in [1, num_experts {cfg.num_experts}], got {cfg.experts_per_token}")
    arch, norms = cfg.architecture, cfg.architecture in ("qwen3_moe", "olmoe")
    check(cfg.qkv_bias == shared, "model.qkv_bias", f"{cfg.qkv_bias} with {arch}: transformers' {arch} "
          + ("adds q/k/v biases" if shared else "has no q/k/v biases"))
    check(cfg.qk_norm == norms, "model.qk_norm", f"{cfg.qk_norm} with {arch}: transformers' {arch} "
          + ("normalizes q and k" if norms else "has no q/k norms"))
    check(cfg.head_dim * cfg.num_heads == cfg.hidden_size or arch != "olmoe", "model.head_dim",
          f"{cfg.head_dim} with olmoe: its q norm is hidden_size {cfg.hidden_size} wide, so head_dim must be "
          f"hidden_size / num_heads")
    check(cfg.norm_topk or cfg.architecture != "mixtral", "model.norm_topk",
          "false with mixtral: transformers' Mixtral always renormalizes the chosen experts' weights")
    mlp = [t for t in cfg.lora.targets if t in ("gate", "up", "down")]
    check(not cfg.lora.rank or not mlp, "lora.targets", f"{', '.join(mlp)}: {cfg.architecture}'s MLPs are "
          "mixtures of experts: adapt each expert with experts_gate, experts_up, experts_down"
          + (" (and the shared expert with shared_gate, shared_up, shared_down)" if shared else "")
          + ", or the attention alone, lora.targets=[q,k,v,o]")


def check_olmo(cfg):
    """OLMo 2/3's and OLMoE's attention: q and k normalized over all heads at once, windows only in OLMo 3's; no
    other family's."""
    olmo = cfg.architecture in ("olmoe", "olmo2", "olmo3")
    check(not cfg.qk_norm_full or cfg.qk_norm, "model.qk_norm_full", "true without qk_norm: set both")
    check(cfg.qk_norm_full == olmo, "model.qk_norm_full", f"{cfg.qk_norm_full} with {cfg.architecture}: " + (
        f"transformers' {cfg.architecture} normalizes q and k over all heads at once" if olmo else
        "only olmo2, olmo3 and olmoe compute it"))
    check(cfg.qk_norm or not olmo, "model.qk_norm", f"false with {cfg.architecture}: transformers' "
          f"{cfg.architecture} normalizes q and k")
    check(not (olmo and any(cfg.windowed)) or cfg.architecture == "olmo3", "model.sliding_window",
          f"{cfg.sliding_window} with {cfg.architecture}: transformers' {cfg.architecture} attends to every earlier "
          "token" + (" (OLMo 3's windowed layers: architecture olmo3)" if cfg.architecture == "olmo2" else ""))


def check_rope(cfg):
    """A ModelConfig's rope fields: positive where a zero or a negative gives NaN logits silently, a
    rotated part of each head of whole pairs, longrope's divisors one per rotated pair; and the q/k
    norms and q/k/v biases that no exported family computes together with what it has."""
    for name in ("rope_theta", "rope_factor", "rope_original_max_position", "rope_beta_fast", "rope_beta_slow"):
        check(getattr(cfg, name) > 0, f"model.{name}", f"must be > 0, got {getattr(cfg, name)}")
    check(cfg.rope_attention_factor >= 0, "model.rope_attention_factor",
          f"must be >= 0 (0: derived from rope_factor), got {cfg.rope_attention_factor}")
    check(0 < cfg.partial_rotary_factor <= 1, "model.partial_rotary_factor",
          f"must be in (0, 1], got {cfg.partial_rotary_factor}")
    check(cfg.rotary_dim % 2 == 0 and cfg.rotary_dim > 0, "model.head_dim" if cfg.partial_rotary_factor == 1
          else "model.partial_rotary_factor", f"RoPE rotates pairs of dims: {cfg.rotary_dim} of head_dim "
          f"{cfg.head_dim} is not a positive even number")
    check(not (cfg.qk_norm and cfg.qkv_bias), "model.qk_norm",  # Qwen3's attention_bias adds o's too
          "with qkv_bias: no transformers family computes both, so the model could not be exported")
    check(not ((cfg.qk_norm or cfg.qkv_bias) and (cfg.rotary_dim != cfg.head_dim or cfg.rope_type == "longrope")),
          "model.qk_norm" if cfg.qk_norm else "model.qkv_bias", "with partial rotary or longrope: no transformers "
          "family computes both, so the model could not be exported")
    phi3 = not (cfg.qk_norm or cfg.qkv_bias) and (  # exported as Phi-3 (export_arch)
        cfg.architecture == "phi3" or cfg.rotary_dim != cfg.head_dim or cfg.rope_type == "longrope")
    check(not phi3 or cfg.rope_type in ("default", "longrope"), "model.rope_type", f"{cfg.rope_type!r} with a "
          "Phi-3 model (partial rotary or architecture phi3): transformers' Phi3 computes default or longrope only")
    pairs = cfg.rotary_dim // 2
    for name in ("rope_short_factor", "rope_long_factor"):
        factors = getattr(cfg, name)
        if cfg.rope_type == "longrope" or factors:
            check(len(factors) == pairs and all(f > 0 for f in factors), f"model.{name}",
                  f"longrope needs {pairs} positive divisors (one per rotated pair of dims), got {len(factors)}"
                  + ("" if all(f > 0 for f in factors) else " with some <= 0"))


def export_arch(cfg) -> str:
    """The transformers family that computes cfg's model: Qwen3 is Llama with q/k norms, Qwen2 is Llama
    with q/k/v biases (only they have them: Llama's attention_bias adds an o_proj bias too), Phi-3 is
    Llama that may rotate part of each head (and has LongRoPE), Mistral is Llama with a window, SmolLM3 is
    Llama with layers that rotate nothing or windows on some layers, Ministral 3 is Mistral whose queries are
    scaled by position, Granite is Llama with muP's multipliers. A Llama GGUF can hold q/k/v biases, and an
    override can set a window, biases or q/k norms on any family; check_family refuses what no family computes."""
    if cfg.gemma or cfg.moe or cfg.post_norms:
        return cfg.architecture
    if cfg.nope_layers or (cfg.architecture == "smollm3" and len(set(cfg.windowed)) > 1):
        return "smollm3"  # (Llama with NoPE layers, or windows on some layers)
    if cfg.query_scale_beta:
        return "ministral3"  # (Mistral whose queries are scaled by position)
    if cfg.architecture == "granite":
        return "granite"  # (Llama with muP's multipliers)
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    if cfg.architecture == "phi3" or cfg.rotary_dim != cfg.head_dim or cfg.rope_type == "longrope":
        return "phi3"
    return "mistral" if cfg.sliding_window or cfg.architecture == "mistral" else "llama"


def check_family(cfg):
    """Gemma's settings only on a Gemma, windows by layer and rope by layer only where a transformers family
    computes them, and nothing on a Gemma that transformers' Gemma would not compute (the Llama variants':
    check_variants)."""
    from spjax.config import LAYER_TYPES
    types = cfg.layer_types
    check(not types or len(types) == cfg.num_layers, "model.layer_types",
          f"{len(types)} entries for {cfg.num_layers} layers")
    check(set(types) <= set(LAYER_TYPES), "model.layer_types", f"{sorted(set(types) - set(LAYER_TYPES))} not in "
          f"{LAYER_TYPES}")
    for name in ("query_scale", "attn_softcap", "final_softcap", "rope_local_theta"):
        check(getattr(cfg, name) >= 0, f"model.{name}", f"must be >= 0 (0: none), got {getattr(cfg, name)}")
        check(cfg.gemma or not getattr(cfg, name) or name == "rope_local_theta", f"model.{name}", f"is Gemma's "
              f"(architecture gemma2/gemma3), not {cfg.architecture}'s: no transformers family computes it with this model")
    check(not cfg.rope_local_theta or cfg.architecture in ("gemma3", "olmo3"), "model.rope_local_theta",
          f"is Gemma 3's and OLMo 3's, not {cfg.architecture}'s")
    check(cfg.architecture != "olmo3" or cfg.rope_type == "default" or cfg.rope_local_theta or not any(cfg.windowed),
          "model.rope_local_theta", f"0 with olmo3's {cfg.rope_type} rope: transformers' OLMo 3 rotates its windowed "
          "layers by unscaled rope; set it (rope_theta: the full layers' theta)")
    check(not cfg.attn_softcap or cfg.architecture == "gemma2", "model.attn_softcap",
          "is Gemma 2's (transformers' Gemma 3 does not cap attention scores)")
    mixed = len(set(cfg.windowed)) > 1
    check(not mixed or cfg.gemma or cfg.architecture in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "olmo3", "smollm3"),
          "model.layer_types", f"windows on some layers only with {cfg.architecture}: only Gemma, Qwen2, Qwen3, "
          "OLMo 3 and SmolLM3 compute that")
    check_variants(cfg)
    if cfg.gemma:
        what = [n for n, on in (("qkv_bias", cfg.qkv_bias), ("qk_norm", cfg.qk_norm != (cfg.architecture == "gemma3")),
                                ("partial_rotary_factor", cfg.rotary_dim != cfg.head_dim),
                                ("rope_type", cfg.rope_type not in ("default", "linear"))) if on]
        check(not what, f"model.{what[0] if what else ''}", f"{getattr(cfg, what[0]) if what else ''} with "
              f"{cfg.architecture}: transformers' {cfg.architecture} does not compute it")


_VARIANTS = {"smollm3": "SmolLM3", "ministral3": "Ministral 3", "granite": "Granite"}


def check_variants(cfg):
    """The Llama variants' own settings (SmolLM3's NoPE layers, Ministral 3's query scale, Granite's
    multipliers) only on them, and nothing beside them that their transformers class does not compute."""
    granite = {n: getattr(cfg, n) for n, off in (("embedding_multiplier", 1.0), ("attention_multiplier", 0.0),
                                                 ("residual_multiplier", 1.0), ("logits_scaling", 1.0))
               if getattr(cfg, n) != off}
    for name, value in granite.items():
        check(value > 0, f"model.{name}", f"must be > 0, got {value}")
        check(cfg.architecture == "granite", f"model.{name}", f"is Granite's (architecture granite), not "
              f"{cfg.architecture}'s")
    check(cfg.query_scale_beta >= 0, "model.query_scale_beta", f"must be >= 0 (0: none), got {cfg.query_scale_beta}")
    check(not cfg.query_scale_beta or cfg.architecture == "ministral3", "model.query_scale_beta",
          f"is Ministral 3's (architecture ministral3), not {cfg.architecture}'s")
    check(not cfg.nope_layers or cfg.architecture == "smollm3", "model.nope_layers",
          f"is SmolLM3's (architecture smollm3), not {cfg.architecture}'s")
    bad = [i for i in cfg.nope_layers if not 0 <= i < cfg.num_layers]
    check(not bad and len(set(cfg.nope_layers)) == len(cfg.nope_layers), "model.nope_layers",
          f"{list(cfg.nope_layers)}: layer indices in [0, {cfg.num_layers}), each once")
    family = export_arch(cfg)
    if family not in _VARIANTS:
        return
    other = [n for n, on in (("qk_norm", cfg.qk_norm), ("qkv_bias", cfg.qkv_bias),
                             ("partial_rotary_factor", cfg.rotary_dim != cfg.head_dim),
                             ("rope_type", cfg.rope_type == "longrope"),
                             ("sliding_window", family == "granite" and any(cfg.windowed))) if on]
    check(not other, f"model.{other[0] if other else ''}", f"{getattr(cfg, other[0]) if other else ''} with "
          f"{family}: transformers' {_VARIANTS[family]} does not compute it, so the model could not be exported")


def iso_date(text: str) -> bool:
    try:
        return bool(datetime.date.fromisoformat(text))
    except ValueError:
        return False


# apply_chat_template's own parameters: a template variable of one of these names would change the call
_TEMPLATE_CALL = ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                  "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                  "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")


def template_kwargs(args, field: str = "data.template_args") -> dict:
    """{name: value} of NAME=VALUE texts (data.template_args): VALUE read as JSON (false, 3, "x"), else
    as the text itself. ConfigError naming the field for a text without a NAME or a reserved NAME."""
    out = {}
    for a in args:
        name, eq, value = str(a).partition("=")
        name = name.strip()
        check(bool(eq) and name.isidentifier(), field, f"{a!r} is not NAME=VALUE (e.g. enable_thinking=false)")
        check(name not in _TEMPLATE_CALL, field, f"{name} is apply_chat_template's own parameter, not a template "
              "variable: spjax sets it")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value.strip()
    return out
