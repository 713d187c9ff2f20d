"""The performance paths mean the same as the plain ones (docs/perf.md), checked on CPU in fp32.

Attention dispatch (cuDNN only where it applies, the einsum path on CPU), the fused attention call
against the einsum path on real positions, the Triton decode kernel (Pallas' interpreter here: alone,
through the sampler, per shard under a mesh), windowed cache reads, the segmented decode loop, layers
unrolled over per-layer weights, the CPU argmax, the two-stage categorical draw, params cast once, and the
log-prob head's own VJP against autodiff.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spjax import attention, decode_attention, logprobs, model, sampler
from spjax.config import ConfigError, ModelConfig

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=128)
LENGTHS = (19, 11, 1)  # right padding on rows 1 and 2; row 2 is a lone token


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0))


def _right_padded(L=19, seed=1):
    ids_BxL = jax.random.randint(jax.random.key(seed), (len(LENGTHS), L), 0, CFG.vocab_size)
    mask_BxL = jnp.arange(L)[None] < jnp.asarray(LENGTHS)[:, None]
    return ids_BxL, mask_BxL


def _generate_args(params, P):
    """sampler._generate's arguments after (cfg, settings): three prompts of 16, 9 and 3 tokens, fixed keys."""
    lens = np.array([16, 9, 3], np.int32)
    prompt = np.asarray(jax.random.randint(jax.random.key(7), (len(lens), P), 0, CFG.vocab_size), np.int32)
    return (params, prompt, lens, np.ones(len(lens), bool), np.arange(len(lens), dtype=np.uint32),
            np.asarray(jax.random.key_data(jax.random.key(8))),
            dict(temperature=np.float32(1.0), top_k=np.int32(0), top_p=np.float32(1.0)), np.full(4, -1, np.int32))


# ---------------------------------------------------------------------------------------------
# Attention


def test_dispatch_picks_xla_on_cpu_and_cudnn_only_where_it_applies(monkeypatch):
    bf = dataclasses.replace(CFG, compute_dtype="bfloat16")
    pick = lambda cfg, **kw: model.attention_impl(cfg, **{"cached": False, "right_padded": True, "q_len": 64, **kw})
    assert CFG.attention == "auto"
    assert jax.default_backend() == "cpu"
    assert pick(bf) == "xla" and pick(CFG) == "xla"
    monkeypatch.setattr(attention, "_gpu_is_cuda", lambda: True)  # as on an H100
    assert pick(bf) == "cudnn"
    assert pick(CFG) == "xla"  # fp32 compute
    assert pick(bf, cached=True) == "xla"  # prefill / decode over the cache
    assert pick(bf, right_padded=False) == "xla"  # arbitrary key masks
    assert pick(dataclasses.replace(bf, head_dim=160)) == "xla"
    window = dataclasses.replace(bf, sliding_window=16)
    assert pick(window) == "cudnn" and pick(window, default_positions=False) == "xla"
    assert pick(window, q_len=16, default_positions=False) == "cudnn"  # the window never bites
    assert pick(dataclasses.replace(bf, attention="xla")) == "xla"
    assert pick(dataclasses.replace(bf, attention="cudnn")) == "cudnn"
    monkeypatch.setattr(attention, "_gpu_is_cuda", lambda: False)  # as on ROCm: auto declines, cudnn insists
    assert pick(bf) == "xla" and pick(dataclasses.replace(bf, attention="cudnn")) == "cudnn"
    assert pick(dataclasses.replace(bf, attention="cudnn"), cached=True) == "xla"  # cuDNN cannot serve it
    assert pick(dataclasses.replace(bf, attention="xla_fused")) == "xla_fused"
    assert pick(dataclasses.replace(CFG, attention="xla_fused"), right_padded=False) == "xla"


