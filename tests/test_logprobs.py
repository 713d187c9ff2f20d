"""Sequence log-probs: chunked == unchunked == a naive full-logits computation, values and grads."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spjax import model
from spjax.config import ModelConfig
from spjax.logprobs import sequence_logprobs, token_logprobs

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2)
B, L = 3, 37  # L - 1 = 36 scored slots: chunk 8 leaves a partial last chunk, chunk 12 divides it
LENGTHS = (37, 30, 21)  # right padding on rows 1 and 2
PROMPT_LENGTHS = (5, 9, 1)


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    ids_BxL = np.asarray(jax.random.randint(jax.random.key(1), (B, L), 0, CFG.vocab_size), np.int32)
    pos = np.arange(L)[None]
    attn_BxL = pos < np.array(LENGTHS)[:, None]
    # Responses follow the prompt up to the end of the row; the padding keeps its random ids (and
    # the target mask is even left on there, for row 2) to show both are ignored.
    target_BxL = pos >= np.array(PROMPT_LENGTHS)[:, None]
    target_BxL[:2] &= attn_BxL[:2]
    return jnp.asarray(ids_BxL), jnp.asarray(target_BxL), jnp.asarray(attn_BxL)


@functools.partial(jax.jit, static_argnames="chunk")
def _token_lp(params, ids, target, attn, chunk):
    return token_logprobs(CFG, params, ids, target, attn, chunk=chunk)


def _naive_token_logprobs(params, ids, target, attn):
    """Each row cut to its real length, full logits from model.forward, log_softmax, gather (fp64)."""
    out = np.zeros((B, L))
    for b, n in enumerate(LENGTHS):
        logits = np.asarray(model.forward(CFG, params, ids[b:b + 1, :n]), np.float64)[0]
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.sum(np.exp(logits - m), -1, keepdims=True))
        for t in range(1, n):
            if target[b, t]:
                out[b, t] = logp[t - 1, int(ids[b, t])]
    return out


def test_matches_naive_forward(params, batch):
    ids, target, attn = batch
    naive_BxL = _naive_token_logprobs(params, np.asarray(ids), np.asarray(target), np.asarray(attn))
    lp_BxL = _token_lp(params, ids, target, attn, None)
    assert lp_BxL.dtype == jnp.float32 and lp_BxL.shape == (B, L)
    np.testing.assert_allclose(np.asarray(lp_BxL), naive_BxL, rtol=0, atol=1e-5)
    seq_B = sequence_logprobs(CFG, params, ids, target, attn, chunk=None)
    np.testing.assert_allclose(np.asarray(seq_B), naive_BxL.sum(-1), rtol=1e-6, atol=1e-5)
    # Nothing outside the scored positions: first token, prompt and padding are exactly 0.
    assert np.all(np.asarray(lp_BxL)[:, 0] == 0)
    assert np.all(np.asarray(lp_BxL)[~np.asarray(target & attn)] == 0)


@pytest.mark.parametrize("chunk", [8, 12, 5])
def test_chunked_equals_unchunked(params, batch, chunk):
    ids, target, attn = batch
    full_BxL = np.asarray(_token_lp(params, ids, target, attn, None))
    chunked_BxL = np.asarray(_token_lp(params, ids, target, attn, chunk))
    np.testing.assert_allclose(chunked_BxL, full_BxL, rtol=0, atol=1e-5)
    np.testing.assert_allclose(chunked_BxL.sum(-1), full_BxL.sum(-1), rtol=0, atol=1e-5)


def test_chunk_at_least_length_is_unchunked(params, batch):
    ids, target, attn = batch
    np.testing.assert_array_equal(np.asarray(_token_lp(params, ids, target, attn, 36)),
                                  np.asarray(_token_lp(params, ids, target, attn, None)))


def test_default_attention_mask_is_all_ones(params, batch):
    ids, target, _ = batch
    ones = jnp.ones((B, L), bool)
    np.testing.assert_array_equal(
        np.asarray(token_logprobs(CFG, params, ids, target, chunk=None)),
        np.asarray(token_logprobs(CFG, params, ids, target, ones, chunk=None)))


def test_gradients_chunked_equal_unchunked(params, batch):
    ids, target, attn = batch
    w_B = jnp.array([1.0, -0.5, 2.0])  # distinct weights so rows cannot cancel or hide

    @functools.partial(jax.jit, static_argnames="chunk")
    def grads(params, chunk):
        f = lambda p: jnp.sum(w_B * sequence_logprobs(CFG, p, ids, target, attn, chunk=chunk))
        return jax.grad(f)(params)

    g_full = grads(params, None)
    g_chunk = grads(params, 8)
    flat_full = jax.tree_util.tree_leaves_with_path(g_full)
    flat_chunk = jax.tree.leaves(g_chunk)
    for (path, a), b in zip(flat_full, flat_chunk):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.isfinite(b)), jax.tree_util.keystr(path)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # The gradient reaches every weight (not trivially zero on both sides).
    assert all(np.abs(np.asarray(a)).max() > 1e-4 for a in jax.tree.leaves(g_full))


def test_bf16_compute_returns_fp32(params, batch):
    ids, target, attn = batch
    cfg = ModelConfig(**{**CFG.__dict__, "compute_dtype": "bfloat16"})
    lp_B = jax.jit(lambda p: sequence_logprobs(cfg, p, ids, target, attn, chunk=8))(params)
    assert lp_B.dtype == jnp.float32
    # bf16 hidden states move each token's log-prob by ~1e-2, not more.
    ref_B = sequence_logprobs(CFG, params, ids, target, attn, chunk=8)
    n_B = np.asarray((target & attn).sum(-1))
    assert np.all(np.abs(np.asarray(lp_B - ref_B)) / n_B < 0.05)


def test_chunked_grad_never_holds_full_logits():
    # XLA's own buffer plan for the compiled grad, minus that of the same grad without the vocab
    # projection: unchunked it holds the [B, L, V] logits (and more); chunked it may hold only a few
    # [B, C, V] chunks and the lm_head gradient, so neither pass keeps every chunk's logits.
    cfg = ModelConfig(vocab_size=32768, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1)
    b, l, chunk = 1, 513, 16
    p = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((b, l), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, l), jnp.bool_)

    def temp_bytes(f):
        return jax.jit(jax.grad(f)).lower(p, ids, mask).compile().memory_analysis().temp_size_in_bytes

    base = temp_bytes(lambda q, i, t: jnp.sum(model.apply(cfg, q, i)[0][..., 0] * t))
    full = temp_bytes(lambda q, i, t: jnp.sum(sequence_logprobs(cfg, q, i, t, chunk=None)))
    chunked = temp_bytes(lambda q, i, t: jnp.sum(sequence_logprobs(cfg, q, i, t, chunk=chunk)))
    logits_bytes = b * (l - 1) * cfg.vocab_size * 4
    chunk_bytes = b * chunk * cfg.vocab_size * 4
    lm_head_bytes = cfg.hidden_size * cfg.vocab_size * 4
    assert full - base >= logits_bytes
    assert chunked - base <= 2 * lm_head_bytes + 4 * chunk_bytes, (chunked - base, logits_bytes)


@pytest.mark.parametrize("chunk", [None, 8])
def test_granite_scaled_head_log_probs_and_gradients(chunk):
    """Granite divides its logits by logits_scaling: the head's own VJP (one chunk keeping its softmax, or
    several recomputing theirs) divides d logits by it too; log-probs and every gradient equal autodiff's."""
    from tests import oracle
    cfg, params = oracle.spjax_model("granite")
    assert cfg.logits_scaling == 4.0
    ids_BxL = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40)), jnp.int32)
    targets_BxL = jnp.ones((2, 40), bool)

    def reference(p):
        hidden_BxLxD, _ = model.apply(cfg, p, ids_BxL)
        logp_BxLxV = jax.nn.log_softmax(model.unembed(cfg, p, hidden_BxLxD), axis=-1)
        lp_BxT = jnp.take_along_axis(logp_BxLxV[:, :-1], ids_BxL[:, 1:, None], axis=-1)[..., 0]
        return jnp.concatenate([jnp.zeros((2, 1)), lp_BxT], axis=1)

    ours = lambda p: token_logprobs(cfg, p, ids_BxL, targets_BxL, chunk=chunk)  # noqa: E731
    np.testing.assert_allclose(np.asarray(ours(params)), np.asarray(reference(params)), atol=1e-5, rtol=0)
    weights_BxL = jax.random.normal(jax.random.key(0), (2, 40))
    g_ours, g_ref = (jax.grad(lambda p: jnp.sum(f(p) * weights_BxL))(params) for f in (ours, reference))
    for path, gr in jax.tree_util.tree_leaves_with_path(g_ref):
        go = dict(jax.tree_util.tree_leaves_with_path(g_ours))[path]
        assert np.abs(np.asarray(go) - np.asarray(gr)).max() <= 1e-5 * max(np.abs(np.asarray(gr)).max(), 1.0), path
