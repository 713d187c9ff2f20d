"""Per-token and per-sequence log-probs of a causal LM, chunked over positions, in float32.

Dimensions as in spjax.model (B batch, L length, D width, V vocab) plus C (positions per chunk) and
n (number of chunks). The hidden states are computed once; the vocab projection and log_softmax run
one chunk of C positions at a time, so neither the forward nor the backward pass holds the fp32
[B, L, V] logits: at most one [B, C, V] chunk is live. For a 1B Llama at B=16, L=1024, V=128k the
full logits would be 8 GiB in fp32 (twice that with their cotangent).

The head has its own VJP (`_head_logprobs`): the backward pass recomputes a chunk's logits (with a
single chunk it keeps that chunk's softmax instead: no more memory than the logits, one matmul
less), forms d_logits = g * (onehot - softmax) in one elementwise pass, and runs both backward matmuls in the
compute dtype with fp32 accumulation (autodiff of the fp32-accumulated forward matmul would run
them in fp32), summing the head's gradient over chunks in fp32. Only the head weight enters the
chunk loop, never the rest of the params.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from spjax import model
from spjax.config import ModelConfig

DEFAULT_CHUNK = 128


def _project(w, hidden_BxCxD, tied: bool, head=(1.0, 0.0)):
    """fp32 logits [B, C, V]; w is the embedding [V, D] when tied, else lm_head [D, V] (compute dtype);
    head: (Granite's logits_scaling, the matmul divided by it; Gemma's soft cap, cap * tanh(logits / cap))."""
    spec = "BCD,VD->BCV" if tied else "BCD,DV->BCV"
    raw_BxCxV = jnp.einsum(spec, hidden_BxCxD, w, preferred_element_type=jnp.float32)
    scaling, cap = head
    return model.softcap(raw_BxCxV if scaling == 1.0 else raw_BxCxV / scaling, cap)


def _chunk_logprobs(w, hidden_BxCxD, targets_BxC, tied, head=(1.0, 0.0)):
    """(log-probs [B, C], softmax [B, C, V]) of one chunk, both fp32. With a cap the softmax is
    that of the capped logits times d(capped)/d(logits) = 1 - (capped / cap)^2, which is what the
    backward pass multiplies by."""
    cap = head[1]
    logits_BxCxV = _project(w, hidden_BxCxD, tied, head)
    max_BxCx1 = jnp.max(logits_BxCxV, axis=-1, keepdims=True)
    exp_BxCxV = jnp.exp(logits_BxCxV - max_BxCx1)
    sum_BxCx1 = jnp.sum(exp_BxCxV, axis=-1, keepdims=True)
    lse_BxC = (max_BxCx1 + jnp.log(sum_BxCx1))[..., 0]
    picked_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    probs_BxCxV = exp_BxCxV / sum_BxCx1
    return picked_BxC - lse_BxC, probs_BxCxV if not cap else (probs_BxCxV, 1 - jnp.square(logits_BxCxV / cap))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_logprobs(w, hidden_nxBxCxD, targets_nxBxC, tied, head):
    """log pi(target | hidden) for every chunk: fp32 [n, B, C]. w in the param dtype; head: _project's."""
    wc = w.astype(hidden_nxBxCxD.dtype)  # once, outside the chunk loop
    return jax.lax.map(lambda xs: _chunk_logprobs(wc, *xs, tied, head)[0], (hidden_nxBxCxD, targets_nxBxC))


def _head_fwd(w, hidden_nxBxCxD, targets_nxBxC, tied, head):
    if hidden_nxBxCxD.shape[0] == 1 and not head[1]:
        # One chunk (all positions at once): its softmax is held for the backward pass, as big as
        # the logits it replaces, and the backward pass skips recomputing the vocab matmul.
        lp_BxC, probs_BxCxV = _chunk_logprobs(w.astype(hidden_nxBxCxD.dtype), hidden_nxBxCxD[0],
                                              targets_nxBxC[0], tied, head)
        return lp_BxC[None], (w, hidden_nxBxCxD, targets_nxBxC, probs_BxCxV[None])
    # Several chunks: the residuals are the inputs themselves; no logits outlive their chunk.
    # (A soft cap's derivative would be a second [B, C, V] residual: capped heads recompute instead.)
    return _head_logprobs(w, hidden_nxBxCxD, targets_nxBxC, tied, head), (w, hidden_nxBxCxD, targets_nxBxC, None)


