"""The decoder against transformers' PyTorch models, and its structural properties."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spjax
from spjax import mlp, model
from tests import oracle

FAMILIES = sorted(oracle.FAMILIES)


def _padded_batch(lengths, L, vocab, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (len(lengths), L)).astype(np.int32)
    mask = (np.arange(L)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return ids * mask, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    """fp32 parity on a right-padded batch of three lengths (incl. positions past llama3's original max)."""
    cfg, params = oracle.spjax_model(family)
    if family == "llama3":
        assert cfg.rope_type == "llama3" and cfg.rope_factor == 8.0
    if family == "qwen2":
        assert cfg.qkv_bias
    ids, mask = _padded_batch([96, 57, 13], 96, cfg.vocab_size)
    ref = oracle.torch_logits(oracle.torch_model(family), ids, mask)
    hidden, _ = model.apply(cfg, params, jnp.asarray(ids), kv_mask_BxS=jnp.asarray(mask))
    mine = np.asarray(model.unembed(cfg, params, hidden))
    valid = mask.astype(bool)
    assert np.abs(mine - ref)[valid].max() <= 1e-4
    # and the unpadded public API on the longest row
    full = np.asarray(spjax.forward(cfg, params, jnp.asarray(ids[:1])))
    assert np.abs(full - ref[:1]).max() <= 1e-4


def test_causality_by_gradient():
    """d logits[t] / d embedding[s] is zero for every s > t."""
    cfg, params = oracle.spjax_model("llama3")
    L = 12
    ids = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (1, L)), jnp.int32)
    emb = jnp.take(params["embed"], ids[0], axis=0)  # [L, D]

    def out_t(e_LxD, t):
        # feed embeddings directly by swapping them into a one-hot-free path: perturb the table rows
        table = params["embed"].at[ids[0]].set(e_LxD)
        p = dict(params, embed=table)
        hidden, _ = model.apply(cfg, p, ids)
        return hidden[0, t].sum()

    for t in range(L):
        g_LxD = jax.grad(out_t)(emb, t)
        per_pos = np.abs(np.asarray(g_LxD)).sum(-1)
        assert np.all(per_pos[t + 1:] == 0.0), f"position {t} depends on later inputs {per_pos}"
        assert per_pos[t] > 0


def test_remat_and_bf16_compute():
    cfg, params = oracle.spjax_model("qwen2")
    ids = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 24)), jnp.int32)

    def loss(p, c):
        return model.forward(c, p, ids).mean()

    g_ref = jax.grad(loss)(params, cfg)
    for remat in ("full", "dots"):
        g = jax.grad(loss)(params, dataclasses.replace(cfg, remat=remat))
        diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g, g_ref)))
        assert diff <= 1e-6, (remat, diff)
    bf = dataclasses.replace(cfg, compute_dtype="bfloat16")
    lf, lb = model.forward(cfg, params, ids), model.forward(bf, params, ids)
    assert lb.dtype == jnp.float32 and params["embed"].dtype == jnp.float32
    # bf16 keeps ~3 significant digits; logits of this model are O(1)
    assert float(jnp.abs(lf - lb).max()) < 0.1


def test_kv_cache_chunks_equal_full_forward():
    """Prefill in two chunks through the cache gives the same hidden states as one pass."""
    cfg, params = oracle.spjax_model("mistral")
    L = 20
    ids = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, L)), jnp.int32)
    full, _ = model.apply(cfg, params, ids)
    cache = model.init_cache(cfg, 2, 32)
    kv = jnp.arange(32)[None].repeat(2, 0) < 12
    pos = jnp.arange(L)[None].repeat(2, 0)
    h1, cache = model.apply(cfg, params, ids[:, :12], pos[:, :12], kv, cache, 0)
    kv = jnp.arange(32)[None].repeat(2, 0) < L
    h2, cache = model.apply(cfg, params, ids[:, 12:], pos[:, 12:], kv, cache, 12)
    got = jnp.concatenate([h1, h2], axis=1)
    assert float(jnp.abs(got - full).max()) <= 1e-5


def test_param_logical_axes_cover_every_weight():
    cfg, _ = oracle.spjax_model("qwen2")
    axes = model.param_logical_axes(cfg)
    shapes = model.param_shapes(cfg)
    for spec, shape in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                           jax.tree.leaves(shapes)):
        assert len(spec) == len(shape.shape) and all(name is not None for name in spec)


def test_cpu_mlp_backward_matches_autodiff(monkeypatch):
    """spjax.mlp's hand-written backward pass (Block's MLP on CPU) gives autodiff's gradients, and
    Block creates the same params in the same order (each param's init rng is its place in it)."""
    k = jax.random.split(jax.random.key(5), 5)
    x, dy = jax.random.normal(k[0], (2, 6, 64)), jax.random.normal(k[1], (2, 6, 64))
    ws = (jax.random.normal(k[2], (64, 96)) * 0.3, jax.random.normal(k[3], (64, 96)) * 0.3,
          jax.random.normal(k[4], (96, 64)) * 0.1)  # at a scale where silu's curvature counts
    plain = lambda x, wg, wu, wd: (jax.nn.silu(x @ wg) * (x @ wu)) @ wd
    y, vjp = jax.vjp(mlp.gated_mlp, x, *ws)
    y_ref, vjp_ref = jax.vjp(plain, x, *ws)
    assert float(jnp.abs(y - y_ref).max()) <= 1e-5
    for a, b in zip(vjp(dy), vjp_ref(dy)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(1.0, float(jnp.abs(b).max()))

    cfg, params = oracle.spjax_model("qwen2")
    cfg = dataclasses.replace(cfg, remat="dots")  # the policy must still see (and save) gate and up
    assert mlp.fast_path(cfg)  # CPU, float base, no LoRA: the tests above run it too
    ids = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 24)), jnp.int32)

    def seq_logp(p):  # traced anew per call (no jit cache): fast_path is read at trace time
        logits = model.unembed(cfg, p, model.apply(cfg, p, ids)[0])[:, :-1]
        return jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1).sum()

    def created():
        names, param = [], nn.Module.param  # every param, whichever helper creates it
        monkeypatch.setattr(nn.Module, "param", lambda m, name, *a, **k: names.append(name) or param(m, name, *a, **k))
        jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))  # a fresh trace (param_shapes caches)
        monkeypatch.setattr(nn.Module, "param", param)
        return names

    fast, fast_names = jax.jit(jax.value_and_grad(seq_logp))(params), created()
    monkeypatch.setattr(mlp, "fast_path", lambda cfg: False)
    ref, ref_names = jax.jit(jax.value_and_grad(seq_logp))(params), created()
    assert fast_names == ref_names and "gate" in ref_names
    assert abs(float(fast[0] - ref[0])) <= 1e-5 * abs(float(ref[0]))
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), fast[1], ref[1])))
    assert diff <= 1e-5, diff
