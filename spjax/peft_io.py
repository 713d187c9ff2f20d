"""PEFT adapter directories (adapter_config.json + adapter_model.safetensors): spjax's adapters
written in PEFT's layout, and a PEFT adapter read back as a run's starting adapters.

PEFT adapts a transformers module; spjax adapts a projection (model.Block's q, k, ..., down). They
are one and the same except in Phi-3, where transformers fuses q/k/v into qkv_proj and gate/up into
gate_up_proj (tensor_names.peft_modules). A fused module's adapter is then its adapted parts' side by
side: A stacks the m parts' A (rank m·r), B is block-diagonal (each part's B on its rows and its r
columns), and rank_pattern/alpha_pattern give the module m·r and m·alpha so that alpha / rank stays
spjax's. Read back, such an adapter splits exactly; a fused adapter of rank r (as PEFT trains one on
Phi-3) is its parts sharing A, each with its rows of B.

A mixture's experts (Mixtral, Qwen2/3-MoE, OLMoE) are two 3-D params of each layer's `mlp.experts` in
transformers 5, gate_up_proj [E, 2F, D] and down_proj [E, D, F], which PEFT adapts through
`target_parameters`: an adapter's A is [E·rank, in] (expert-major), its B [out, rank·E] (expert-minor),
and with both params adapted the first (gate_up_proj) is nested as `experts.base_layer`. Each expert's
pair is a module's as above (gate and up fused like Phi-3's gate_up_proj). transformers 4.x held each
expert as a Linear of its own (Mixtral's experts.{e}.w1/w3/w2, the others' experts.{e}.gate_proj/...):
adapters PEFT trained so are read too (each expert's Linear a module as any other); spjax writes 5.x's.

A multimodal model's adapter (spjax.hf_wrapped: Gemma 3 4B+) names its language model's modules where
transformers holds them (model.language_model.*), and its target_modules are a pattern matching them
alone: PEFT would otherwise put adapters on the vision tower's q_proj/k_proj/v_proj too.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from spjax.config import EXPERT_TARGETS, ModelConfig
from spjax.hf_wrapped import module_name
from spjax.tensor_names import FUSED_EXPERTS, CheckpointError, expert_names, fused_experts, peft_modules


def _name(module: str, i: int, which: str, wrapped: bool = False) -> str:
    """PEFT's key for adapter matrix `which` ('A' or 'B') of a module ({i}: its layer; wrapped: in a
    multimodal model)."""
    return f"base_model.model.{module_name(module, wrapped).format(i=i)}.lora_{which}.weight"


def _targets(cfg: ModelConfig, wrapped: bool):
    """adapter_config.json's target_modules: the modules' short names, or (wrapped) a pattern PEFT matches
    against whole module names, the language model's alone."""
    short = sorted({_short(module) for module, _, _ in _adapted(cfg)})
    return re.escape(module_name("model.", True)) + r".*\.({})".format("|".join(short)) if wrapped else short


def _adapted(cfg: ModelConfig) -> list:
    """[(module, its parts [(target, first row, end row)], the adapted ones)] for modules with an adapted part."""
    out = []
    for module, parts in peft_modules(cfg):
        adapted = [p for p in parts if p[0] in cfg.lora.targets]
        if adapted:
            out.append((module, parts, adapted))
    return out


def _short(module: str) -> str:
    return module.rsplit(".", 1)[-1]  # q_proj, qkv_proj, ...


def _expert_adapted(cfg: ModelConfig) -> list:
    """[(param, its parts, the adapted ones)] of the experts' params with an adapted part, in the order
    transformers defines them (the order PEFT wraps them in)."""
    params = [(p, [(f"experts_{leaf}", start, end) for leaf, start, end in parts]) for p, parts in fused_experts(cfg)]
    out = [(p, parts, [x for x in parts if x[0] in cfg.lora.targets]) for p, parts in params] if cfg.moe else []
    return [x for x in out if x[2]]


