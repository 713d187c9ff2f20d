"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in Flax linen.

Dimension names used in array suffixes:
  B batch, L query length, S key length (== L without a cache, the cache size with one),
  D model width, H query heads, K kv heads, G = H // K, Dh head dim, F mlp width, V vocab, N layers.

Params are a plain nested dict; every weight is created with logical axis names
(`param_logical_axes`) that spjax.sharding maps onto a mesh. Layers are one `nn.scan`, so every
per-layer weight has a leading N axis and a 30-layer model compiles as fast as a 1-layer one.
Attention is causal over buffer slots plus a key-validity mask, which serves right-padded training
batches, left-padded prompts and a preallocated KV cache alike.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spjax.config import ModelConfig

_NEG = -1e30  # finite, so a fully masked (padding) query row gives uniform weights, not NaN


def _dtype(name):
    return jnp.dtype(name)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[Dh/2] inverse frequencies, computed in float32 like transformers (incl. llama3 scaling)."""
    dh = cfg.head_dim
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / dh))).astype(np.float32)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def _rope(x_BxLxNxDh, sin_BxLxDh, cos_BxLxDh):
    half = x_BxLxNxDh.shape[-1] // 2
    rot = jnp.concatenate([-x_BxLxNxDh[..., half:], x_BxLxNxDh[..., :half]], axis=-1)
    return x_BxLxNxDh * cos_BxLxDh[:, :, None] + rot * sin_BxLxDh[:, :, None]


def _rms_norm(x, scale, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * xf.astype(x.dtype)


def _param(module, name, shape, axes, init, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


_normal = nn.initializers.normal(0.02)


class Block(nn.Module):
    """One pre-norm decoder layer; scanned over N with a per-layer slice of the KV cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, rope, mask_BxLxS, cache_index):
        x_BxLxD, cache = carry
        cfg = self.cfg
        D, H, K, Dh, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        pdt, cdt = _dtype(cfg.param_dtype), _dtype(cfg.compute_dtype)
        B, L, _ = x_BxLxD.shape
        ones = nn.initializers.ones
        w = lambda name, shape, axes, init=_normal: _param(self, name, shape, axes, init, pdt).astype(cdt)

        h = _rms_norm(x_BxLxD, w("attn_norm", (D,), ("norm",), ones), cfg.rms_norm_eps)
        q_BxLxHxDh = jnp.einsum("BLD,DHk->BLHk", h, w("q", (D, H, Dh), ("embed", "heads", "head_dim")))
        k_BxLxKxDh = jnp.einsum("BLD,DKk->BLKk", h, w("k", (D, K, Dh), ("embed", "kv_heads", "head_dim")))
        v_BxLxKxDh = jnp.einsum("BLD,DKk->BLKk", h, w("v", (D, K, Dh), ("embed", "kv_heads", "head_dim")))
        if cfg.qkv_bias:
            zeros = nn.initializers.zeros
            q_BxLxHxDh += w("q_bias", (H, Dh), ("heads", "head_dim"), zeros)
            k_BxLxKxDh += w("k_bias", (K, Dh), ("kv_heads", "head_dim"), zeros)
            v_BxLxKxDh += w("v_bias", (K, Dh), ("kv_heads", "head_dim"), zeros)
        sin, cos = rope
        q_BxLxHxDh = _rope(q_BxLxHxDh, sin, cos)
        k_BxLxKxDh = _rope(k_BxLxKxDh, sin, cos)

        if cache is not None:
            # The whole [N, B, S, K, Dh] buffer rides in the scan carry and only this layer's new
            # rows are written, so XLA updates it in place instead of rebuilding it every step.
            at = (layer, 0, cache_index, 0, 0)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k_BxLxKxDh[None].astype(cache["k"].dtype), at),
                     "v": jax.lax.dynamic_update_slice(cache["v"], v_BxLxKxDh[None].astype(cache["v"].dtype), at)}
            k_BxSxKxDh = jax.lax.dynamic_index_in_dim(cache["k"], layer, 0, keepdims=False)
            v_BxSxKxDh = jax.lax.dynamic_index_in_dim(cache["v"], layer, 0, keepdims=False)
        else:
            k_BxSxKxDh, v_BxSxKxDh = k_BxLxKxDh, v_BxLxKxDh

        G = H // K
        q_BxLxKxGxDh = q_BxLxHxDh.reshape(B, L, K, G, Dh)
        scores = jnp.einsum("BLKGk,BSKk->BKGLS", q_BxLxKxGxDh, k_BxSxKxDh.astype(cdt),
                            preferred_element_type=jnp.float32) * (Dh ** -0.5)
        scores = jnp.where(mask_BxLxS[:, None, None], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(cdt)
        attn_BxLxKxGxDh = jnp.einsum("BKGLS,BSKk->BLKGk", probs, v_BxSxKxDh.astype(cdt))
        attn_BxLxHxDh = attn_BxLxKxGxDh.reshape(B, L, H, Dh)
        x_BxLxD = x_BxLxD + jnp.einsum("BLHk,HkD->BLD", attn_BxLxHxDh,
                                       w("o", (H, Dh, D), ("heads", "head_dim", "embed")))

        h = _rms_norm(x_BxLxD, w("mlp_norm", (D,), ("norm",), ones), cfg.rms_norm_eps)
        gate_BxLxF = jnp.einsum("BLD,DF->BLF", h, w("gate", (D, F), ("embed", "mlp")))
        up_BxLxF = jnp.einsum("BLD,DF->BLF", h, w("up", (D, F), ("embed", "mlp")))
        x_BxLxD = x_BxLxD + jnp.einsum("BLF,FD->BLD", nn.silu(gate_BxLxF) * up_BxLxF,
                                       w("down", (F, D), ("mlp", "embed")))
        return (x_BxLxD, cache), None


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nn.Module):
    cfg: ModelConfig

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
        )(cfg)
        pdt = _dtype(cfg.param_dtype)
        self.embed = self.param("embed", nn.with_logical_partitioning(_normal, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.hidden_size), pdt)
        self.final_norm = self.param("final_norm", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                                     (cfg.hidden_size,), pdt)
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", nn.with_logical_partitioning(_normal, ("embed", "vocab")),
                                      (cfg.hidden_size, cfg.vocab_size), pdt)

    def __call__(self, tokens_BxL, positions_BxL, kv_mask_BxS, cache=None, cache_index=0):
        """Final-norm hidden states [B, L, D] (compute dtype) and the updated cache."""
        cfg = self.cfg
        cdt = _dtype(cfg.compute_dtype)
        B, L = tokens_BxL.shape
        S = kv_mask_BxS.shape[1]
        x_BxLxD = jnp.take(self.embed, tokens_BxL, axis=0).astype(cdt)

        angles_BxLxDh2 = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
        angles_BxLxDh = jnp.concatenate([angles_BxLxDh2, angles_BxLxDh2], axis=-1)
        rope = (jnp.sin(angles_BxLxDh).astype(cdt), jnp.cos(angles_BxLxDh).astype(cdt))

        # Causal over buffer slots: query l sits at slot cache_index + l and sees slots <= its own.
        q_slot_L = cache_index + jnp.arange(L)
        mask_BxLxS = (jnp.arange(S)[None, None, :] <= q_slot_L[None, :, None]) & kv_mask_BxS[:, None, :].astype(bool)
        if cfg.sliding_window is not None:
            if cache is None:
                k_pos_BxS = positions_BxL
            else:  # positions are not stored in the cache: a valid slot's position is its rank
                k_pos_BxS = jnp.cumsum(kv_mask_BxS.astype(jnp.int32), axis=1) - 1  # valid slots count up
            mask_BxLxS &= (positions_BxL[:, :, None] - k_pos_BxS[:, None, :]) < cfg.sliding_window

        (x_BxLxD, cache), _ = self.layers((x_BxLxD, cache), jnp.arange(cfg.num_layers), rope, mask_BxLxS,
                                          cache_index)
        return _rms_norm(x_BxLxD, self.final_norm, cfg.rms_norm_eps), cache

    def unembed(self, hidden_BxLxD):
        """Logits in float32 (accumulated in fp32 whatever the compute dtype)."""
        w_DxV = self.embed.T if self.cfg.tie_embeddings else self.lm_head
        return jnp.einsum("BLD,DV->BLV", hidden_BxLxD, w_DxV.astype(hidden_BxLxD.dtype),
                          preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------
# Functional API: params are plain pytrees passed in; nothing is closed over.


def _dummy_inputs(cfg):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return tokens, tokens, jnp.ones((1, 1), bool)


def init_params(cfg: ModelConfig, key) -> dict:
    """Randomly initialised params (HF-style normal(0.02)); jit with out_shardings to be born sharded."""
    return nn.unbox(Decoder(cfg).init(key, *_dummy_inputs(cfg))["params"])


def param_logical_axes(cfg: ModelConfig):
    """The params tree with a PartitionSpec of logical axis names at each leaf."""
    boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), *_dummy_inputs(cfg)))["params"]
    return nn.get_partition_spec(boxed)


