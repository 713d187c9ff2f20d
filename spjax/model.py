"""A Llama-family decoder (Llama 2/3, Mistral, Ministral 3, Qwen2, Qwen3, Phi-3/4, Gemma 2/3, OLMo 2/3,
SmolLM2/3, Granite 3; Mixtral, Qwen2-MoE and Qwen3-MoE, OLMoE, whose MLPs are mixtures of experts: spjax.moe)
in Flax linen.

Dimension names used in array suffixes:
  B batch, L query length, S key length (== L without a cache, the cache size with one),
  D model width, H query heads, K kv heads, G = H // K, Dh head dim, F mlp width, V vocab, N layers.

Params are a plain nested dict; every weight is created with logical axis names
(`param_logical_axes`) that spjax.sharding maps onto a mesh. Layers are one `nn.scan`, so every
per-layer weight has a leading N axis and a 30-layer model compiles as fast as a 1-layer one.
Attention is causal over buffer slots plus a key-validity mask, which serves right-padded training
batches, left-padded prompts and a preallocated KV cache alike. `attention_impl` picks, at trace
time, between that XLA einsum path, cuDNN's fused flash attention (GPU, bf16/fp16, right-padded
batches without a cache) and Pallas splash attention (TPU: training, scoring and the sampler's
prefill), as ModelConfig.attention asks; kernels in spjax.attention, see docs/perf.md.
Gemma (ModelConfig.gemma) differs by a few lines in Block: norms that scale by 1 + w and follow
attention and the MLP too, a tanh-GELU gate, sqrt(D)-scaled embeddings, scaled and soft-capped scores.
A model whose layers differ in window (Gemma; some Qwen2; OLMo 3) gets a mask, and Gemma 3 and OLMo 3 a rope, of
each kind (`ByKind`) and each layer picks its own: by a select inside the scan, in Python when unrolled.
SmolLM3's NoPE layers rotate nothing (a zero angle where the layer is picked inside the scan); Ministral 3
scales its rotated queries by position; Granite scales embeddings, scores, each block's output and the logits.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from spjax import mlp, moe, rope
from spjax.projection import NORMAL as _normal, expert_adapters as _expert_adapters, param as _param, \
    project as _project, weight as _weight
from spjax.attention import (attend_fused, attend_splash, attend_xla, attention_impl,  # noqa: F401
                             segment_ids)
from spjax.config import ModelConfig
from spjax.decode_attention import attend_decode


def _rms_norm(x, scale, eps, gemma=False, fp32_scale=False):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if gemma:  # Gemma stores scale - 1 and multiplies in fp32 before the cast (transformers' Gemma RMSNorm)
        return (xf * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    if fp32_scale:  # OLMo 2 multiplies in fp32 before the cast too
        return (xf * scale.astype(jnp.float32)).astype(x.dtype)
    return scale.astype(x.dtype) * xf.astype(x.dtype)


class ByKind(NamedTuple):
    """A mask or rope of each kind of layer, for a model with both full and windowed layers."""
    full: Any
    windowed: Any


def _pick(value, windowed):
    """The full-attention or the windowed layer's value where it comes ByKind: chosen in Python for an
    unrolled layer (layer index an int), per scanned layer by a select."""
    if not isinstance(value, ByKind):
        return value
    if isinstance(windowed, bool):
        return value[windowed]
    return jax.tree.map(lambda full, win: jnp.where(windowed, win, full), value.full, value.windowed)


def _of_layer(per_layer: tuple, layer):
    """A per-layer flag of the config for this layer: a Python bool when every layer has the same or the
    layer is unrolled (an int), else traced (the scan's layer index)."""
    if len(set(per_layer)) == 1 or isinstance(layer, int):
        return per_layer[0 if len(set(per_layer)) == 1 else layer]
    return jnp.asarray(per_layer)[layer]


def _residual(cfg: ModelConfig, out_BxLxD):
    """A block's attention or MLP output as it joins the residual stream (Granite: times residual_multiplier)."""
    return out_BxLxD if cfg.residual_multiplier == 1.0 else out_BxLxD * cfg.residual_multiplier


def softcap(x, cap: float):
    """Gemma's tanh soft cap, cap * tanh(x / cap) (cap 0: x)."""
    return cap * jnp.tanh(x / cap) if cap else x


# ---------------------------------------------------------------------------------------------
# Attention (kernels in spjax.attention): XLA einsums serve every case; cuDNN and splash where they apply


class Block(nn.Module):
    """One pre-norm decoder layer; scanned over N with the whole KV cache in the carry.

    W (the mask's last dim) is how many leading key slots are attended: L without a cache, the live
    prefix of the cache buffer (W <= S) with one, so a decode step reads only the slots in use.
    With splash attention the mask is int32 segment ids [B, L] instead (W == L: no cache, or a prefill).
    """

    cfg: ModelConfig
    attention: str = "xla"  # attention_impl's choice: 'xla', 'cudnn', 'xla_fused', 'splash' or 'triton'

    @nn.compact
    def __call__(self, carry, layer, sin_cos, mask_BxLxW, cache_index):
        x_BxLxD, cache = carry
        cfg = self.cfg
        D, H, K, Dh, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        B, L, _ = x_BxLxD.shape
        ones = nn.initializers.zeros if cfg.gemma else nn.initializers.ones  # (Gemma's norms scale by 1 + w)
        w = lambda name, shape, axes, init=_normal: _param(self, name, shape, axes, init, pdt).astype(cdt)
        norm = lambda name, x, dim=D: _rms_norm(x, w(name, (dim,), ("norm",), ones), cfg.rms_norm_eps, cfg.gemma,
                                                cfg.post_norms)
        after = cfg.gemma or cfg.post_norms  # a norm on attention's and the MLP's outputs (OLMo 2: those alone)
        # A model with windowed and full layers (Gemma, some Qwen2, OLMo 3) gets both masks (and Gemma 3
        # and OLMo 3 both ropes) and picks this layer's.
        windowed = _of_layer(cfg.windowed, layer)
        mask_BxLxW, sin_cos = _pick(mask_BxLxW, windowed), _pick(sin_cos, windowed)
        sin_cos, q_scale_BxL = sin_cos[:2], (sin_cos[2] if len(sin_cos) > 2 else None)
        W = mask_BxLxW.shape[-1]
        roped = _of_layer(cfg.roped, layer)  # (SmolLM3's NoPE layers: no rotation)
        if not isinstance(roped, bool):  # angle 0 where not roped: x * 1 + rotate_half(x) * 0 is x exactly
            sin_cos = (jnp.where(roped, sin_cos[0], 0), jnp.where(roped, sin_cos[1], 1))

        h = x_BxLxD if cfg.post_norms else norm("attn_norm", x_BxLxD)
        q_BxLxHxDh = _project(self, "q", "BLD,DHk->BLHk", h, (D, H, Dh), ("embed", "heads", "head_dim"))
        k_BxLxKxDh = _project(self, "k", "BLD,DKk->BLKk", h, (D, K, Dh), ("embed", "kv_heads", "head_dim"))
        v_BxLxKxDh = _project(self, "v", "BLD,DKk->BLKk", h, (D, K, Dh), ("embed", "kv_heads", "head_dim"))
        if cfg.qkv_bias:
            zeros = nn.initializers.zeros
            q_BxLxHxDh += w("q_bias", (H, Dh), ("heads", "head_dim"), zeros)
            k_BxLxKxDh += w("k_bias", (K, Dh), ("kv_heads", "head_dim"), zeros)
            v_BxLxKxDh += w("v_bias", (K, Dh), ("kv_heads", "head_dim"), zeros)
        if cfg.qk_norm_full:  # OLMoE: one norm over all heads' q (and k), a scale per dim of them
            q_BxLxHxDh = norm("q_norm", q_BxLxHxDh.reshape(B, L, H * Dh), H * Dh).reshape(q_BxLxHxDh.shape)
            k_BxLxKxDh = norm("k_norm", k_BxLxKxDh.reshape(B, L, K * Dh), K * Dh).reshape(k_BxLxKxDh.shape)
        elif cfg.qk_norm:  # Qwen3, Gemma 3: one scale over head_dim, shared by every head
            q_BxLxHxDh, k_BxLxKxDh = norm("q_norm", q_BxLxHxDh, Dh), norm("k_norm", k_BxLxKxDh, Dh)
        if roped is not False:
            q_BxLxHxDh = rope.rotate(q_BxLxHxDh, *sin_cos)
            k_BxLxKxDh = rope.rotate(k_BxLxKxDh, *sin_cos)
        if q_scale_BxL is not None:  # Ministral 3: rotated queries scaled by position (keys and cache as they are)
            q_BxLxHxDh = q_BxLxHxDh * q_scale_BxL[:, :, None, None]

        own = cache is not None and cache["k"].ndim == 4  # this layer's own [B, K, S, Dh] buffers (unstack_cache)
        scale, cap = cfg.attention_multiplier or (cfg.query_scale or Dh) ** -0.5, cfg.attn_softcap
        if cache is not None and self.attention != "triton":  # (the decode kernel writes its own token)
            # The whole [N, B, K, S, Dh] buffer rides in the scan carry and only this layer's new
            # rows are written, so XLA updates it in place instead of rebuilding it every step.
            # Heads before slots: each (row, kv head) reads one contiguous [W, Dh] block, which a
            # batched matmul takes as is (no per-step transpose of the cache).
            at = (0, 0, cache_index, 0) if own else (layer, 0, 0, cache_index, 0)
            new = {"k": k_BxLxKxDh, "v": v_BxLxKxDh}
            new = {n: x.transpose(0, 2, 1, 3) if own else x.transpose(0, 2, 1, 3)[None] for n, x in new.items()}
            cache = {n: jax.lax.dynamic_update_slice(cache[n], new[n].astype(cache[n].dtype), at) for n in ("k", "v")}
        if self.attention == "triton":  # one token over its layer's buffer: written and attended by one kernel
            attn_BxHxDh, k_c, v_c = attend_decode(q_BxLxHxDh[:, 0], k_BxLxKxDh[:, 0], v_BxLxKxDh[:, 0],
                                                  mask_BxLxW[:, 0], cache["k"], cache["v"], cache_index, scale=scale)
            cache, attn_BxLxHxDh = {"k": k_c, "v": v_c}, attn_BxHxDh[:, None]
        elif self.attention in ("splash", "cudnn", "xla_fused"):  # kernels whose window is static: one per kind
            if self.attention == "splash":  # a prefill's L slots hold exactly the new k, v: no cache read
                kernel = lambda window, *qkv: attend_splash(*qkv, mask_BxLxW, window=window, scale=scale, softcap=cap)
            else:
                kernel = lambda window, *qkv: attend_fused(*qkv, window=window if window and window < L else None,
                                                           scale=scale,
                                                           implementation="cudnn" if self.attention == "cudnn" else "xla")
            qkv = (q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh)
            if isinstance(windowed, bool):
                attn_BxLxHxDh = kernel(cfg.sliding_window if windowed else None, *qkv)
            else:
                attn_BxLxHxDh = jax.lax.cond(windowed, functools.partial(kernel, cfg.sliding_window),
                                             functools.partial(kernel, None), *qkv)
        elif cache is not None:  # the window: a prefix of the layer's buffer (all of it when W == S)
            window = ((lambda c: jax.lax.slice_in_dim(c, 0, W, axis=2)) if own else
                      (lambda c: jax.lax.dynamic_slice(c, (layer, 0, 0, 0, 0), (1, B, K, W, Dh))[0]))
            attn_BxLxHxDh = attend_xla(q_BxLxHxDh, window(cache["k"]), window(cache["v"]), mask_BxLxW, scale=scale,
                                       softcap=cap)
        else:
            attn_BxLxHxDh = attend_xla(q_BxLxHxDh, k_BxLxKxDh.transpose(0, 2, 1, 3),
                                       v_BxLxKxDh.transpose(0, 2, 1, 3), mask_BxLxW, scale=scale, softcap=cap)
        out_BxLxD = _project(self, "o", "BLHk,HkD->BLD", attn_BxLxHxDh, (H, Dh, D), ("heads", "head_dim", "embed"))
        x_BxLxD = x_BxLxD + _residual(cfg, norm("attn_out_norm", out_BxLxD) if after else out_BxLxD)

        h = x_BxLxD if cfg.post_norms else norm("mlp_norm", x_BxLxD)
        if cfg.moe:  # Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (spjax.moe)
            E = cfg.num_experts
            router_DxE = w("router", (D, E), ("embed", "experts"))  # (never quantized: small, and it picks)
            specs = [(f"experts_{n}", shape, ("experts",) + axes) for n, shape, axes in (
                ("gate", (E, D, F), ("embed", "mlp")), ("up", (E, D, F), ("embed", "mlp")),
                ("down", (E, F, D), ("mlp", "embed")))]
            experts = [_weight(self, *spec, n_in=1, lead=1) for spec in specs]
            adapters = [_expert_adapters(self, *spec) for spec in specs]  # (None where lora.targets skips one)

            def mixture(h, router_DxE, stored, adapters):
                return moe.mlp(cfg, h, router_DxE, *(read(*leaves) for (_, read), leaves in zip(experts, stored)),
                               adapters=adapters)
            if cfg.lora.rank:  # a frozen base, as spjax.projection's: its compute-dtype (dequantized) copy is remade
                mixture = jax.checkpoint(mixture, policy=_MOE_SAVED)  # in the backward pass, not kept per layer
            out_BxLxD = mixture(h, router_DxE, [stored for stored, _ in experts], adapters)
            if cfg.shared_expert_size:  # Qwen2-MoE: an expert every token takes (Fs wide), scaled by sigmoid(x w)
                Fs = cfg.shared_expert_size
                gate_BxLxFs = _project(self, "shared_gate", "BLD,DF->BLF", h, (D, Fs), ("embed", "mlp"))
                up_BxLxFs = _project(self, "shared_up", "BLD,DF->BLF", h, (D, Fs), ("embed", "mlp"))
                shared_BxLxD = _project(self, "shared_down", "BLF,FD->BLD", nn.silu(gate_BxLxFs) * up_BxLxFs,
                                        (Fs, D), ("mlp", "embed"))
                scale_BxLx1 = jax.nn.sigmoid(h @ w("shared_expert_gate", (D, 1), ("embed", None)))
                out_BxLxD = out_BxLxD + scale_BxLx1 * shared_BxLxD
            return (x_BxLxD + _residual(cfg, out_BxLxD), cache), None
        if mlp.fast_path(cfg):  # the same params (and creation order), a CPU-friendly backward pass
            weights = (w("gate", (D, F), ("embed", "mlp")), w("up", (D, F), ("embed", "mlp")),
                       w("down", (F, D), ("mlp", "embed")))
            return (x_BxLxD + _residual(cfg, mlp.gated_mlp(h, *weights)), cache), None
        gate_BxLxF = _project(self, "gate", "BLD,DF->BLF", h, (D, F), ("embed", "mlp"))
        up_BxLxF = _project(self, "up", "BLD,DF->BLF", h, (D, F), ("embed", "mlp"))
        act = functools.partial(nn.gelu, approximate=True) if cfg.gemma else nn.silu  # Gemma's gelu_pytorch_tanh
        out_BxLxD = _project(self, "down", "BLF,FD->BLD", act(gate_BxLxF) * up_BxLxF, (F, D), ("mlp", "embed"))
        x_BxLxD = x_BxLxD + _residual(cfg, norm("mlp_out_norm", out_BxLxD) if after else out_BxLxD)
        return (x_BxLxD, cache), None


_MOE_SAVED = jax.checkpoint_policies.save_only_these_names(moe.ACTIVATIONS)
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nn.Module):
    cfg: ModelConfig
    attention: str = "xla"  # the Blocks' attention path (attention_impl); params do not depend on it
    unstacked: bool = False  # params["layers"] is a tuple of per-layer dicts (unstack_layers), run unrolled

    def setup(self):
        cfg = self.cfg
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat])
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.attention)
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = self.param("embed", nn.with_logical_partitioning(_normal, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.hidden_size), pdt)
        ones = nn.initializers.zeros if cfg.gemma else nn.initializers.ones
        self.final_norm = self.param("final_norm", nn.with_logical_partitioning(ones, ("norm",)),
                                     (cfg.hidden_size,), pdt)
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", nn.with_logical_partitioning(_normal, ("embed", "vocab")),
                                      (cfg.hidden_size, cfg.vocab_size), pdt)

    def __call__(self, tokens_BxL, positions_BxL, kv_mask_BxS, cache=None, cache_index=0, segment_ids_BxS=None):
        """Final-norm hidden states [B, L, D] (compute dtype) and the updated cache.

        With a cache, S = kv_mask_BxS.shape[1] may be less than the buffer: only slots [0, S) are
        attended (they must cover the new tokens' slots). segment_ids_BxS (no cache): tokens attend
        only within their segment.
        """
        cfg = self.cfg
        cdt = jnp.dtype(cfg.compute_dtype)
        B, L = tokens_BxL.shape
        S = kv_mask_BxS.shape[1]
        if cache is not None:
            if S > cache_slots(cache):
                raise ValueError(f"kv mask covers {S} slots but the cache has {cache_slots(cache)}")
            if isinstance(cache_index, int) and cache_index + L > S:
                raise ValueError(f"tokens go to slots [{cache_index}, {cache_index + L}) but only {S} are attended")
        x_BxLxD = jnp.take(self.embed, tokens_BxL, axis=0).astype(cdt)
        if cfg.gemma:  # sqrt(D) rounded to the compute dtype first, as transformers' Gemma does
            x_BxLxD = x_BxLxD * jnp.asarray(cfg.hidden_size ** 0.5, cdt)
        if cfg.embedding_multiplier != 1.0:  # Granite
            x_BxLxD = x_BxLxD * cfg.embedding_multiplier

        # LongRoPE picks its divisors per sequence by its real tokens' positions (a cached call's tokens:
        # all of its rows' new tokens, a left-padded prompt's padding counting up into it)
        sin_cos = rope.sin_cos(positions_BxL, cfg, cdt, kv_mask_BxS if cache is None and S == L else None)
        if cfg.rope_local_theta and any(cfg.windowed):  # Gemma 3, OLMo 3: windowed layers rotate by their own rope
            local = dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_type="default", rope_factor=1.0)
            local = rope.sin_cos(positions_BxL, local, cdt)
            sin_cos = local if all(cfg.windowed) else ByKind(sin_cos, local)  # Block picks
        if cfg.query_scale_beta:  # (a third member beside sin, cos: Block scales q by it)
            q_scale_BxL = rope.query_scale(positions_BxL, cfg).astype(cdt)
            sin_cos = (ByKind(*(v + (q_scale_BxL,) for v in sin_cos)) if isinstance(sin_cos, ByKind)
                       else sin_cos + (q_scale_BxL,))

        if self.attention == "splash":  # the kernel masks by slot and segment: no [B, L, S] mask is built
            mask_BxLxS = segment_ids(kv_mask_BxS, segment_ids_BxS)  # [B, S], S == L
        else:
            # Causal over buffer slots: query l sits at slot cache_index + l and sees slots <= its own.
            q_slot_L = cache_index + jnp.arange(L)
            mask_BxLxS = ((jnp.arange(S)[None, None, :] <= q_slot_L[None, :, None])
                          & kv_mask_BxS[:, None, :].astype(bool))
            if segment_ids_BxS is not None:
                mask_BxLxS &= segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :]
            if any(cfg.windowed):
                if cache is None:
                    k_pos_BxS = positions_BxL
                else:  # positions are not stored in the cache: a valid slot's position is its rank
                    k_pos_BxS = jnp.cumsum(kv_mask_BxS.astype(jnp.int32), axis=1) - 1  # valid slots count up
                window_BxLxS = mask_BxLxS & ((positions_BxL[:, :, None] - k_pos_BxS[:, None, :]) < cfg.sliding_window)
                mask_BxLxS = window_BxLxS if all(cfg.windowed) else ByKind(mask_BxLxS, window_BxLxS)  # Block picks

        if self.unstacked:
            own = cache is not None and isinstance(cache["k"], tuple)  # one buffer per layer (unstack_cache)
            for n, layer_params in enumerate(self.variables["params"]["layers"]):
                layer_cache = {k: v[n] for k, v in cache.items()} if own else cache
                (x_BxLxD, layer_cache), _ = Block(cfg, self.attention, parent=None).apply(
                    {"params": layer_params}, (x_BxLxD, layer_cache), n, sin_cos, mask_BxLxS, cache_index)
                cache = {k: v[:n] + (layer_cache[k],) + v[n + 1:] for k, v in cache.items()} if own else layer_cache
        else:
            (x_BxLxD, cache), _ = self.layers((x_BxLxD, cache), jnp.arange(cfg.num_layers), sin_cos, mask_BxLxS,
                                              cache_index)
        return _rms_norm(x_BxLxD, self.final_norm, cfg.rms_norm_eps, cfg.gemma, cfg.post_norms), cache