def _expert_module(i: int, wrapped: bool = False) -> str:
    return module_name(FUSED_EXPERTS.format(i=i), wrapped)


def _expert_name(cfg: ModelConfig, i: int, param: str, which: str, wrapped: bool = False) -> str:
    """PEFT's key for the expert param's adapter matrix: the first of two adapted params nested as base_layer."""
    order = [p for p, _, _ in _expert_adapted(cfg)]
    nest = "base_layer." * (len(order) - 1 - order.index(param))
    return f"base_model.model.{_expert_module(i, wrapped)}.{nest}lora_{which}.weight"


def _expert_linears(cfg: ModelConfig, t: str, i: int) -> list:
    """transformers 4.x's module of each expert for expert target t in layer i (experts.{e}.w1, ...)."""
    return [name[:-len(".weight")] for name in expert_names(cfg, t[len("experts_"):], i)[1]]


def _each_expert(cfg: ModelConfig, keys, wrapped: bool) -> bool:
    """Whether an adapter's expert pairs are in transformers 4.x's layout (a Linear per expert)."""
    first = [_name(_expert_linears(cfg, t, 0)[0], 0, "A", wrapped) for t in cfg.lora.targets if t in EXPERT_TARGETS]
    return any(k in keys or k.replace(".weight", ".default.weight") in keys for k in first)


def _fuse(pairs, parts, adapted, r: int):
    """One module's PEFT (A [m·r, in], B [out, m·r]) from its adapted parts' pairs (a [*in, r], b [r, *out]):
    A stacked, B block-diagonal on each part's rows (all of them for a lone part)."""
    # (contiguous: safetensors writes the buffer as laid out, and concatenated transposes keep their order)
    a = np.ascontiguousarray(np.concatenate([x.reshape(-1, r).T for x, _ in pairs]))
    bs = [y.reshape(r, -1).T for _, y in pairs]
    rows = max(end for _, _, end in parts) if len(parts) > 1 else bs[0].shape[0]
    b = np.zeros((rows, len(adapted) * r), np.float32)
    for j, ((_, start, end), b_part) in enumerate(zip(adapted, bs)):
        b[start:end, j * r:(j + 1) * r] = b_part
    return a, b


def peft_tensors(cfg: ModelConfig, params) -> dict:
    """PEFT-named host tensors of the adapters (collective: every process calls it)."""
    from spjax import sharding as shd
    if not cfg.lora.rank:
        raise ValueError("the model has no adapters (lora.rank is 0)")
    tensors, r = {}, cfg.lora.rank
    host = {t: (shd.to_host(params["layers"][f"{t}_lora_a"]).astype(np.float32),
                shd.to_host(params["layers"][f"{t}_lora_b"]).astype(np.float32)) for t in cfg.lora.targets}
    for module, parts, adapted in _adapted(cfg):
        for i in range(cfg.num_layers):  # PEFT: lora_A [rank, in_features], lora_B [out_features, rank]
            a, b = _fuse([(host[t][0][i], host[t][1][i]) for t, _, _ in adapted], parts, adapted, r)
            tensors[_name(module, i, "A")], tensors[_name(module, i, "B")] = a, b
    e_rank = cfg.lora.rank_of(EXPERT_TARGETS[0])
    for param, parts, adapted in _expert_adapted(cfg):
        for i in range(cfg.num_layers):  # each expert's pair, then A [E·rank, in], B [out, rank·E]
            per = [_fuse([(host[t][0][i, e], host[t][1][i, e]) for t, _, _ in adapted], parts, adapted, e_rank)
                   for e in range(cfg.num_experts)]
            a, b = np.concatenate([x for x, _ in per]), np.stack([y for _, y in per], axis=-1)
            tensors[_expert_name(cfg, i, param, "A")] = np.ascontiguousarray(a)
            tensors[_expert_name(cfg, i, param, "B")] = np.ascontiguousarray(b.reshape(b.shape[0], -1))
    return tensors


