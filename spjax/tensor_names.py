"""The one table from spjax's param tree to checkpoint tensor names (HF safetensors, GGUF, PEFT),
and the loops that build params from named tensors and named tensors from params.

Every importer (hf, gguf_io) and exporter (hf, lora's PEFT adapter) reads names and layouts from
here, so none of them imports another. Tensors are in Hugging Face's layout ([out, in] matrices);
GGUF files hold the same layout once dequantized (gguf_io undoes llama.cpp's Q/K row permutation).
A LoRA config (ModelConfig.lora / base_quant) changes what is built: base projections are
quantized per leaf on the host as they are read, adapters are added (A random, B zero: the
policy starts as the base), and export writes the merged weights W + (alpha / r) A B.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spjax import quant
from spjax import sharding as shd
from spjax.host_copy import c_order, stacked
from spjax.config import LORA_TARGETS, SHARED_EXPERT_TARGETS, LoraConfig, ModelConfig
from spjax.config_checks import export_arch

# The architectures spjax implements (ModelConfig.architecture, HF model_type) and their HF classes.
HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3", "Gemma2ForCausalLM": "gemma2",
            "Gemma3ForCausalLM": "gemma3", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
            "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe", "Olmo2ForCausalLM": "olmo2",
            "Olmo3ForCausalLM": "olmo3", "SmolLM3ForCausalLM": "smollm3", "Ministral3ForCausalLM": "ministral3",
            "GraniteForCausalLM": "granite"}
ARCHITECTURES = tuple(HF_ARCHS.values())
# How many leading dims of each projection weight are contracted (projection.project's [*in, *out]).
PROJ_IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
# The leaves a quantized base (ModelConfig.base_quant) stores quantized, with (lead, n_in) of a layer's weight:
# the axes before its inputs (a mixture's expert axis: each expert quantized on its own) and the inputs
# contracted (spjax.quant). A mixture's router stays as it is: small, and it picks the experts.
QUANTIZED = {**{leaf: (0, n_in) for leaf, n_in in PROJ_IN_DIMS.items()},
             **{f"experts_{leaf}": (1, 1) for leaf in ("gate", "up", "down")},
             **{f"shared_{leaf}": (0, 1) for leaf in ("gate", "up", "down")}}  # (Qwen2-MoE's shared expert)


class CheckpointError(ValueError):
    """A checkpoint is missing, unsupported or malformed; the message names the file and tensor."""


class TensorSource:
    """`get(name) -> np.ndarray` over one checkpoint, with the names it holds: the loader refuses a
    checkpoint holding tensors it did not read, since those are parts of a model spjax would not compute.
    `stored(name)`: the name as the file holds it, for messages (a multimodal model's: spjax.hf_wrapped)."""

    def __init__(self, get: Callable, names, stored: Callable = lambda name: name):
        self.get, self.names, self.stored = get, frozenset(names), stored

    def __call__(self, name: str):
        return self.get(name)


# Tensors a checkpoint may hold that the loader leaves unread without changing the model: rotary
# inverse frequencies (recomputed from the config). spjax.reward_model reads score.weight itself.
_UNREAD_OK_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str  # Hugging Face name; per-layer names have {i}
    gguf: Optional[str]  # llama.cpp name
    to_spjax: Callable  # np [HF layout] -> np [spjax layout]
    to_hf: Callable  # np [spjax layout] -> np [HF layout]

    def name(self, kind: str) -> str:
        return self.gguf if kind == "gguf" else self.hf


def layer_table(cfg: ModelConfig) -> dict:
    """Per-layer leaf -> Entry. Per-layer leaves are stacked over N layers in the params."""
    D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    a, m, b = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp.", "blk.{i}."
    ident = (lambda w: w, lambda x: x)
    lin = lambda *shape: (lambda w: w.T.reshape(shape), lambda x: x.reshape(shape[0], -1).T)
    T = (lambda w: w.T, lambda x: x.T)
    out = {
        "attn_norm": Entry("model.layers.{i}.input_layernorm.weight", b + "attn_norm.weight", *ident),
        "mlp_norm": Entry("model.layers.{i}.post_attention_layernorm.weight", b + "ffn_norm.weight", *ident),
        "q": Entry(a + "q_proj.weight", b + "attn_q.weight", *lin(D, H, Dh)),
        "k": Entry(a + "k_proj.weight", b + "attn_k.weight", *lin(D, K, Dh)),
        "v": Entry(a + "v_proj.weight", b + "attn_v.weight", *lin(D, K, Dh)),
        "o": Entry(a + "o_proj.weight", b + "attn_output.weight",
                   lambda w: w.T.reshape(H, Dh, D), lambda x: x.reshape(H * Dh, D).T),
        "gate": Entry(m + "gate_proj.weight", b + "ffn_gate.weight", *T),
        "up": Entry(m + "up_proj.weight", b + "ffn_up.weight", *T),
        "down": Entry(m + "down_proj.weight", b + "ffn_down.weight", *T),
    }
    if cfg.qkv_bias:
        for n, heads in (("q", H), ("k", K), ("v", K)):
            out[f"{n}_bias"] = Entry(a + f"{n}_proj.bias", b + f"attn_{n}.bias",
                                     lambda w, h=heads: w.reshape(h, Dh), lambda x: x.reshape(-1))
    if cfg.qk_norm:
        for n in ("q", "k"):
            out[f"{n}_norm"] = Entry(a + f"{n}_norm.weight", b + f"attn_{n}_norm.weight", *ident)
    if cfg.moe:  # the router and the experts, each expert's weights stacked (stack_experts: one tensor each)
        out.pop("gate"), out.pop("up"), out.pop("down")
        m = "model.layers.{i}." + ("block_sparse_moe." if cfg.architecture == "mixtral" else "mlp.")
        names = _EXPERT_NAMES[cfg.architecture]
        swap = (lambda w: w.transpose(0, 2, 1), lambda x: x.transpose(0, 2, 1))  # [E, out, in] <-> [E, in, out]
        # llama.cpp's names: a Mixtral GGUF (llama with experts) holds each layer's experts stacked, [E, out, in]
        out.update(router=Entry(m + "gate.weight", b + "ffn_gate_inp.weight", *T),
                   **{f"experts_{leaf}": Entry(m + f"experts.{names[leaf]}.weight", b + f"ffn_{leaf}_exps.weight",
                                               *swap) for leaf in ("gate", "up", "down")})
        if cfg.shared_expert_size:  # Qwen2-MoE: a SwiGLU MLP every token takes, scaled by sigmoid(x w)
            out.update(shared_expert_gate=Entry(m + "shared_expert_gate.weight", b + "ffn_gate_inp_shexp.weight",
                                                lambda w: w.reshape(-1, 1), lambda x: x.reshape(1, -1)),  # (GGUF: [D])
                       **{f"shared_{leaf}": Entry(m + f"shared_expert.{leaf}_proj.weight",
                                                  b + f"ffn_{leaf}_shexp.weight", *T)
                          for leaf in ("gate", "up", "down")})
    if cfg.gemma or cfg.post_norms:  # norms after attention and the MLP (llama.cpp's names for them)
        n = "model.layers.{i}."
        out.update(attn_out_norm=Entry(n + "post_attention_layernorm.weight", b + "post_attention_norm.weight",
                                       *ident),
                   mlp_out_norm=Entry(n + "post_feedforward_layernorm.weight", b + "post_ffw_norm.weight", *ident))
    if cfg.gemma:  # and before them
        out["mlp_norm"] = Entry("model.layers.{i}.pre_feedforward_layernorm.weight", b + "ffn_norm.weight", *ident)
    if cfg.post_norms:  # and none before them (OLMo 2)
        del out["attn_norm"], out["mlp_norm"]
    return out


# Each expert's projections, as transformers' state_dict and checkpoints name them (experts.{e}.<name>.weight).
_EXPERT_NAMES = {"mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
                 "qwen2_moe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
                 "qwen3_moe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
                 "olmoe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}}


def expert_names(cfg: ModelConfig, leaf: str, i: int) -> tuple:
    """(layer i's stacked experts tensor of `leaf` (gate, up, down) as layer_table names it, [each expert's own
    tensor, in expert order])."""
    stacked = layer_table(cfg)[f"experts_{leaf}"].hf.format(i=i)
    return stacked, [stacked.replace("experts.", f"experts.{e}.") for e in range(cfg.num_experts)]


FUSED_EXPERTS = "model.layers.{i}.mlp.experts"  # transformers 5's module holding a layer's experts as 3-D params


def fused_experts(cfg: ModelConfig) -> list:
    """[(param of FUSED_EXPERTS, [(leaf, first row, end row)])]: gate_up_proj [E, 2F, D], gate's rows first, and
    down_proj [E, D, F] (all its rows: None)."""
    F = cfg.intermediate_size
    return [("gate_up_proj", [("gate", 0, F), ("up", F, 2 * F)]), ("down_proj", [("down", None, None)])]


def stack_experts(cfg: ModelConfig, get: TensorSource) -> TensorSource:
    """A mixture of experts' checkpoint seen under layer_table's names: each stacked experts tensor [E, ...] made
    of its experts' own tensors, as checkpoints hold them (experts.{e}.w1.weight, ...), or cut from transformers
    5's fused ones in memory (mlp.experts.gate_up_proj [E, 2F, D]: gate rows first; down_proj [E, D, F]; Mixtral's
    router there as mlp.gate.weight). Read when read. Any other checkpoint unchanged."""
    if not cfg.moe:
        return get
    cuts = {leaf: (param, slice(start, end)) for param, parts in fused_experts(cfg) for leaf, start, end in parts}
    views = {}  # name -> (a function reading it, the checkpoint's names it stands for)
    for i in range(cfg.num_layers):
        for leaf, (fused, rows) in cuts.items():
            stacked, own = expert_names(cfg, leaf, i)
            fused = f"{FUSED_EXPERTS.format(i=i)}.{fused}"
            if any(name in get.names for name in own):
                views[stacked] = (lambda own=own: np.stack([np.asarray(get(name)) for name in own]), own)
            elif fused in get.names:
                views[stacked] = (lambda fused=fused, rows=rows: np.asarray(get(fused))[:, rows],
                                  [fused])
        router, moved = layer_table(cfg)["router"].hf.format(i=i), f"model.layers.{i}.mlp.gate.weight"
        if router not in get.names and moved in get.names:
            views[router] = (lambda moved=moved: get(moved), [moved])
    if not views:
        return get
    replaced = {name for _, names in views.values() for name in names}
    return TensorSource(lambda name: views[name][0]() if name in views else get(name),
                        (get.names - replaced) | set(views), get.stored)


def unstack_experts(cfg: ModelConfig, tensors: dict, i: int) -> dict:
    """Layer i's HF tensors under layer_table's names with each stacked experts tensor split into its experts'."""
    out = dict(tensors)
    for leaf in ("gate", "up", "down"):
        stacked, own = expert_names(cfg, leaf, i)
        x = out.pop(stacked)
        out.update({name: x[e] for e, name in enumerate(own)})
    return out


def top_table(cfg: ModelConfig) -> dict:
    ident = (lambda w: w, lambda x: x)
    out = {"embed": Entry("model.embed_tokens.weight", "token_embd.weight", *ident),
           "final_norm": Entry("model.norm.weight", "output_norm.weight", *ident)}
    if not cfg.tie_embeddings:
        out["lm_head"] = Entry("lm_head.weight", "output.weight", lambda w: w.T, lambda x: x.T)
    return out


def _fused(cfg: ModelConfig, names: str = "hf") -> dict:
    """Phi-3's fused per-layer tensors: {name ({i}): [(the part's layer_table name, its rows)]}, the parts
    stacked along the out dim (HF qkv_proj: q, k, v; gate_up_proj: gate, up; llama.cpp's phi3 keeps the
    layout as attn_qkv and ffn_up, so its fused gate/up bears the up part's name)."""
    Dh, F, table = cfg.head_dim, cfg.intermediate_size, layer_table(cfg)
    part = lambda leaf, rows: (table[leaf].name(names), rows)
    qkv, gate_up = (("blk.{i}.attn_qkv.weight", "blk.{i}.ffn_up.weight") if names == "gguf" else
                    ("model.layers.{i}.self_attn.qkv_proj.weight", "model.layers.{i}.mlp.gate_up_proj.weight"))
    return {qkv: [part("q", cfg.num_heads * Dh), part("k", cfg.num_kv_heads * Dh), part("v", cfg.num_kv_heads * Dh)],
            gate_up: [part("gate", F), part("up", F)]}


def split_fused(cfg: ModelConfig, get: TensorSource, where: str, names: str = "hf") -> TensorSource:
    """A Phi-3 checkpoint seen under layer_table's names: each part a row slice of its fused tensor (read
    again for each part: the loader reads leaf by leaf over all layers, so keeping fused tensors for their
    other parts would hold up to a whole leaf's worth of them)."""
    if cfg.architecture != "phi3" or getattr(get, "split", False):  # (GGUF: ffn_up names fused and part)
        return get
    parts = {}  # part name -> (fused name, first row, end row, all rows)
    for fused, pieces in _fused(cfg, names).items():
        rows = sum(n for _, n in pieces)
        for i in range(cfg.num_layers):
            start = 0
            for name, n in pieces:
                parts[name.format(i=i)] = (fused.format(i=i), start, start + n, rows)
                start += n
    parts = {k: v for k, v in parts.items() if v[0] in get.names}
    if not parts:
        return get

    def read(name):  # the fused tensor read again for each part: one at a time in host memory
        if name not in parts:
            return get(name)
        fused, start, end, rows = parts[name]
        w = get(fused)
        if len(w.shape) != 2 or w.shape[0] != rows:
            raise CheckpointError(f"{where}: tensor {fused!r} has shape {tuple(w.shape)}, expected {rows} rows (the "
                                  f"stacked parts) for the {cfg.architecture} config")
        return w[start:end]

    out = TensorSource(read, (get.names - {p[0] for p in parts.values()}) | set(parts), get.stored)
    out.split = True
    return out


def fuse(cfg: ModelConfig, tensors: dict, layers=None) -> dict:
    """HF tensors under layer_table's names with Phi-3's parts stacked into its fused tensors (of `layers`,
    default all)."""
    out = dict(tensors)
    for fused, pieces in _fused(cfg).items():
        for i in range(cfg.num_layers) if layers is None else layers:
            out[fused.format(i=i)] = np.concatenate([out.pop(name.format(i=i)) for name, _ in pieces], axis=0)
    return out


def peft_modules(cfg: ModelConfig) -> list:
    """[(HF module name with {i}, [(projection, first row, end row)])]: the modules a PEFT adapter of cfg's
    exported family adapts and the projections each holds (several: Phi-3's fused ones, their rows in the
    fused weight; one: rows None, all of them)."""
    own = {e.hf: t for t, e in layer_table(cfg).items() if t in PROJ_IN_DIMS or t in SHARED_EXPERT_TARGETS}
    fused = _fused(cfg) if export_arch(cfg) == "phi3" else {}
    out, inside = [], set()
    for name, pieces in fused.items():
        start, parts = 0, []
        for part, rows in pieces:
            parts.append((own[part], start, start + rows))
            inside.add(part)
            start += rows
        out.append((name[:-len(".weight")], parts))
    return out + [(name[:-len(".weight")], [(t, None, None)]) for name, t in own.items() if name not in inside]


def base_config(cfg: ModelConfig) -> ModelConfig:
    """cfg without adapters or quantization: the layout checkpoints hold."""
    return dataclasses.replace(cfg, lora=LoraConfig(), base_quant="none")


def params_from_tensors(cfg: ModelConfig, get: TensorSource, where: str, mesh=None, names: str = "hf", key=None):
    """Build params from `get(name) -> np.ndarray` (HF layout), each leaf placed as it is built.

    With a mesh every leaf is created with its NamedSharding via make_array_from_callback, which
    hands each device only its slice; a host builds only the part of a leaf its devices hold
    (sharding.host_box: on a mesh whose fsdp axis spans n hosts, 1/n of it), a layer at a time, so
    its memory holds that part and one tensor as read. With cfg.lora the adapters are initialised from
    `key` (default key 0); with cfg.base_quant the projections are quantized on the host before they are
    placed. A checkpoint holding tensors the model does not read (get.names) is refused: see _check_all_read.
    """
    from spjax import model, projection
    get = stack_experts(cfg, split_fused(cfg, get, where, names))
    shapes = model.param_shapes(cfg)
    shardings = shd.param_shardings(cfg, mesh) if mesh is not None else None
    dtype = jnp.dtype(cfg.param_dtype)

    def box(path):  # this host's part of leaf `path`: a slice per dim
        shape = _get(shapes, path).shape
        return tuple(slice(0, n) for n in shape) if mesh is None else shd.host_box(_get(shardings, path), shape)

    def place(path, part, at):  # part: the box `at` of leaf `path`
        want = _get(shapes, path)
        if part.shape != tuple(s.stop - s.start for s in at):  # the fetch functions already checked per-tensor shapes
            raise CheckpointError(f"{where}: {path} has shape {part.shape} in {at}, expected {want.shape}")
        part = part.astype(want.dtype, copy=False)
        if mesh is None:
            return jnp.asarray(part)
        return shd.put_part(part, at, want.shape, _get(shardings, path))

    def fetch(name, e, want, at=()):
        w = get(name)
        try:
            x = e.to_spjax(np.asarray(w))
        except ValueError:
            x = None
        if x is None or x.shape != tuple(want):  # said in the file's layout ([out, in]), not spjax's
            raise CheckpointError(f"{where}: tensor {get.stored(name)!r} has shape {tuple(np.shape(w))}, expected "
                                  f"{e.to_hf(np.empty(want, np.float32)).shape} for {cfg.architecture} config")
        # Cut to this host's box `at` before the cast: a host casts only its part (bf16 -> bf16: no copy).
        return np.asarray(x[at]).astype(dtype, copy=False)

    base_shapes = model.param_shapes(base_config(cfg))
    check_names(cfg, get, where, names)
    params = {}
    for leaf, e in top_table(cfg).items():
        at = box(leaf)
        params[leaf] = place(leaf, fetch(e.name(names), e, base_shapes[leaf].shape, at), at)
    layers = {}
    for leaf, e in layer_table(cfg).items():
        want = base_shapes["layers"][leaf].shape[1:]
        at = box(f"layers/{leaf}")
        rows = range(at[0].start, at[0].stop)  # (all layers: the layer axis is never split)
        layer = lambda i, at=(): fetch(e.name(names).format(i=i), e, want, at)
        if cfg.base_quant != "none" and leaf in QUANTIZED:
            # Quantized layer by layer as read: quantizing the stack holds ~3 fp32 copies of all layers.
            # A layer is quantized whole, then cut to this host's part of the weight and of its scales.
            lead, n_in = QUANTIZED[leaf]
            at_s = box(f"layers/{leaf}_scale")
            arr, scale = stacked(len(rows), lambda k: tuple(
                x[a[1:]] for x, a in zip(quant.quantize(layer(rows[k]), cfg.base_quant, n_in, lead), (at, at_s))))
            layers[f"{leaf}_scale"] = place(f"layers/{leaf}_scale", scale, at_s)
            del scale
        else:
            arr, = stacked(len(rows), lambda k: (layer(rows[k], at[1:]),))
        layers[leaf] = place(f"layers/{leaf}", arr, at)
        del arr
    if cfg.lora.rank:
        key = jax.random.key(0) if key is None else key
        for n, t in enumerate(cfg.lora.targets):
            a, b = (f"layers/{t}_lora_{x}" for x in "ab")
            lead = QUANTIZED[t][0]  # (a mixture's experts: each its own fan-in)
            a_init = jax.vmap(lambda k: projection.lora_a_init(k, _get(shapes, a).shape[1:], lead=lead))(
                jax.random.split(jax.random.fold_in(key, n), cfg.num_layers))
            at = box(a)
            layers[f"{t}_lora_a"] = place(a, np.asarray(a_init)[at], at)
            at = box(b)
            layers[f"{t}_lora_b"] = place(b, np.zeros([s.stop - s.start for s in at]), at)
    params["layers"] = layers
    expected = set(shapes["layers"])
    if set(layers) != expected:
        raise CheckpointError(f"{where}: layer params {sorted(set(layers) ^ expected)} unmatched")
    return params


def check_names(cfg: ModelConfig, get: TensorSource, where: str, names: str = "hf"):
    """The checkpoint holds every tensor the model reads (the first missing one named) and none it would not."""
    get = stack_experts(cfg, split_fused(cfg, get, where, names))
    read = ({e.name(names) for e in top_table(cfg).values()} |
            {e.name(names).format(i=i) for e in layer_table(cfg).values() for i in range(cfg.num_layers)})
    missing = sorted(read - get.names)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {get.stored(missing[0])!r} missing from the checkpoint{more}")
    _check_all_read(cfg, get, read, where, names)


def _check_all_read(cfg: ModelConfig, get: TensorSource, read: set, where: str, names: str):
    """Refuse tensors outside `read` (e.g. an o_proj bias or an MLP bias): spjax would silently drop them.

    Checked before any leaf is read, so a refusal costs no loading time.
    """
    left = sorted(n for n in get.names - read if not n.endswith(_UNREAD_OK_SUFFIXES))
    head = "output.weight" if names == "gguf" else "lm_head.weight"
    if cfg.tie_embeddings and head in left:
        # Tied checkpoints (and tied state_dicts) may store the head too: harmless when it is the embedding.
        embed = top_table(cfg)["embed"].name(names)
        if np.array_equal(np.asarray(get(head)), np.asarray(get(embed))):
            left.remove(head)
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise CheckpointError(f"{where}: tensor(s) {', '.join(map(get.stored, left[:3]))}{more} are not part of spjax's "
                              f"{cfg.architecture} model with this config, so spjax would compute another model than "
                              f"the checkpoint's: check the config (e.g. tie_word_embeddings) or use a supported model")


def merged_layer(cfg: ModelConfig, layer: dict, leaf: str) -> np.ndarray:
    """Host weight of a layer's leaf (layer: that layer's host leaves, host_pieces'): dequantized (float32),
    plus (alpha / r) A B where adapted (float32); else as stored."""
    w = np.asarray(layer[leaf])
    if cfg.base_quant != "none" and leaf in QUANTIZED:
        lead, n_in = QUANTIZED[leaf]
        w = quant.dequantize(w, np.asarray(layer[f"{leaf}_scale"]), cfg.base_quant, n_in, lead, dtype=np.float32)
    if not (cfg.lora.rank and leaf in cfg.lora.targets):
        return w
    from spjax.projection import lora_delta
    a = np.asarray(layer[f"{leaf}_lora_a"], np.float32)
    b = np.asarray(layer[f"{leaf}_lora_b"], np.float32)
    delta = lora_delta(a, b, cfg.lora.scale_of(leaf), batch=QUANTIZED[leaf][0])
    return w.astype(np.float32, copy=False) + delta.reshape(w.shape)


def host_pieces(params):
    """(name, param) for each param outside the layers, then (i, layer i's leaves) for each layer, as numpy on
    every process: gathered a piece at a time as they are taken, so the host never holds the whole model (nor
    the embedding beside the head). A collective: every process takes every piece, in order (hosts that write
    nothing too: `drain`)."""
    for name, x in params.items():
        if name != "layers":
            yield name, jax.tree.map(lambda v: shd.to_host(_copy(v)), x)
    layers = params["layers"]
    for i in range(jax.tree.leaves(layers)[0].shape[0]):
        yield i, jax.tree.map(lambda x: shd.to_host(_layer(x, i)), layers)


@jax.jit
def _copy(x):
    """x as a new array: numpy's view of a jax array stays cached on it, so to_host of a param itself would
    leave its host copy alive as long as the param (the embedding and head, through the rest of an export)."""
    return x + jnp.zeros((), x.dtype)


@jax.jit
def _layer(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)  # (i traced: one program per leaf shape)


def drain(pieces):
    """Take the rest of host_pieces' pieces: this process's part in the gathers, where it writes nothing."""
    for _ in pieces:
        pass


def params_to_tensors(cfg: ModelConfig, params, dtype=None, pieces=None):
    """(HF name, numpy tensor) pairs of a params tree, in the param dtype (then in `dtype`, if given), made a
    layer at a time as they are taken: an export holds one layer of the params and one shard of tensors, not a
    copy of the model (nor a float32 copy of a whole stacked leaf). A LoRA policy's are merged: a plain
    checkpoint of base + adapter. The params are gathered as the pairs are taken (`pieces`: host_pieces(params),
    where the caller drains it): a collective, so every process takes every pair or drains."""
    pieces = host_pieces(params) if pieces is None else pieces
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    # (cast before the HF layout's transposes: their strided copies then move the export dtype's bytes)
    cast = lambda w: w.astype(cfg.param_dtype, copy=False).astype(dtype, copy=False)  # noqa: E731
    top, table = top_table(cfg), layer_table(cfg)
    for i, host in pieces:
        # (each piece and its tensors are let go before the next piece is gathered: the loop's names would
        # hold them through that gather, e.g. the embedding beside the head)
        if isinstance(i, str):  # a param outside the layers
            if i in top:
                tensor = c_order(top[i].to_hf(cast(host)))
                del host
                yield top[i].hf, tensor
                del tensor
            continue
        layer = {e.hf.format(i=i): c_order(e.to_hf(cast(merged_layer(cfg, host, leaf)))) for leaf, e in table.items()}
        del host
        if cfg.moe:
            layer = unstack_experts(cfg, layer, i)
        yield from (fuse(cfg, layer, (i,)) if export_arch(cfg) == "phi3" else layer).items()
        del layer


def tensors_bytes(cfg: ModelConfig, dtype=None) -> int:
    """The bytes params_to_tensors' tensors take (in `dtype`, else the param dtype), from the shapes alone."""
    from spjax import model
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.param_shapes(base_config(cfg))))
    return n * jnp.dtype(dtype or cfg.param_dtype).itemsize


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


__all__ = ["HF_ARCHS", "ARCHITECTURES", "LORA_TARGETS", "PROJ_IN_DIMS", "QUANTIZED", "CheckpointError", "TensorSource", "Entry",
           "layer_table", "top_table", "split_fused", "fuse", "stack_experts", "unstack_experts", "peft_modules", "expert_names", "FUSED_EXPERTS", "fused_experts", "base_config",
           "params_from_tensors", "check_names", "merged_layer", "host_pieces", "drain", "params_to_tensors",
           "tensors_bytes"]
