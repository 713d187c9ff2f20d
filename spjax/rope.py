"""Rotary position embeddings: the inverse frequencies of each scaling type and the rotation.

Frequencies are computed on the host in float32 exactly as transformers' ROPE_INIT_FUNCTIONS compute
them (a trace-time constant of [Dh/2] values), so that imported checkpoints see the angles they were
trained with. YaRN also scales cos and sin by an attention factor (its "mscale"), which transformers
applies in float32 before casting to the compute dtype: so does `sin_cos`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from spjax.config import ModelConfig


def _base_inv_freq(cfg: ModelConfig) -> np.ndarray:
    dh = cfg.head_dim
    return (1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / dh))).astype(np.float32)


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
    dh, base = cfg.head_dim, cfg.rope_theta
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


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[Dh/2] float32 inverse frequencies of cfg's rope type."""
    if cfg.rope_type == "yarn":
        return _yarn(cfg)
    inv = _base_inv_freq(cfg)
    if cfg.rope_type == "linear":
        return inv / np.float32(cfg.rope_factor)
    if cfg.rope_type == "llama3":
        return _llama3(cfg, inv)
    return inv


def attention_factor(cfg: ModelConfig) -> float:
    """The factor cos and sin are scaled by: YaRN's (given, or 0.1 ln(factor) + 1), else 1."""
    if cfg.rope_type != "yarn":
        return 1.0
    if cfg.rope_attention_factor > 0:
        return float(cfg.rope_attention_factor)
    return 1.0 if cfg.rope_factor <= 1 else 0.1 * math.log(cfg.rope_factor) + 1.0


def sin_cos(positions_BxL, cfg: ModelConfig, dtype):
    """(sin, cos) [B, L, Dh] in dtype for the token positions (both halves of a head share the angles)."""
    angles_BxLxDh2 = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(cfg))
    angles_BxLxDh = jnp.concatenate([angles_BxLxDh2, angles_BxLxDh2], axis=-1)
    scale = attention_factor(cfg)
    sin_BxLxDh, cos_BxLxDh = jnp.sin(angles_BxLxDh), jnp.cos(angles_BxLxDh)
    if scale != 1.0:
        sin_BxLxDh, cos_BxLxDh = sin_BxLxDh * scale, cos_BxLxDh * scale
    return sin_BxLxDh.astype(dtype), cos_BxLxDh.astype(dtype)


def rotate(x_BxLxNxDh, sin_BxLxDh, cos_BxLxDh):
    """x rotated by the angles (the half-split layout of transformers' rotate_half)."""
    half = x_BxLxNxDh.shape[-1] // 2
    rot = jnp.concatenate([-x_BxLxNxDh[..., half:], x_BxLxNxDh[..., :half]], axis=-1)
    return x_BxLxNxDh * cos_BxLxDh[:, :, None] + rot * sin_BxLxDh[:, :, None]