def write_peft(cfg: ModelConfig, tensors: dict, out_dir: str, base_model: str = "", wrapped: bool = False) -> str:
    """Write peft_tensors' output as adapter_config.json + adapter_model.safetensors (wrapped: the adapter of
    a multimodal model's language model)."""
    from safetensors.numpy import save_file
    os.makedirs(out_dir, exist_ok=True)
    # Ranks other than r: a fused module's m adapted parts block-diagonal (m·r, alpha m·alpha: the scale stays
    # alpha / r), the experts' params at expert_rank (keys "experts.<param>": a shared expert's down_proj is not
    # one of them; PEFT 0.21 warns that such keys match no module, and applies them to the params)
    e_rank = cfg.lora.rank_of(EXPERT_TARGETS[0])
    ranks = {_short(module): (len(parts), cfg.lora.rank) for module, _, parts in _adapted(cfg) if len(parts) > 1}
    ranks.update({f"experts.{param}": (len(parts), e_rank) for param, _, parts in _expert_adapted(cfg)
                  if len(parts) > 1 or e_rank != cfg.lora.rank})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
              "target_modules": _targets(cfg, wrapped), "target_parameters": _target_parameters(cfg),
              "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "rank_pattern": {k: m * r for k, (m, r) in ranks.items()},
              "alpha_pattern": {k: m * cfg.lora.alpha for k, (m, r) in ranks.items()},
              "base_model_name_or_path": base_model or None}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if wrapped:
        prefix = "base_model.model."
        tensors = {prefix + module_name(k[len(prefix):], True): v for k, v in tensors.items()}
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _target_parameters(cfg: ModelConfig):
    return [f"mlp.experts.{p}" for p, _, _ in _expert_adapted(cfg)] or None


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


def _check_config(cfg: ModelConfig, pc: dict, where: str, wrapped: bool, each: bool = False):
    bad = {"peft_type": (pc.get("peft_type"), "LORA"), "use_rslora": (bool(pc.get("use_rslora")), False),
           "use_dora": (bool(pc.get("use_dora")), False), "bias": (pc.get("bias", "none"), "none"),
           "fan_in_fan_out": (bool(pc.get("fan_in_fan_out")), False), "r": (pc.get("r"), cfg.lora.rank),
           # Parts of the adapted model beyond the low-rank pairs, which spjax would not read:
           "modules_to_save": (pc.get("modules_to_save") or None, None), "lora_bias": (bool(pc.get("lora_bias")), False),
           "trainable_token_indices": (pc.get("trainable_token_indices") or None, None)}
    # PEFT variants whose forward is not W + (alpha/r)·B·A on every layer of the targets (aLoRA acts only
    # after its invocation tokens, KaSA/QALoRA/BD-LoRA/Arrow/MonteCLoRA change the product): all off.
    bad.update({k: (pc[k], None) for k in ("alora_invocation_tokens", "use_qalora", "layer_replication",
                                            "layers_to_transform", "use_bdlora",
                                            "arrow_config", "kasa_config", "monteclora_config") if pc.get(k)})
    params, want_params = pc.get("target_parameters") or [], [] if each else (_target_parameters(cfg) or [])
    if {p.rsplit(".", 1)[-1] for p in params} != {p.rsplit(".", 1)[-1] for p in want_params}:
        raise CheckpointError(f"{where}: target_parameters {params!r} differ from lora.targets' {want_params!r}"
                              " (the experts: experts_gate and experts_up are gate_up_proj, experts_down down_proj)")
    for field, (got, want) in bad.items():
        if got != want:
            raise CheckpointError(f"{where}: {field} is {got!r}; spjax needs {want!r}"
                                  + (" (set lora.rank to match)" if field == "r" else ""))
    mods, want = pc.get("target_modules") or [], _targets(cfg, wrapped)
    if each:  # (4.x's experts: their Linears' short names too)
        want = sorted(set(want) | {_short(m) for t in cfg.lora.targets if t in EXPERT_TARGETS
                                   for m in _expert_linears(cfg, t, 0)})
    if (mods != want) if isinstance(mods, str) or wrapped else set(mods) != set(want):
        raise CheckpointError(f"{where}: target_modules {mods!r} differ from lora.targets' {want!r}")