def param_shapes(cfg: ModelConfig):
    """The params tree of jax.ShapeDtypeStruct."""
    return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def apply(cfg: ModelConfig, params, tokens_BxL, positions_BxL=None, kv_mask_BxS=None,
          cache: Optional[dict] = None, cache_index=0):
    """Hidden states [B, L, D] after the final norm, and the updated cache (None without one).

    Without a cache, kv_mask_BxS is the token validity mask of tokens_BxL (default all valid) and
    positions default to 0..L-1. With a cache (`init_cache`), the L new tokens are written at slots
    [cache_index, cache_index + L) and kv_mask_BxS marks valid slots of the whole buffer,
    including the new ones.
    """
    B, L = tokens_BxL.shape
    if positions_BxL is None:
        positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    if kv_mask_BxS is None:
        kv_mask_BxS = jnp.ones((B, L), bool)
    return Decoder(cfg).apply({"params": params}, tokens_BxL, positions_BxL, kv_mask_BxS, cache, cache_index)


def unembed(cfg: ModelConfig, params, hidden_BxLxD):
    """float32 logits [B, L, V] for hidden states (any subset of positions)."""
    return Decoder(cfg).apply({"params": params}, hidden_BxLxD, method=Decoder.unembed)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """A zeroed KV cache {'k','v': [N, B, S, K, Dh]} in the compute dtype."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or _dtype(cfg.compute_dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


CACHE_LOGICAL_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg: ModelConfig, params, input_ids_BxL):
    """float32 logits [B, L, V] for an unpadded int32 batch."""
    hidden_BxLxD, _ = apply(cfg, params, input_ids_BxL)
    return unembed(cfg, params, hidden_BxLxD)
