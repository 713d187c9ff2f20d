"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in Flax linen.

Dimension names used in array suffixes:
  B batch, L query length, S key length (== L without a cache, the cache size with one),
  D model width, H query heads, K kv heads, G = H // K, Dh head dim, F mlp width, V vocab, N layers.

Params are a plain nested dict; every weight is created with logical axis names
(`param_logical_axes`) that spjax.sharding maps onto a mesh. Layers are one `nn.scan`, so every
per-layer weight has a leading N axis and a 30-layer model compiles as fast as a 1-layer one.
Attention is causal over buffer slots plus a key-validity mask, which serves right-padded training
batches, left-padded prompts and a preallocated KV cache alike. `attention_impl` picks, at trace
time, between that XLA einsum path and cuDNN's fused flash attention (GPU, bf16/fp16, right-padded
batches without a cache), as ModelConfig.attention asks; see docs/perf.md.
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


# ---------------------------------------------------------------------------------------------
# Attention: one XLA einsum path that serves every case, and cuDNN flash attention where it applies


def _gpu_is_cuda() -> bool:
    if jax.default_backend() != "gpu":
        return False
    try:
        return "rocm" not in jax.devices()[0].client.platform_version.lower()
    except Exception:  # noqa: BLE001 - an unknown client: assume CUDA, the usual GPU
        return True


def attention_impl(cfg: ModelConfig, *, cached: bool, right_padded: bool, q_len: int,
                   default_positions: bool = True) -> str:
    """'cudnn' or 'xla' for one attention call, decided at trace time from the backend and shapes.

    cuDNN's flash kernel (never materialises the [L, S] scores: memory linear in L, and it skips
    the masked half) runs on CUDA GPUs for a bf16/fp16 forward without a cache over a right-padded
    batch (valid tokens first: causality alone then hides every pad key from every real query),
    head_dim a multiple of 8 up to 128, and a sliding window only where positions are the default
    0..L-1. Everything else (CPU, TPU, fp32, cached prefill/decode, left padding) takes the XLA path.
    cfg.attention (part of the jit cache key, validated by ModelConfig) overrides the backend check:
    auto decides as above; xla forces the einsum path everywhere; cudnn asks for cuDNN wherever the
    call qualifies (jax raises where cuDNN cannot run); xla_fused runs the cuDNN path's
    jax.nn.dot_product_attention call with implementation='xla' (a CPU check of it).
    """
    mode = cfg.attention
    fused_ok = not cached and right_padded and (cfg.sliding_window is None or cfg.sliding_window >= q_len
                                                or default_positions)
    if mode == "xla_fused":
        return "xla_fused" if fused_ok else "xla"
    cudnn_ok = (fused_ok and cfg.compute_dtype in ("bfloat16", "float16")
                and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128)
    if mode == "xla" or not cudnn_ok:
        return "xla"
    return "cudnn" if mode == "cudnn" or _gpu_is_cuda() else "xla"