def _split(a, b, parts, adapted, r: int, where: str):
    """Per-part ([in, r], [r, out]) of one module's PEFT A [rank, in] and B [out, rank]: block-diagonal
    (rank m·r) or one A shared by the parts (rank r); else CheckpointError (B must be zero on the rows
    of parts spjax does not adapt, and off its blocks)."""
    rank, m = a.shape[0], len(adapted)
    keep = np.zeros(b.shape, bool)
    out = {}
    for j, (t, start, end) in enumerate(adapted):
        cols = slice(j * r, (j + 1) * r) if rank == m * r else slice(0, r)
        keep[start:end, cols] = True
        out[t] = (a[cols].T, b[start:end, cols].T)
    if len(parts) > 1 and np.any(b[~keep]):
        raise CheckpointError(f"{where}: its B is not zero outside the blocks of the parts lora.targets adapts "
                              f"({', '.join(t for t, _, _ in adapted)}), so spjax would start from another policy")
    return out


def _rank(pc: dict, name: str, r: int, m: int, where: str) -> int:
    """Module `name`'s rank by the adapter config: r, or m·r for m adapted parts block-diagonal."""
    rank = _pattern(pc.get("rank_pattern") or {}, name, pc.get("r"))
    if rank not in (r, m * r):  # (pc["r"] is r: checked)
        raise CheckpointError(f"{where}: rank_pattern gives {name} rank {rank}; spjax's is {r} (lora.rank; a "
                              f"mixture's experts: lora.expert_rank)" + (f" (or {m}×{r}, block-diagonal, for its {m} "
                                                                         f"adapted parts)" if m > 1 else ""))
    return rank


def _scale(cfg: ModelConfig, pc: dict, name: str, rank: int, target: str) -> float:
    """The file's scale alpha / rank (per module: alpha_pattern) over cfg's for target, folded into B: cfg's
    alpha / r then reproduces the adapter's policy."""
    alpha = float(_pattern(pc.get("alpha_pattern") or {}, name, pc.get("lora_alpha", cfg.lora.alpha)))
    return alpha / rank / cfg.lora.scale_of(target)


