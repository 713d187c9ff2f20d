"""Splash attention (spjax.attention.attend_splash, the TPU Pallas kernel) means the same as the einsum
path, checked in Pallas' interpret mode on CPU in fp32: forward and gradients with right and left
padding, Mistral's sliding window, GQA 4:1 and packed segments, at the kernel wrapper, sharded, and
through model.apply (training forward and the sampler's prefill); and the kernel choice follows the
target platform. tests/test_tpu_aot.py compiles it for real TPU chips where libtpu is installed.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spjax import attention, model, sharding as shd
from spjax.config import MeshConfig, ModelConfig

H, K, Dh = 8, 2, 16  # GQA 4:1
TOL = 1e-5  # fp32, absolute


def _qkv(B, L, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, L, H, Dh)), jax.random.normal(kk, (B, L, K, Dh)),
            jax.random.normal(kv, (B, L, K, Dh)))


def _segments(rows, L):
    """[B, L] int32 ids from per-row lists of (segment id, length); what is left over is padding (0)."""
    out = np.zeros((len(rows), L), np.int32)
    for b, row in enumerate(rows):
        at = 0
        for sid, n in row:
            out[b, at:at + n] = sid
            at += n
    return jnp.asarray(out)


def _einsum_mask(seg_BxL, window):
    """attend_xla's mask for the same rows: causal, within a segment, no pads, and the window over
    positions that restart at 0 in each segment (as packed pairs number them)."""
    L = seg_BxL.shape[1]
    slot_L = jnp.arange(L)
    starts_BxL = jax.lax.cummax(jnp.where(jnp.diff(seg_BxL, prepend=-1, axis=1) != 0, slot_L, 0), axis=1)
    pos_BxL = slot_L - starts_BxL
    mask = (slot_L[None, None, :] <= slot_L[None, :, None]) & (seg_BxL[:, :, None] == seg_BxL[:, None, :])
    mask &= (seg_BxL > 0)[:, None, :]
    if window is not None:
        mask &= (pos_BxL[:, :, None] - pos_BxL[:, None, :]) < window
    return mask


CASES = {
    # 300 slots pad to 384: three 128-slot tiles, the window (100) crossing tile edges; row 1 right-padded
    "right_pad_window": ([[(1, 300)], [(1, 170)]], 300, 100),
    # packed segments in row 0, a left-padded prompt in row 1; windowed within segments
    "segments_left_pad_window": ([[(1, 70), (2, 90), (3, 40)], [(0, 56), (1, 144)]], 200, 64),
    "segments_causal": ([[(1, 70), (2, 58)], [(5, 128)]], 128, None),
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_einsum_forward_and_gradients(case):
    rows, L, window = CASES[case]
    seg_BxL = _segments(rows, L)
    q, k, v = _qkv(len(rows), L)
    valid_BxL = seg_BxL > 0
    cot_BxLxHxDh = jax.random.normal(jax.random.key(7), q.shape) * valid_BxL[:, :, None, None]
    mask_BxLxL = _einsum_mask(seg_BxL, window)

    def splash(q, k, v):
        return attention.attend_splash(q, k, v, seg_BxL, window=window, interpret=True)

    def xla(q, k, v):
        return attention.attend_xla(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask_BxLxL)

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * cot_BxLxHxDh), out

    outs, grads = {}, {}
    for name, fn in (("splash", splash), ("xla", xla)):  # one compile each: output and gradients together
        grads[name], outs[name] = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
        outs[name] = np.asarray(outs[name])
    err = np.abs(outs["splash"] - outs["xla"])[np.asarray(valid_BxL)].max()
    assert err <= TOL, f"forward max error {err:.2e}"
    assert np.abs(outs["xla"]).max() > 0.1  # a real comparison, not of zeros
    for name, gs, gx in zip("qkv", grads["splash"], grads["xla"]):
        gerr = np.abs(np.asarray(gs) - np.asarray(gx)).max()
        assert gerr <= TOL, f"d{name} max error {gerr:.2e}"
        assert np.abs(np.asarray(gx)).max() > 0.1


def test_kernel_runs_per_shard_under_the_mesh(devices):
    # The context mesh makes attend_splash run under shard_map (rows over data x fsdp, heads over
    # tensor), as on TPU where XLA cannot split the kernel; the result is the unsharded one.
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices)
    seg_BxL = _segments([[(1, 128)], [(1, 90)], [(0, 30), (1, 98)], [(1, 60), (2, 68)]], 128)
    q, k, v = _qkv(4, 128, seed=3)
    fn = jax.jit(lambda q, k, v, s: attention.attend_splash(q, k, v, s, window=48, interpret=True))
    want = np.asarray(fn(q, k, v, seg_BxL))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = (put(q, P(shd.BATCH, None, "tensor")), put(k, P(shd.BATCH, None, "tensor")),
            put(v, P(shd.BATCH, None, "tensor")), put(seg_BxL, P(shd.BATCH)))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert "shard_map" in str(jax.make_jaxpr(fn)(*args))
        got = np.asarray(fn(*args))
    valid = np.asarray(seg_BxL > 0)
    np.testing.assert_allclose(got[valid], want[valid], atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Through the model

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=H, num_kv_heads=K,
                  head_dim=Dh, sliding_window=12, max_position_embeddings=128)


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0))


def _pick(attn):
    return dataclasses.replace(CFG, attention=attn)


def test_model_apply_splash_matches_einsum_with_gradients(params):
    # Row 0 packs three sequences (positions restart in each; the window of 12 binds in all), row 1 is
    # right-padded: packed segments, padding, the window and GQA 4:1 through both layers.
    L = 40
    ids_BxL = jax.random.randint(jax.random.key(1), (2, L), 0, CFG.vocab_size)
    seg_BxL = _segments([[(1, 15), (2, 17), (3, 8)], [(1, 23)]], L)
    positions_BxL = jnp.asarray([list(range(15)) + list(range(17)) + list(range(8)), list(range(L))])
    valid_BxL = np.asarray(seg_BxL > 0)
    cot_BxLxD = jax.random.normal(jax.random.key(2), (2, L, CFG.hidden_size)) * valid_BxL[:, :, None]

    def loss(p, cfg):
        hidden_BxLxD = model.apply(cfg, p, ids_BxL, positions_BxL, seg_BxL > 0, segment_ids_BxL=seg_BxL)[0]
        return jnp.sum(hidden_BxLxD * cot_BxLxD), hidden_BxLxD

    hidden, grads = {}, {}
    for attn in ("splash", "xla"):
        grads[attn], hidden[attn] = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, _pick(attn))
    assert np.abs(np.asarray(hidden["splash"]) - np.asarray(hidden["xla"]))[valid_BxL].max() <= TOL
    # Param gradients sum over every token (the embedding's reach ~460 here): compared at each leaf's
    # own scale, max |splash - einsum| <= 1e-5 max |einsum| (the einsum vs. fused-call gap is the same size).
    for path, gs in jax.tree_util.tree_leaves_with_path(grads["splash"]):
        gx = np.asarray(dict(jax.tree_util.tree_leaves_with_path(grads["xla"]))[path])
        assert np.abs(np.asarray(gs) - gx).max() <= TOL * max(np.abs(gx).max(), 1.0), jax.tree_util.keystr(path)
    assert np.abs(np.asarray(grads["xla"]["layers"]["q"])).max() > 1e-3  # attention grads are really compared


def test_prefill_uses_splash_and_fills_the_same_cache(params):
    # The sampler's prefill: left-padded prompts, a cache, cache index 0, attending its own P slots.
    P_, S = 24, 32
    lengths_B = jnp.asarray([24, 9])
    ids_BxP = jax.random.randint(jax.random.key(4), (2, P_), 0, CFG.vocab_size)
    valid_BxP = jnp.arange(P_)[None] >= (P_ - lengths_B[:, None])
    pos_BxP = jnp.arange(P_)[None] - (P_ - lengths_B[:, None])  # sampler.left_pad_positions
    assert model.attention_impl(_pick("splash"), cached=True, right_padded=False, q_len=P_, default_positions=False,
                                prefill=True) == "splash"
    out = {}
    for attn in ("splash", "xla"):
        cfg = _pick(attn)
        h, cache = jax.jit(lambda p: model.apply(cfg, p, ids_BxP, pos_BxP, valid_BxP, model.init_cache(cfg, 2, S), 0))(
            params)
        # then one decode step (einsum over the cache either way) at slot P with position = length
        kv_mask = jnp.concatenate([valid_BxP, jnp.ones((2, S - P_), bool)], axis=1)
        h1, _ = jax.jit(lambda p, c: model.apply(cfg, p, ids_BxP[:, :1], lengths_B[:, None], kv_mask, c, P_))(
            params, cache)
        out[attn] = (np.asarray(h), np.asarray(cache["k"]), np.asarray(cache["v"]), np.asarray(h1))
    valid = np.asarray(valid_BxP)
    np.testing.assert_allclose(out["splash"][0][valid], out["xla"][0][valid], atol=TOL, rtol=0)
    for i in (1, 2):  # [N, B, K, S, Dh] -> [B, S, N, K, Dh]: valid prompt slots
        slots = lambda c: c[:, :, :, :P_].transpose(1, 3, 0, 2, 4)[valid]
        np.testing.assert_allclose(slots(out["splash"][i]), slots(out["xla"][i]), atol=TOL, rtol=0)
    np.testing.assert_allclose(out["splash"][3], out["xla"][3], atol=TOL, rtol=0)


def test_dispatch_follows_the_target_platform(monkeypatch):
    pick = lambda cfg, **kw: model.attention_impl(cfg, **{"cached": False, "right_padded": True, "q_len": 64, **kw})
    assert attention.target_platform() == "cpu" and pick(CFG) == "xla"  # auto on CPU: einsums
    monkeypatch.setattr(attention, "target_platform", lambda: "tpu")
    monkeypatch.setattr(attention, "splash_placeable", lambda: True)
    assert pick(CFG) == "splash" and pick(CFG, right_padded=False) == "splash"
    assert pick(CFG, cached=True) == "xla"  # decode over the cache
    assert pick(CFG, cached=True, right_padded=False, default_positions=False, prefill=True) == "splash"
    assert pick(CFG, default_positions=False) == "xla"  # a binding window over arbitrary positions
    assert pick(CFG, default_positions=False, segmented=True) == "splash"  # packed rows promise them
    assert pick(CFG, q_len=12, default_positions=False) == "splash"  # the window never binds
    assert pick(dataclasses.replace(CFG, attention="xla")) == "xla"
    monkeypatch.setattr(attention, "splash_placeable", lambda: False)  # several devices, no context mesh
    assert pick(CFG) == "xla" and pick(_pick("splash")) == "splash"


def test_target_platform_is_the_context_meshs(devices):
    mesh = shd.make_mesh(MeshConfig(data=8), devices)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert attention.target_platform() == "cpu" and attention.splash_placeable()
    assert not attention.splash_placeable()  # 8 devices, no mesh: a TPU kernel could not be placed