def _head_bwd(tied, head, res, g_nxBxC):
    w, hidden_nxBxCxD, targets_nxBxC, probs_nxBxCxV = res
    cdt = hidden_nxBxCxD.dtype
    wc = w.astype(cdt)
    d_spec, w_spec = ("BCV,VD->BCD", "BCV,BCD->VD") if tied else ("BCV,DV->BCD", "BCD,BCV->DV")

    def chunk(dw_acc, xs):
        hidden_BxCxD, targets_BxC, g_BxC, probs_BxCxV = xs
        if probs_BxCxV is None:
            probs_BxCxV = _chunk_logprobs(wc, hidden_BxCxD, targets_BxC, tied, head)[1]
        # d(picked - lse)/d logits = onehot - softmax: the dense part, then g added at each target
        # (a scatter of B*C values; a dense one-hot compare over the vocab costs a full extra pass).
        B, C = targets_BxC.shape
        probs_BxCxV, dcap_BxCxV = probs_BxCxV if head[1] else (probs_BxCxV, None)
        dlogits_BxCxV = (-g_BxC[..., None] * probs_BxCxV).at[
            jnp.arange(B)[:, None], jnp.arange(C)[None, :], targets_BxC].add(g_BxC)
        dlogits_BxCxV = dlogits_BxCxV if dcap_BxCxV is None else dlogits_BxCxV * dcap_BxCxV
        if head[0] != 1.0:  # (the matmul was divided by logits_scaling)
            dlogits_BxCxV = dlogits_BxCxV / head[0]
        dlogits_BxCxV = dlogits_BxCxV.astype(cdt)
        dhidden_BxCxD = jnp.einsum(d_spec, dlogits_BxCxV, wc, preferred_element_type=jnp.float32).astype(cdt)
        if tied:
            dw = jnp.einsum(w_spec, dlogits_BxCxV, hidden_BxCxD, preferred_element_type=jnp.float32)
        else:
            dw = jnp.einsum(w_spec, hidden_BxCxD, dlogits_BxCxV, preferred_element_type=jnp.float32)
        return dw_acc + dw, dhidden_BxCxD

    dw, dhidden_nxBxCxD = jax.lax.scan(chunk, jnp.zeros(w.shape, jnp.float32),
                                       (hidden_nxBxCxD, targets_nxBxC, g_nxBxC, probs_nxBxCxV))
    return dw.astype(w.dtype), dhidden_nxBxCxD, None


_head_logprobs.defvjp(_head_fwd, _head_bwd)


def _target_logprobs(cfg: ModelConfig, params, hidden_BxTxD, targets_BxT, chunk):
    """log pi(target | hidden) at every position, `chunk` positions at a time: fp32 [B, T]."""
    B, T, D = hidden_BxTxD.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    # Padded positions get hidden 0 and target 0: finite log-probs, sliced off below.
    hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    hidden_nxBxCxD = hidden_BxTxD.reshape(B, n, chunk, D).transpose(1, 0, 2, 3)
    targets_nxBxC = targets_BxT.reshape(B, n, chunk).transpose(1, 0, 2)
    w = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    lp_nxBxC = _head_logprobs(w, hidden_nxBxCxD, targets_nxBxC, cfg.tie_embeddings,
                              (cfg.logits_scaling, cfg.final_softcap))
    return lp_nxBxC.transpose(1, 0, 2).reshape(B, n * chunk)[:, :T]


def token_logprobs(cfg: ModelConfig, params, input_ids_BxL, target_mask_BxL,
                   attention_mask_BxL: Optional[jnp.ndarray] = None, *,
                   chunk: Optional[int] = DEFAULT_CHUNK, segment_ids_BxL=None, positions_BxL=None):
    """fp32 [B, L]: at t, log pi(input_ids[t] | input_ids[<t]) where scored, else 0.

    Position t is scored where target_mask[t] and attention_mask[t] are set and t > 0 (the first
    token has no context). attention_mask marks real tokens of a RIGHT-padded batch (default all):
    each row's real tokens come first, which lets the GPU use causal flash attention (padding is
    then hidden from every real token by causality). Packed rows give segment_ids_BxL (each
    sequence's tokens share an id) and positions_BxL (restarting per sequence): tokens then see only
    their own sequence, and a sequence's first token is never scored. chunk=None or chunk >= L-1
    computes all logits at once.
    """
    B, L = input_ids_BxL.shape
    if L < 2:
        return jnp.zeros((B, L), jnp.float32)
    if attention_mask_BxL is None:
        attention_mask_BxL = jnp.ones((B, L), bool)
    attention_mask_BxL = attention_mask_BxL.astype(bool)
    score_BxL = (target_mask_BxL.astype(bool) & attention_mask_BxL).at[:, 0].set(False)
    if segment_ids_BxL is None:
        hidden_BxLxD, _ = model.apply(cfg, params, input_ids_BxL, kv_mask_BxS=attention_mask_BxL, right_padded=True)
    else:  # the token before t predicts t only within one sequence
        score_BxL = score_BxL.at[:, 1:].set(score_BxL[:, 1:] & (segment_ids_BxL[:, 1:] == segment_ids_BxL[:, :-1]))
        hidden_BxLxD, _ = model.apply(cfg, params, input_ids_BxL, positions_BxL, kv_mask_BxS=attention_mask_BxL,
                                      segment_ids_BxL=segment_ids_BxL)
    # The hidden state at t-1 predicts token t. Unscored targets become 0 so any id is safe to gather.
    hidden_BxTxD = hidden_BxLxD[:, :-1]
    targets_BxT = jnp.where(score_BxL[:, 1:], input_ids_BxL[:, 1:], 0).astype(jnp.int32)
    T = L - 1
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be positive or None, got {chunk}")
    lp_BxT = _target_logprobs(cfg, params, hidden_BxTxD, targets_BxT, T if chunk is None else min(chunk, T))
    lp_BxL = jnp.concatenate([jnp.zeros((B, 1), jnp.float32), lp_BxT], axis=1)
    # where, not multiply: an unscored position contributes exactly 0 and no gradient.
    return jnp.where(score_BxL, lp_BxL, 0.0)


def sequence_logprobs(cfg: ModelConfig, params, input_ids_BxL, target_mask_BxL,
                      attention_mask_BxL: Optional[jnp.ndarray] = None, *,
                      chunk: Optional[int] = DEFAULT_CHUNK):
    """fp32 [B]: the sum of token_logprobs over scored positions (the response log-prob lp(y|x))."""
    lp_BxL = token_logprobs(cfg, params, input_ids_BxL, target_mask_BxL, attention_mask_BxL, chunk=chunk)
    return jnp.sum(lp_BxL, axis=-1)