def load_peft(cfg: ModelConfig, params, adapter_dir: str):
    """params with their adapter leaves replaced by a PEFT adapter's (placed like the old leaves)."""
    from safetensors import safe_open
    where = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.exists(where):
        raise CheckpointError(f"{where}: file not found (lora.init_path must be a PEFT adapter directory)")
    with open(where, encoding="utf-8") as f:
        pc = json.load(f)
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    r, layers, parts_of = cfg.lora.rank, dict(params["layers"]), {}
    with safe_open(path, "flax") as f:
        keys = set(f.keys())
        wrapped = any(module_name("model.", True) in k for k in keys)  # (a multimodal model's adapter)
        each = _each_expert(cfg, keys, wrapped)
        _check_config(cfg, pc, where, wrapped, each)

        def get(name, which):  # name: the tensor's key, lora_{which}.weight
            if name not in keys:  # PEFT also writes names with the adapter name ('.default.') left out or in
                alt = name.replace(f".lora_{which}.weight", f".lora_{which}.default.weight")
                if alt not in keys:
                    raise CheckpointError(f"{path}: tensor {name!r} missing")
                name = alt
            return np.asarray(f.get_tensor(name).astype(jnp.float32))

        adapted, experts = _adapted(cfg), [] if each else _expert_adapted(cfg)
        linears = [(t, i, _expert_linears(cfg, t, i)) for t in cfg.lora.targets if t in EXPERT_TARGETS
                   for i in range(cfg.num_layers)] if each else []
        read = {_name(module, i, w, wrapped) for module, _, _ in adapted for i in range(cfg.num_layers) for w in "AB"}
        read |= {_expert_name(cfg, i, p, w, wrapped) for p, _, _ in experts for i in range(cfg.num_layers) for w in "AB"}
        read |= {_name(m, i, w, wrapped) for _, i, modules in linears for m in modules for w in "AB"}
        left = sorted(k for k in keys if k not in read and k.replace(".default.weight", ".weight") not in read)
        if left:
            raise CheckpointError(f"{path}: tensor(s) {', '.join(left[:3])}{' ...' if len(left) > 3 else ''} are not "
                                  "LoRA pairs of lora.targets: spjax would start from another policy than the adapter's")
        for module, parts, mine in adapted:
            for i in range(cfg.num_layers):
                name = module.format(i=i)
                a, b = (get(_name(module, i, w, wrapped), w) for w in "AB")
                rank = _rank(pc, name, r, len(mine), where)
                if a.shape[0] != rank or b.shape[-1] != rank:
                    raise CheckpointError(f"{path}: {name}'s adapter has rank {a.shape[0]}, its config says {rank}")
                scale = _scale(cfg, pc, name, rank, mine[0][0])
                for t, (a_t, b_t) in _split(a, b, parts, mine, r, f"{path}: {name}").items():
                    parts_of.setdefault(t, []).append((a_t, b_t * scale))
        e_rank = cfg.lora.rank_of(EXPERT_TARGETS[0])
        for param, parts, mine in experts:
            for i in range(cfg.num_layers):
                name, E = f"{_expert_module(i)}.{param}", cfg.num_experts
                a, b = (get(_expert_name(cfg, i, param, w, wrapped), w) for w in "AB")
                rank = _rank(pc, name, e_rank, len(mine), where)
                if a.shape[0] != E * rank or b.shape[-1] != E * rank:
                    raise CheckpointError(f"{path}: {name}'s adapter has {a.shape[0]} rows of A, {E} experts × rank "
                                          f"{rank} expected")
                scale = _scale(cfg, pc, name, rank, mine[0][0])
                a, b = a.reshape(E, rank, -1), b.reshape(b.shape[0], rank, E)
                per = [_split(a[e], b[..., e], parts, mine, e_rank, f"{path}: {name} (expert {e})") for e in range(E)]
                for t, _, _ in mine:
                    parts_of.setdefault(t, []).append((np.stack([x[t][0] for x in per]),
                                                       np.stack([x[t][1] for x in per]) * scale))
        for t, i, modules in linears:  # (cfg.lora.targets' order, then layers: as parts_of stacks them)
            pairs = []
            for module in modules:
                a, b = (get(_name(module, i, w, wrapped), w) for w in "AB")
                rank = _rank(pc, module, cfg.lora.rank_of(t), 1, where)
                if a.shape[0] != rank or b.shape[-1] != rank:
                    raise CheckpointError(f"{path}: {module}'s adapter has rank {a.shape[0]}, its config says {rank}")
                pairs.append((a.T, b.T * _scale(cfg, pc, module, rank, t)))
            parts_of.setdefault(t, []).append((np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])))
    for t, per_layer in parts_of.items():
        old_a, old_b = layers[f"{t}_lora_a"], layers[f"{t}_lora_b"]
        a, b = np.stack([x for x, _ in per_layer]), np.stack([y for _, y in per_layer])
        try:
            a, b = a.reshape(old_a.shape), b.reshape(old_b.shape)
        except ValueError:
            raise CheckpointError(f"{path}: {t} adapter shapes {a.shape[1:]}, {b.shape[1:]} do not fit "
                                  f"{old_a.shape[1:]}, {old_b.shape[1:]}") from None
        layers[f"{t}_lora_a"] = jax.device_put(a.astype(old_a.dtype), old_a.sharding)
        layers[f"{t}_lora_b"] = jax.device_put(b.astype(old_b.dtype), old_b.sharding)
    return {**params, "layers": layers}


__all__ = ["peft_tensors", "write_peft", "save_peft", "load_peft"]