def attend_xla(q_BxLxHxDh, k_BxKxSxDh, v_BxKxSxDh, mask_BxLxS):
    """Masked softmax attention as two einsums; scores and softmax in fp32, output in q's dtype.

    Grouped-query heads share their kv head through the G axis, so K/V are never repeated.
    """
    B, L, H, Dh = q_BxLxHxDh.shape
    K = k_BxKxSxDh.shape[1]
    cdt = q_BxLxHxDh.dtype
    q_BxLxKxGxDh = q_BxLxHxDh.reshape(B, L, K, H // K, Dh)
    scores = jnp.einsum("BLKGk,BKSk->BKGLS", q_BxLxKxGxDh, k_BxKxSxDh.astype(cdt),
                        preferred_element_type=jnp.float32) * (Dh ** -0.5)
    scores = jnp.where(mask_BxLxS[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(cdt)
    attn_BxLxKxGxDh = jnp.einsum("BKGLS,BKSk->BLKGk", probs, v_BxKxSxDh.astype(cdt))
    return attn_BxLxKxGxDh.reshape(B, L, H, Dh)


def attend_fused(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, *, window: Optional[int], implementation: str):
    """Causal self-attention through jax.nn.dot_product_attention (no cache, right-padded rows).

    implementation='cudnn' is the GPU path; 'xla' runs the same call on any backend, which is how the
    tests check on CPU that this call means the same as attend_xla on every real (unpadded) query.
    Queries past a row's length attend to what precedes them, pads included: callers ignore them.
    """
    local = None if window is None else (window - 1, 0)  # keys with q_pos - k_pos < window
    return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, is_causal=True,
                                        local_window_size=local, scale=q_BxLxHxDh.shape[-1] ** -0.5,
                                        implementation=implementation)


class Block(nn.Module):
    """One pre-norm decoder layer; scanned over N with the whole KV cache in the carry.

    W (the mask's last dim) is how many leading key slots are attended: L without a cache, the live
    prefix of the cache buffer (W <= S) with one, so a decode step reads only the slots in use.
    """

    cfg: ModelConfig
    attention: str = "xla"  # attention_impl's choice: 'xla', 'cudnn' or 'xla_fused'

    @nn.compact
    def __call__(self, carry, layer, rope, mask_BxLxW, cache_index):
        x_BxLxD, cache = carry
        cfg = self.cfg
        D, H, K, Dh, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        pdt, cdt = _dtype(cfg.param_dtype), _dtype(cfg.compute_dtype)
        B, L, _ = x_BxLxD.shape
        W = mask_BxLxW.shape[-1]
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
            # The whole [N, B, K, S, Dh] buffer rides in the scan carry and only this layer's new
            # rows are written, so XLA updates it in place instead of rebuilding it every step.
            # Heads before slots: each (row, kv head) reads one contiguous [W, Dh] block, which a
            # batched matmul takes as is (no per-step transpose of the cache).
            at = (layer, 0, 0, cache_index, 0)
            new = {"k": k_BxLxKxDh, "v": v_BxLxKxDh}
            cache = {n: jax.lax.dynamic_update_slice(
                cache[n], new[n].transpose(0, 2, 1, 3)[None].astype(cache[n].dtype), at) for n in ("k", "v")}
            k_BxKxWxDh, v_BxKxWxDh = (jax.lax.dynamic_slice(cache[n], (layer, 0, 0, 0, 0), (1, B, K, W, Dh))[0]
                                      for n in ("k", "v"))
            attn_BxLxHxDh = attend_xla(q_BxLxHxDh, k_BxKxWxDh, v_BxKxWxDh, mask_BxLxW)
        elif self.attention in ("cudnn", "xla_fused"):
            window = cfg.sliding_window if cfg.sliding_window is not None and cfg.sliding_window < L else None
            attn_BxLxHxDh = attend_fused(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, window=window,
                                         implementation="cudnn" if self.attention == "cudnn" else "xla")
        else:
            attn_BxLxHxDh = attend_xla(q_BxLxHxDh, k_BxLxKxDh.transpose(0, 2, 1, 3),
                                       v_BxLxKxDh.transpose(0, 2, 1, 3), mask_BxLxW)
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
        pdt = _dtype(cfg.param_dtype)
        self.embed = self.param("embed", nn.with_logical_partitioning(_normal, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.hidden_size), pdt)
        self.final_norm = self.param("final_norm", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                                     (cfg.hidden_size,), pdt)
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", nn.with_logical_partitioning(_normal, ("embed", "vocab")),
                                      (cfg.hidden_size, cfg.vocab_size), pdt)

    def __call__(self, tokens_BxL, positions_BxL, kv_mask_BxS, cache=None, cache_index=0):
        """Final-norm hidden states [B, L, D] (compute dtype) and the updated cache.

        With a cache, S = kv_mask_BxS.shape[1] may be less than the buffer: only slots [0, S) are
        attended (they must cover the new tokens' slots).
        """
        cfg = self.cfg
        cdt = _dtype(cfg.compute_dtype)
        B, L = tokens_BxL.shape
        S = kv_mask_BxS.shape[1]
        if cache is not None:
            if S > cache["k"].shape[3]:
                raise ValueError(f"kv mask covers {S} slots but the cache has {cache['k'].shape[3]}")
            if isinstance(cache_index, int) and cache_index + L > S:
                raise ValueError(f"tokens go to slots [{cache_index}, {cache_index + L}) but only {S} are attended")
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

        if self.unstacked:
            carry = (x_BxLxD, cache)
            for n, layer_params in enumerate(self.variables["params"]["layers"]):
                carry, _ = Block(cfg, self.attention, parent=None).apply(
                    {"params": layer_params}, carry, n, rope, mask_BxLxS, cache_index)
            x_BxLxD, cache = carry
        else:
            (x_BxLxD, cache), _ = self.layers((x_BxLxD, cache), jnp.arange(cfg.num_layers), rope, mask_BxLxS,
                                              cache_index)
        return _rms_norm(x_BxLxD, self.final_norm, cfg.rms_norm_eps), cache


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


def cast_params(cfg: ModelConfig, params):
    """Floating params in the compute dtype: what every layer casts them to anyway, done once.

    A loop that reuses the weights many times (the sampler's decode) then reads half the bytes of
    fp32 master params instead of converting them again on every step. Results are bit-identical.
    """
    cdt = _dtype(cfg.compute_dtype)
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
          cache: Optional[dict] = None, cache_index=0, *, right_padded: bool = False):
    """Hidden states [B, L, D] after the final norm, and the updated cache (None without one).

    Without a cache, kv_mask_BxS is the token validity mask of tokens_BxL (default all valid) and
    positions default to 0..L-1. right_padded=True promises that each row's valid tokens come first
    (the mask is a prefix): the GPU may then use a causal flash-attention kernel, and hidden states
    at padded positions are unspecified (real positions are exact either way).
    With a cache (`init_cache`), the L new tokens are written at slots [cache_index, cache_index + L)
    and kv_mask_BxS marks valid slots of the leading S slots of the buffer, including the new ones;
    only those S slots are attended, so a decode step can pass the live prefix of the buffer.
    """
    B, L = tokens_BxL.shape
    default_positions = positions_BxL is None
    if positions_BxL is None:
        positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    if kv_mask_BxS is None:
        kv_mask_BxS = jnp.ones((B, L), bool)
        right_padded = True  # all valid is a prefix too
    impl = attention_impl(cfg, cached=cache is not None, right_padded=right_padded, q_len=L,
                          default_positions=default_positions)
    unstacked = isinstance(params["layers"], (tuple, list))
    return Decoder(cfg, impl, unstacked).apply({"params": params}, tokens_BxL, positions_BxL, kv_mask_BxS, cache,
                                               cache_index)


def lm_head(cfg: ModelConfig, params):
    """The [D, V] output projection in the param dtype (the transposed embedding when tied)."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def unembed(cfg: ModelConfig, params, hidden_BxLxD):
    """float32 logits [B, L, V] for hidden states (any subset of positions): one matmul in the
    hidden states' dtype, accumulated in fp32."""
    return jnp.einsum("BLD,DV->BLV", hidden_BxLxD, lm_head(cfg, params).astype(hidden_BxLxD.dtype),
                      preferred_element_type=jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """A zeroed KV cache {'k','v': [N, B, K, S, Dh]} in the compute dtype."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    dtype = dtype or _dtype(cfg.compute_dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


CACHE_LOGICAL_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg: ModelConfig, params, input_ids_BxL):
    """float32 logits [B, L, V] for an unpadded int32 batch."""
    hidden_BxLxD, _ = apply(cfg, params, input_ids_BxL)
    return unembed(cfg, params, hidden_BxLxD)
