"""Per-token and per-sequence log-probs of a causal LM, chunked over positions, in float32.

Dimensions as in spjax.model (B batch, L length, D width, V vocab) plus C (positions per chunk) and
n (number of chunks). The hidden states are computed once; the vocab projection and log_softmax run
one chunk of C positions at a time under jax.checkpoint, so neither the forward nor the backward
pass holds the fp32 [B, L, V] logits: at most one [B, C, V] chunk is live. For a 1B Llama at
B=16, L=1024, V=128k the full logits would be 8 GiB in fp32 (twice that with their cotangent).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from spjax import model
from spjax.config import ModelConfig

DEFAULT_CHUNK = 128


def _target_logprobs(cfg: ModelConfig, params, hidden_BxCxD, targets_BxC):
    """log pi(target | hidden) for each position: fp32 [B, C]."""
    logits_BxCxV = model.unembed(cfg, params, hidden_BxCxD)  # fp32 whatever the compute dtype
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    picked_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return picked_BxC - lse_BxC


def _chunked_target_logprobs(cfg, params, hidden_BxTxD, targets_BxT, chunk):
    B, T, D = hidden_BxTxD.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    # Padded positions get hidden 0 and target 0: finite log-probs, sliced off below.
    hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    hidden_nxBxCxD = hidden_BxTxD.reshape(B, n, chunk, D).transpose(1, 0, 2, 3)
    targets_nxBxC = targets_BxT.reshape(B, n, chunk).transpose(1, 0, 2)

    # checkpoint: the backward pass recomputes each chunk's logits instead of saving all n of them.
    per_chunk = jax.checkpoint(lambda p, h, t: _target_logprobs(cfg, p, h, t))
    lp_nxBxC = jax.lax.map(lambda xs: per_chunk(params, *xs), (hidden_nxBxCxD, targets_nxBxC))
    return lp_nxBxC.transpose(1, 0, 2).reshape(B, n * chunk)[:, :T]


def token_logprobs(cfg: ModelConfig, params, input_ids_BxL, target_mask_BxL,
                   attention_mask_BxL: Optional[jnp.ndarray] = None, *,
                   chunk: Optional[int] = DEFAULT_CHUNK):
    """fp32 [B, L]: at t, log pi(input_ids[t] | input_ids[<t]) where scored, else 0.

    Position t is scored where target_mask[t] and attention_mask[t] are set and t > 0 (the first
    token has no context). attention_mask marks real tokens of a right-padded batch (default all);
    padding is hidden from attention as keys. chunk=None or chunk >= L-1 computes all logits at once.
    """
    B, L = input_ids_BxL.shape
    if L < 2:
        return jnp.zeros((B, L), jnp.float32)
    if attention_mask_BxL is None:
        attention_mask_BxL = jnp.ones((B, L), bool)
    attention_mask_BxL = attention_mask_BxL.astype(bool)
    score_BxL = (target_mask_BxL.astype(bool) & attention_mask_BxL).at[:, 0].set(False)

    hidden_BxLxD, _ = model.apply(cfg, params, input_ids_BxL, kv_mask_BxS=attention_mask_BxL)
    # The hidden state at t-1 predicts token t. Unscored targets become 0 so any id is safe to gather.
    hidden_BxTxD = hidden_BxLxD[:, :-1]
    targets_BxT = jnp.where(score_BxL[:, 1:], input_ids_BxL[:, 1:], 0).astype(jnp.int32)
    T = L - 1
    if chunk is None or chunk >= T:
        lp_BxT = _target_logprobs(cfg, params, hidden_BxTxD, targets_BxT)
    else:
        if chunk < 1:
            raise ValueError(f"chunk must be positive or None, got {chunk}")
        lp_BxT = _chunked_target_logprobs(cfg, params, hidden_BxTxD, targets_BxT, chunk)
    lp_BxL = jnp.concatenate([jnp.zeros((B, 1), jnp.float32), lp_BxT], axis=1)
    # where, not multiply: an unscored position contributes exactly 0 and no gradient.
    return jnp.where(score_BxL, lp_BxL, 0.0)


def sequence_logprobs(cfg: ModelConfig, params, input_ids_BxL, target_mask_BxL,
                      attention_mask_BxL: Optional[jnp.ndarray] = None, *,
                      chunk: Optional[int] = DEFAULT_CHUNK):
    """fp32 [B]: the sum of token_logprobs over scored positions (the response log-prob lp(y|x))."""
    lp_BxL = token_logprobs(cfg, params, input_ids_BxL, target_mask_BxL, attention_mask_BxL, chunk=chunk)
    return jnp.sum(lp_BxL, axis=-1)