def test_dispatch_picks_the_decode_kernel_for_one_token_over_layer_buffers(monkeypatch):
    bf = dataclasses.replace(CFG, compute_dtype="bfloat16")
    pick = lambda cfg, **kw: model.attention_impl(cfg, **{"cached": True, "right_padded": False, "q_len": 1,
                                                          "layer_slots": 64, **kw})
    assert pick(bf) == "xla"  # CPU: the einsum path unless forced
    assert pick(dataclasses.replace(CFG, attention="triton")) == "triton"  # forced: Pallas' interpreter
    monkeypatch.setattr(attention, "_gpu_is_cuda", lambda: True)
    monkeypatch.setattr(attention, "target_platform", lambda: "gpu")
    monkeypatch.setattr(attention, "splash_placeable", lambda: True)  # one GPU, or a context mesh
    assert pick(bf) == "triton"
    assert pick(CFG) == "xla"  # fp32 compute
    assert pick(bf, layer_slots=0) == "xla"  # a stacked cache, or a window of the buffer
    assert pick(bf, q_len=4) == "xla"  # a prefill or several tokens
    assert pick(dataclasses.replace(bf, architecture="gemma2", attn_softcap=50.0)) == "xla"
    assert pick(dataclasses.replace(bf, sliding_window=32)) == "xla"  # a window that binds within 64 slots
    assert pick(dataclasses.replace(bf, sliding_window=64)) == "triton"  # one that never does
    assert pick(bf, layer_slots=40) == "xla"  # slots not in blocks of 16
    assert pick(dataclasses.replace(bf, attention="xla")) == "xla"
    monkeypatch.setattr(attention, "splash_placeable", lambda: False)  # several devices and no mesh to split by
    assert pick(bf) == "xla"


@pytest.mark.parametrize("tuning", ["", "splits=3,block=16"])
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("slot", [0, 17, 47])
def test_decode_kernel_equals_einsum_path_and_writes_its_token(dtype, atol, slot, tuning, monkeypatch):
    """The Triton decode kernel (Pallas' interpreter here) against attend_xla over the updated buffer:
    three query heads per kv head (padded to 16 in the kernel), random holes in the mask, the token
    at the first, a middle and the last slot; one program per (row, kv head), or three over a third of
    the slots each, combined after the kernel (SPJAX_DECODE_KERNEL's splits)."""
    monkeypatch.setenv("SPJAX_DECODE_KERNEL", tuning)
    B, H, K, S, Dh = 3, 6, 2, 48, 16
    keys = jax.random.split(jax.random.key(slot), 6)
    q, k_new, v_new = (jax.random.normal(kk, shape, dtype) for kk, shape in
                       zip(keys, ((B, H, Dh), (B, K, Dh), (B, K, Dh))))
    k_buf, v_buf = (jax.random.normal(kk, (B, K, S, Dh), dtype) for kk in keys[3:5])
    mask_BxS = (jax.random.uniform(keys[5], (B, S)) > 0.3).at[:, slot].set(True)
    attend = jax.jit(lambda *a: decode_attention.attend_decode(*a, scale=0.3))
    out, k_got, v_got = attend(q, k_new, v_new, mask_BxS, k_buf, v_buf, jnp.int32(slot))
    k_ref, v_ref = k_buf.at[:, :, slot].set(k_new), v_buf.at[:, :, slot].set(v_new)
    np.testing.assert_array_equal(np.asarray(k_got), np.asarray(k_ref))
    np.testing.assert_array_equal(np.asarray(v_got), np.asarray(v_ref))
    seen_Bx1xS = (mask_BxS & (jnp.arange(S) <= slot))[:, None]
    ref = attention.attend_xla(q[:, None], k_ref, v_ref, seen_Bx1xS, scale=0.3)[:, 0]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=0, atol=atol)
    # the slots past the token are never read: garbage there changes nothing
    junk = lambda buf: buf.at[:, :, slot + 1:].set(jnp.nan)
    again, _, _ = attend(q, k_new, v_new, mask_BxS, junk(k_buf), junk(v_buf), jnp.int32(slot))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_through_the_decode_kernel_equals_the_einsum_path(params, temperature):
    B, P, T = 3, 16, 24
    S = sampler.cache_len(P, T)
    args = _generate_args(params, P)
    settings = sampler._Settings(max_new_tokens=T, cache_len=S, greedy=temperature == 0, truncate=False, pad_id=0,
                                 segments=1, unroll_layers=True, layer_caches=True)
    out = {a: jax.tree.map(np.asarray, sampler._generate(dataclasses.replace(CFG, attention=a), settings, *args))
           for a in ("xla", "triton")}
    np.testing.assert_array_equal(out["triton"]["tokens_BxT"], out["xla"]["tokens_BxT"])
    np.testing.assert_allclose(out["triton"]["logprobs_BxT"], out["xla"]["logprobs_BxT"], rtol=0, atol=1e-5)
    text = sampler.lower(dataclasses.replace(CFG, attention="triton"),
                         sampler.make_plan(prompt_len=P, max_new_tokens=T, batch_size=B, unroll_layers=True),
                         params).as_text(debug_info=True)
    assert "spjax_decode_attention/pallas_call" in text  # the kernel, not a fallback, served the decode steps


