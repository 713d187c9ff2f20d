"""Rotary position embeddings: the inverse frequencies of each scaling type and the rotation.

Frequencies are computed on the host in float32 exactly as transformers' ROPE_INIT_FUNCTIONS compute
them (a trace-time constant of [Dh/2] values), so that imported checkpoints see the angles they were
trained with. YaRN also scales cos and sin by an attention factor (its "mscale"), which transformers
applies in float32 before casting to the compute dtype: so does `sin_cos`.

LongRoPE (Phi-3/Phi-4) has two sets of divisors: the short ones within the original context, the long
ones past it. transformers picks one set per forward call, by the call's largest position (+ 1 against
original_max_position_embeddings). spjax picks per sequence, by the largest position of each sequence
in the call (a row, or a packed row's segment): the same as transformers on each sequence alone, and a
sequence's log-probs do not depend on what it is batched or padded with. Decoding, a prompt past the
original context is prefilled with the long divisors, and where a response passes it, that row's
whole cache is recomputed with them (spjax.sampler_program._recompute_crossed), as transformers' Phi-3
generate recomputes its cache there. The tokens sampled before that point were scored with the short
ones (the sequence was shorter then): a forward pass over the finished sequence scores them with the
long ones, so those samples' log-probs are scored again (spjax.pairs.sampler_scores_usable).

Dynamic NTK scaling ("dynamic") changes nothing up to max_position_embeddings: transformers rescales
the base only once a call's largest position passes it, by that length, so past it the angles depend
on the longest sequence in the batch. spjax runs such a model within its context alone, where the
angles are the default ones: the train driver refuses longer sequences (spjax.preflight.check_lengths),
and so does `sample`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from spjax.config import ModelConfig


def _base_inv_freq(cfg: ModelConfig) -> np.ndarray:
    dim = cfg.rotary_dim
    return (1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)


def _llama3(cfg: ModelConfig, inv: np.ndarray) -> np.ndarray:
    # Llama 3.1: long wavelengths divided by the factor, short ones kept, a smooth blend between.
    factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_position
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    return np.where((wavelen >= old / hi) & (wavelen <= old / lo), smoothed, scaled).astype(np.float32)  # medium


def _yarn(cfg: ModelConfig) -> np.ndarray:
    # YaRN (arXiv 2309.00071): dimensions that turn fewer than beta_slow times over the original context
    # are interpolated (divided by the factor), those turning more than beta_fast times are kept, with a
    # linear ramp over the dimension indices between.
    dh, base = cfg.rotary_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / np.float32(dh))
    extrapolated = (1.0 / pos_freqs).astype(np.float32)
    interpolated = (1.0 / (np.float32(cfg.rope_factor) * pos_freqs)).astype(np.float32)

    def dim_of(rotations):  # the dimension index that turns `rotations` times over the original context
        return dh * math.log(cfg.rope_original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dh - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dh // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # 1: extrapolate (high frequencies), 0: interpolate
    return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)


def _longrope(cfg: ModelConfig, factors) -> np.ndarray:
    # Phi-3/4 (LongRoPE): each frequency divided by its own searched factor (short or long: module docstring)
    dim = cfg.rotary_dim
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.asarray(factors, np.float32) * np.float32(cfg.rope_theta) ** shape)).astype(np.float32)


def long_inv_freq(cfg: ModelConfig):
    """[R/2] float32 inverse frequencies past the original context (LongRoPE's long divisors); None for
    every other type."""
    if cfg.rope_type != "longrope":
        return None
    return _longrope(cfg, cfg.rope_long_factor)


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[R/2] float32 inverse frequencies of cfg's rope type (R = cfg.rotary_dim, the rotated dims)."""
    if cfg.rope_type == "yarn":
        return _yarn(cfg)
    if cfg.rope_type == "longrope":
        return _longrope(cfg, cfg.rope_short_factor)
    inv = _base_inv_freq(cfg)
    if cfg.rope_type == "linear":
        return inv / np.float32(cfg.rope_factor)
    if cfg.rope_type == "llama3":
        return _llama3(cfg, inv)
    return inv  # default; dynamic within max_position_embeddings (above)


def attention_factor(cfg: ModelConfig) -> float:
    """The factor cos and sin are scaled by: given, or derived from the factor f as each paper does
    (YaRN: 0.1 ln f + 1; LongRoPE: sqrt(1 + ln f / ln original context)); 1 for the other types."""
    if cfg.rope_type not in ("yarn", "longrope"):
        return 1.0
    if cfg.rope_attention_factor > 0:
        return float(cfg.rope_attention_factor)
    if cfg.rope_factor <= 1:
        return 1.0
    if cfg.rope_type == "yarn":
        return 0.1 * math.log(cfg.rope_factor) + 1.0
    return math.sqrt(1 + math.log(cfg.rope_factor) / math.log(cfg.rope_original_max_position))


def past_original_BxL(positions_BxL, valid_BxL, original: int):
    """[B, L] bool: whether each token's sequence in this call reaches past `original` positions (its
    largest position + 1 > original). A sequence is a run of valid tokens whose positions count up by one:
    a row, or a packed row's segment (its positions restart). Invalid tokens (padding) end a sequence."""
    B, L = positions_BxL.shape
    next_pos_BxL = jnp.concatenate([positions_BxL[:, 1:], positions_BxL[:, -1:]], axis=1)
    next_valid_BxL = jnp.concatenate([valid_BxL[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
    ends_BxL = ~(next_valid_BxL & (next_pos_BxL == positions_BxL + 1))  # the last column always ends one
    end_at_BxL = jax.lax.cummin(jnp.where(ends_BxL, jnp.arange(L), L - 1), axis=1, reverse=True)
    return jnp.take_along_axis(positions_BxL, end_at_BxL, axis=1) + 1 > original


def sin_cos(positions_BxL, cfg: ModelConfig, dtype, valid_BxL=None):
    """(sin, cos) [B, L, R] in dtype for the token positions (both halves of the rotated dims share the angles).
    valid_BxL (None: all valid): the real tokens, for LongRoPE's choice of divisors per sequence."""
    inv_R2 = jnp.asarray(inv_freq(cfg))
    long_R2 = long_inv_freq(cfg)
    if long_R2 is not None:
        valid_BxL = jnp.ones(positions_BxL.shape, bool) if valid_BxL is None else valid_BxL.astype(bool)
        past_BxL = past_original_BxL(positions_BxL, valid_BxL, cfg.rope_original_max_position)
        inv_R2 = jnp.where(past_BxL[..., None], jnp.asarray(long_R2), inv_R2)  # [B, L, R/2]
    angles_BxLxR2 = positions_BxL.astype(jnp.float32)[..., None] * inv_R2
    angles_BxLxR = jnp.concatenate([angles_BxLxR2, angles_BxLxR2], axis=-1)
    scale = attention_factor(cfg)
    sin_BxLxR, cos_BxLxR = jnp.sin(angles_BxLxR), jnp.cos(angles_BxLxR)
    if scale != 1.0:
        sin_BxLxR, cos_BxLxR = sin_BxLxR * scale, cos_BxLxR * scale
    return sin_BxLxR.astype(dtype), cos_BxLxR.astype(dtype)


def query_scale(positions_BxL, cfg: ModelConfig):
    """Ministral 3's (Llama 4's) float32 query scale by position: 1 + beta * log(1 + floor(p / original))."""
    blocks_BxL = jnp.floor(positions_BxL.astype(jnp.float32) / cfg.rope_original_max_position)
    return 1.0 + cfg.query_scale_beta * jnp.log(1.0 + blocks_BxL)


def rotate(x_BxLxNxDh, sin_BxLxR, cos_BxLxR):
    """x's first R dims rotated by the angles (the half-split layout of transformers' rotate_half), the
    rest passed through (partial rotary: R < Dh)."""
    R = sin_BxLxR.shape[-1]
    x_rot, x_pass = (x_BxLxNxDh, None) if R == x_BxLxNxDh.shape[-1] else (x_BxLxNxDh[..., :R], x_BxLxNxDh[..., R:])
    rot = jnp.concatenate([-x_rot[..., R // 2:], x_rot[..., :R // 2]], axis=-1)
    out = x_rot * cos_BxLxR[:, :, None] + rot * sin_BxLxR[:, :, None]
    return out if x_pass is None else jnp.concatenate([out, x_pass], axis=-1)