# ---------------------------------------------------------------------------------------------
# Functional API: params are plain pytrees passed in; nothing is closed over.


def _dummy_inputs(cfg):
    return jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool)


def init_params(cfg: ModelConfig, key) -> dict:
    """Randomly initialised params (HF-style normal(0.02)); jit with out_shardings to be born sharded."""
    return nn.unbox(Decoder(cfg).init(key, *_dummy_inputs(cfg))["params"])


@functools.lru_cache(maxsize=8)
def _boxed_shapes(cfg: ModelConfig):
    # One trace of the whole model's init per config: a run asks for shapes and axes ~30 times.
    return jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), *_dummy_inputs(cfg)))["params"]


def param_logical_axes(cfg: ModelConfig):
    """The params tree with a PartitionSpec of logical axis names at each leaf."""
    return nn.get_partition_spec(_boxed_shapes(cfg))


def param_shapes(cfg: ModelConfig):
    """The params tree of jax.ShapeDtypeStruct."""
    return nn.meta.map_axis_meta(lambda box: box.value, _boxed_shapes(cfg))


def cast_params(cfg: ModelConfig, params):
    """Floating params in the compute dtype: what every layer casts them to anyway, done once.

    A loop that reuses the weights many times (the sampler's decode) then reads half the bytes of
    fp32 master params instead of converting them again on every step. Results are bit-identical.
    """
    cdt = jnp.dtype(cfg.compute_dtype)
    return jax.tree.map(lambda p: p.astype(cdt) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def unstack_layers(cfg: ModelConfig, params):
    """params with "layers" as a tuple of N per-layer dicts: for loops that rerun the model many times.

    A scan over stacked layers slices each layer's weights out of the stack on every pass, and XLA
    materialises those slices (a copy of every weight per decode step: on CPU a fifth of a SmolLM2
    decode step, and a known decode-bandwidth sink on GPU). Sliced once, outside the sampler's
    loop, the layers then run unrolled on the stored slices. apply() accepts either layout; the
    unstacked one costs N-fold compile time of the layer body and a copy of the layer weights.
    """
    layers = params["layers"]
    return {**params, "layers": tuple(jax.tree.map(lambda x: x[n], layers) for n in range(cfg.num_layers))}


def apply(cfg: ModelConfig, params, tokens_BxL, positions_BxL=None, kv_mask_BxS=None,
          cache: Optional[dict] = None, cache_index=0, *, right_padded: bool = False, segment_ids_BxL=None):
    """Hidden states [B, L, D] after the final norm, and the updated cache (None without one).

    Without a cache, kv_mask_BxS is the token validity mask of tokens_BxL (default all valid) and
    positions default to 0..L-1. right_padded=True promises that each row's valid tokens come first
    (the mask is a prefix): the GPU may then use a causal flash-attention kernel, and hidden states
    at padded positions are unspecified (real positions are exact either way).
    With a cache (`init_cache`), the L new tokens are written at slots [cache_index, cache_index + L)
    and kv_mask_BxS marks valid slots of the leading S slots of the buffer, including the new ones;
    only those S slots are attended, so a decode step can pass the live prefix of the buffer.
    segment_ids_BxL (positive ints, no cache; e.g. packed pairs): attention stays within a segment;
    positions must then count up by one within each segment (the sliding window's kernels assume it).
    """
    B, L = tokens_BxL.shape
    if segment_ids_BxL is not None and cache is not None:
        raise ValueError("segment_ids_BxL: only without a cache")
    default_positions = positions_BxL is None
    if positions_BxL is None:
        positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    if kv_mask_BxS is None:
        kv_mask_BxS = jnp.ones((B, L), bool)
        right_padded = True  # all valid is a prefix too
    # The sampler's prefill: cache slots [0, L) are exactly the new tokens, so the kernels of the
    # no-cache case serve it (left padding is segment 0).
    prefill = cache is not None and isinstance(cache_index, int) and cache_index == 0 and kv_mask_BxS.shape[1] == L
    # A one-token step over per-layer buffers, attending all their slots, may take the decode kernel.
    layer_slots = (cache_slots(cache) if cache is not None and isinstance(cache["k"], tuple)
                   and kv_mask_BxS.shape[1] == cache_slots(cache) else 0)
    impl = attention_impl(cfg, cached=cache is not None, right_padded=right_padded, q_len=L,
                          default_positions=default_positions, prefill=prefill,
                          segmented=segment_ids_BxL is not None, layer_slots=layer_slots)
    unstacked = isinstance(params["layers"], (tuple, list))
    return Decoder(cfg, impl, unstacked).apply({"params": params}, tokens_BxL, positions_BxL, kv_mask_BxS, cache,
                                               cache_index, segment_ids_BxL)


def lm_head(cfg: ModelConfig, params):
    """The [D, V] output projection in the param dtype (the transposed embedding when tied)."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def unembed(cfg: ModelConfig, params, hidden_BxLxD):
    """float32 logits [B, L, V] for hidden states (any subset of positions): one matmul in the
    hidden states' dtype, accumulated in fp32."""
    return head_logits(jnp.einsum("BLD,DV->BLV", hidden_BxLxD, lm_head(cfg, params).astype(hidden_BxLxD.dtype),
                                  preferred_element_type=jnp.float32), cfg)


def head_logits(raw_BxLxV, cfg: ModelConfig):
    """The head's fp32 matmul output as the model's logits: Granite's divided by logits_scaling, Gemma's soft-capped."""
    return softcap(raw_BxLxV if cfg.logits_scaling == 1.0 else raw_BxLxV / cfg.logits_scaling, cfg.final_softcap)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """A zeroed KV cache {'k','v': [N, B, K, S, Dh]} in the compute dtype."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return {n: jnp.zeros(shape, dtype or jnp.dtype(cfg.compute_dtype)) for n in ("k", "v")}


CACHE_LOGICAL_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


def unstack_cache(cache: dict) -> dict:
    """{'k','v': N buffers [B, K, S, Dh]}: a cache for layers unrolled over unstack_layers' slices.

    A layer's attention then reads its own buffer. Out of the stack, XLA:GPU copies the layer's
    window to a fresh buffer before the attention matmuls on every decode step (a matmul operand is
    no slice of a larger buffer): on an H200 (1B shape, batch 64) those copies took a fifth of each
    step. apply() takes either layout with unstacked params and returns the one it was given.
    """
    return {n: tuple(c[i] for i in range(c.shape[0])) for n, c in cache.items()}


def cache_slots(cache: dict) -> int:
    """S, the slots of a cache in either layout."""
    k = cache["k"][0] if isinstance(cache["k"], tuple) else cache["k"]
    return k.shape[-2]


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg: ModelConfig, params, input_ids_BxL):
    """float32 logits [B, L, V] for an unpadded int32 batch."""
    hidden_BxLxD, _ = apply(cfg, params, input_ids_BxL)
    return unembed(cfg, params, hidden_BxLxD)