def test_decode_kernel_runs_per_shard_under_the_run_mesh(params):
    """Under a context mesh (a run traces under one) the kernel runs per device on its rows and kv heads
    (shard_map): the same greedy samples on a data x tensor mesh as the einsum path on one device."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from spjax import sharding as shd
    from spjax.config import MeshConfig
    prompts = [list(range(3, 3 + n)) for n in (16, 9, 3, 12)]
    kw = dict(key=0, max_new_tokens=20, temperature=0.0, unroll_layers=True)
    ref = sampler.sample(dataclasses.replace(CFG, attention="xla"), params, prompts, **kw)
    mesh = shd.make_mesh(MeshConfig(data=2, tensor=2), devices=jax.devices()[:4])
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        got = sampler.sample(dataclasses.replace(CFG, attention="triton"), params, prompts, mesh=mesh, **kw)
    assert got.tokens == ref.tokens
    np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(ref.logprobs), rtol=0, atol=1e-5)
    # the kernel alone, on inputs placed as the run places them: each device's heads meet their kv heads
    B, H, K, S, Dh = 4, 4, 2, 32, 16
    keys = jax.random.split(jax.random.key(1), 5)
    args = [jax.random.normal(kk, shape) for kk, shape in
            zip(keys, ((B, H, Dh), (B, K, Dh), (B, K, Dh), (B, K, S, Dh), (B, K, S, Dh)))]
    args.insert(3, jnp.ones((B, S), bool))
    one = decode_attention.attend_decode(*args, jnp.int32(20), scale=0.25)
    specs = [P("data", "tensor")] * 3 + [P("data")] + [P("data", "tensor")] * 2
    placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(args, specs)]
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        split = jax.jit(lambda *a: decode_attention.attend_decode(*a, scale=0.25))(*placed, jnp.int32(20))
    for a, b in zip(split, one):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_attention_is_a_validated_config_field_in_the_jit_key():
    with pytest.raises(ConfigError, match="model.attention"):
        dataclasses.replace(CFG, attention="bogus")
    with pytest.raises(ConfigError, match="model.attention"):
        dataclasses.replace(CFG, attention="XLA")  # exact names, as the other enumerated fields
    xla = dataclasses.replace(CFG, attention="xla")
    assert xla != CFG and hash(xla) != hash(CFG)  # a static jit argument: a different cache entry
    # A run's top-level `attention` reaches the model config like remat does, also for model_path.
    from spjax.config import Config
    from spjax.overrides import override
    run = override(Config(model=CFG), "attention", "xla_fused")
    assert run.model_overrides()["attention"] == "xla_fused"
    assert dataclasses.replace(run.model, **run.model_overrides()).attention == "xla_fused"
    with pytest.raises(ConfigError, match=r"^attention: 'bogus' not in"):  # at load, before any compile
        override(Config(model=CFG), "attention", "bogus")


@pytest.mark.parametrize("window", [None, 5])
def test_fused_attention_call_equals_einsum_path(window):
    B, L, H, K, Dh = 3, 19, 4, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(kq, (B, L, H, Dh))
    k = jax.random.normal(kk, (B, L, K, Dh))
    v = jax.random.normal(kv, (B, L, K, Dh))
    valid_BxL = jnp.arange(L)[None] < jnp.asarray(LENGTHS)[:, None]
    pos = jnp.arange(L)
    mask_BxLxL = (pos[None, :] <= pos[:, None])[None] & valid_BxL[:, None, :]
    if window is not None:
        mask_BxLxL &= (pos[:, None] - pos[None, :] < window)[None]
    ref = model.attend_xla(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask_BxLxL)
    got = model.attend_fused(q, k, v, window=window, implementation="xla")
    real = np.asarray(valid_BxL)  # padded queries are unspecified on the fused path
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_model_through_fused_call_equals_einsum_path(params, sliding_window):
    cfg = dataclasses.replace(CFG, sliding_window=sliding_window)
    ids, mask = _right_padded()
    xla, fused = (dataclasses.replace(cfg, attention=a) for a in ("xla", "xla_fused"))
    ref, _ = model.apply(xla, params, ids, kv_mask_BxS=mask, right_padded=True)
    got, _ = model.apply(fused, params, ids, kv_mask_BxS=mask, right_padded=True)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], rtol=0, atol=1e-5)
    # Not promised right padding: the einsum path whatever the config asks for.
    assert model.attention_impl(fused, cached=False, right_padded=False, q_len=19) == "xla"
    # Under jit the field is part of the cache key: each config traces (once) its own path.
    traced = []

    def hidden(c, p, x, m):
        traced.append(model.attention_impl(c, cached=False, right_padded=True, q_len=x.shape[1]))
        return model.apply(c, p, x, kv_mask_BxS=m, right_padded=True)[0]

    jitted = jax.jit(hidden, static_argnums=0)
    outs = [np.asarray(jitted(c, params, ids, mask)) for c in (xla, fused, xla)]
    assert traced == ["xla", "xla_fused"]
    for out, want in zip(outs, (ref, got, ref)):
        np.testing.assert_allclose(out[real], np.asarray(want)[real], rtol=0, atol=1e-5)


def test_cache_window_equals_whole_buffer(params):
    """Attending over the leading W slots of a bigger buffer ≡ over all of it (the rest is unused)."""
    B, P, S, W = 2, 12, 48, 16
    ids = jax.random.randint(jax.random.key(3), (B, P + 1), 0, CFG.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(P + 1), (B, P + 1))
    outs = []
    for width in (S, W):
        cache = model.init_cache(CFG, B, S)
        valid = jnp.ones((B, width), bool)
        _, cache = model.apply(CFG, params, ids[:, :P], pos[:, :P], valid[:, :P], cache, 0)
        hidden, cache = model.apply(CFG, params, ids[:, P:], pos[:, P:], valid, cache, P)
        outs.append((np.asarray(hidden), np.asarray(cache["k"])))
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(outs[1][1], outs[0][1])  # the same slots written
    with pytest.raises(ValueError, match="attended"):
        model.apply(CFG, params, ids[:, :P], pos[:, :P], jnp.ones((B, P - 1), bool), model.init_cache(CFG, B, S), 0)


# ---------------------------------------------------------------------------------------------
# Sampler


@pytest.mark.parametrize("P,T,S", [(16, 16, 32), (128, 128, 256), (256, 256, 512), (5, 100, 112), (16, 2, 32)])
def test_decode_windows_cover_every_step(P, T, S):
    for segments in (0, 1, 3, 8):
        windows = sampler._decode_windows(P, T, S, segments)
        first = 1
        for last, W in windows:
            assert last >= first and P + last <= W <= S  # step j attends over [0, P + j)
            assert W == S or W % sampler._WINDOW_ROUND == 0
            first = last + 1
        assert first == T  # steps 1 .. T-1, each in exactly one segment
    assert len(sampler._decode_windows(256, 256, 512)) == sampler._MAX_SEGMENTS


def test_argmax_matches_jax():
    x = jax.random.normal(jax.random.key(4), (6, 50))
    x = x.at[1, 7].set(9.0).at[1, 30].set(9.0)  # a tie: the first wins
    x = x.at[2].set(-jnp.inf).at[3, 11].set(jnp.nan).at[3, 40].set(jnp.nan)
    assert sampler._argmax(x).dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(sampler._argmax(x)), np.asarray(jnp.argmax(x, axis=-1)))


def test_two_stage_draws_follow_the_softmax():
    """40k draws over V = 600 (3 blocks of 256 slots, the last 168 slots padding; block 1, tokens
    1, 4, 7, ..., and three more tokens at -inf): none outside the support, chi-square against the
    softmax, p > 1e-3. A block chosen by its largest logit instead of its logsumexp fails it (p = 2e-8,
    checked)."""
    import scipy.stats
    V, n = 600, 40_000
    z = np.asarray(jax.random.normal(jax.random.key(6), (V,)), np.float64) * 2
    z[1::3] = -np.inf
    z[[3, 40, 599]] = -np.inf
    keys = jax.random.split(jax.random.key(5), n)
    draws = jax.jit(sampler._categorical)(keys, jnp.broadcast_to(jnp.asarray(z, jnp.float32), (n, V)))
    assert draws.dtype == jnp.int32
    probs = np.exp(z - z[np.isfinite(z)].max())
    probs /= probs.sum()
    counts = np.bincount(np.asarray(draws), minlength=V)
    assert len(counts) == V and counts[probs == 0].sum() == 0
    big = probs * n >= 5  # the rare tokens pooled into one bin, so the chi-square approximation holds
    obs, expected = np.append(counts[big], counts[~big].sum()), np.append(probs[big], probs[~big].sum()) * n
    assert big.sum() > 100
    assert scipy.stats.chisquare(obs, expected * (n / expected.sum())).pvalue > 1e-3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_segmented_unrolled_decode_equals_one_scanned_loop(params, temperature):
    P, T = 16, 40
    S = sampler.cache_len(P, T)
    args = _generate_args(params, P)
    out = {}
    # unrolled: a KV buffer per layer (the default), or slices of one stack
    for segments, unroll, own in ((1, False, True), (4, False, True), (4, True, True), (4, True, False),
                                  (1, True, True)):
        assert len(sampler._decode_windows(P, T, S, segments)) == (1 if segments == 1 else 3)  # 32, 48, 64
        settings = sampler._Settings(max_new_tokens=T, cache_len=S, greedy=temperature == 0, truncate=False,
                                     pad_id=0, segments=segments, unroll_layers=unroll, layer_caches=own)
        out[segments, unroll, own] = jax.tree.map(np.asarray, sampler._generate(CFG, settings, *args))
    for key in ((4, False, True), (4, True, True), (4, True, False), (1, True, True)):
        np.testing.assert_array_equal(out[key]["tokens_BxT"], out[1, False, True]["tokens_BxT"])
        np.testing.assert_allclose(out[key]["logprobs_BxT"], out[1, False, True]["logprobs_BxT"], rtol=0, atol=1e-5)


def test_unstacked_layers_equal_the_scan(params):
    ids, mask = _right_padded()
    flat = model.unstack_layers(CFG, params)
    assert len(flat["layers"]) == CFG.num_layers
    ref, _ = model.apply(CFG, params, ids, kv_mask_BxS=mask)
    got, _ = model.apply(CFG, flat, ids, kv_mask_BxS=mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5)
    B, S = ids.shape[0], 32
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    valid = jnp.ones((B, S), bool)
    outs = [model.apply(CFG, p, ids, pos, valid, model.init_cache(CFG, B, S), 0) for p in (params, flat)]
    np.testing.assert_allclose(np.asarray(outs[1][0]), np.asarray(outs[0][0]), rtol=0, atol=1e-5)
    for n in ("k", "v"):
        np.testing.assert_allclose(np.asarray(outs[1][1][n]), np.asarray(outs[0][1][n]), rtol=0, atol=1e-5)
    # a buffer per layer: the same hidden states and cache, and the layout comes back as given
    own = model.apply(CFG, flat, ids, pos, valid, model.unstack_cache(model.init_cache(CFG, B, S)), 0)
    np.testing.assert_allclose(np.asarray(own[0]), np.asarray(outs[0][0]), rtol=0, atol=1e-5)
    assert model.cache_slots(own[1]) == S and all(len(own[1][n]) == CFG.num_layers for n in ("k", "v"))
    for n in ("k", "v"):
        np.testing.assert_allclose(np.stack(own[1][n]), np.asarray(outs[0][1][n]), rtol=0, atol=1e-5)


def test_unrolled_decode_keeps_no_stacked_cache(params):
    """With a KV buffer per layer the sampling program never builds the [N, B, K, S, Dh] stack, whose
    per-layer window XLA:GPU copied on every decode step (docs/perf.md, 2026-12-04)."""
    B, P, T = 4, 16, 16
    S = sampler.cache_len(P, T)
    stack = f"f32[{CFG.num_layers},{B},{CFG.num_kv_heads},{S},{CFG.head_dim}]"
    text = {}
    for own in (True, False):
        plan = sampler.make_plan(prompt_len=P, max_new_tokens=T, batch_size=B, unroll_layers=True, layer_caches=own)
        text[own] = sampler.lower(CFG, plan, params).compile().as_text()
    assert stack in text[False] and stack not in text[True]
    plan = sampler.make_plan(prompt_len=P, max_new_tokens=T, batch_size=B, unroll_layers=True)
    assert plan.windows(CFG) == ((T - 1, S),)  # buffers of its own: each layer reads its buffer whole


def test_params_cast_once_is_bit_identical(params):
    bf = dataclasses.replace(CFG, compute_dtype="bfloat16")
    ids, mask = _right_padded()
    cast = model.cast_params(bf, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast))
    a, _ = model.apply(bf, params, ids, kv_mask_BxS=mask)
    b, _ = model.apply(bf, cast, ids, kv_mask_BxS=mask)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    np.testing.assert_array_equal(np.asarray(model.unembed(bf, params, a)), np.asarray(model.unembed(bf, cast, a)))


# ---------------------------------------------------------------------------------------------
# Log-prob head


def _autodiff_logprobs(cfg, p, ids, target, mask):
    """The plain formulation: full logits, log_softmax, gather; differentiated by jax."""
    hidden, _ = model.apply(cfg, p, ids, kv_mask_BxS=mask)
    logp = jax.nn.log_softmax(model.unembed(cfg, p, hidden[:, :-1]), axis=-1)
    lp = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    score = target[:, 1:] & mask[:, 1:]
    return jnp.sum(jnp.where(score, lp, 0.0), axis=-1)


@pytest.mark.parametrize("tied", [False, True])
def test_head_vjp_equals_autodiff(tied):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    p = model.init_params(cfg, jax.random.key(9))
    ids, mask = _right_padded()
    target = jnp.arange(ids.shape[1])[None] >= 4
    w_B = jnp.array([1.0, -0.5, 2.0])
    ref_fn = lambda q: jnp.sum(w_B * _autodiff_logprobs(cfg, q, ids, target, mask))
    got_fn = lambda q: jnp.sum(w_B * logprobs.sequence_logprobs(cfg, q, ids, target, mask, chunk=5))
    (ref, g_ref), (got, g_got) = jax.value_and_grad(ref_fn)(p), jax.value_and_grad(got_fn)(p)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g_got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_head_vjp_bf16_runs_matmuls_in_bf16():
    cfg = dataclasses.replace(CFG, compute_dtype="bfloat16")
    p = model.init_params(cfg, jax.random.key(10))
    ids, mask = _right_padded()
    target = jnp.ones_like(mask)
    f = lambda q: jnp.sum(logprobs.sequence_logprobs(cfg, q, ids, target, mask, chunk=8))
    g = jax.grad(f)(p)
    assert all(np.isfinite(np.asarray(x)).all() and x.dtype == jnp.float32 for x in jax.tree.leaves(g))
    # Every vocab-sized matmul (the head, forward and backward) takes bf16 operands; autodiff of
    # the fp32-accumulated projection would feed the fp32 cotangent to the backward ones.
    head_dots = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and any(cfg.vocab_size in v.aval.shape for v in eqn.invars):
                head_dots.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(jax.grad(f))(p).jaxpr)
    assert len(head_dots) >= 4, head_dots  # forward, its recompute, d_hidden, d_w
    assert all(d == ("bfloat16", "bfloat16") for d in head_dots), head_dots
