"""Gemma 2 and Gemma 3 (and OLMo 3's and SmolLM3's windows by layer) beyond the family tests that cover every oracle family (logits with padding in
test_model, export and import in test_hf, greedy decoding in test_sampler): the attention kernels that
pick each layer's window inside the layer scan, the soft-capped head's own backward pass, configs as
transformers reads and writes them, and what is refused."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spjax import hf, logprobs, model
from spjax.config import ConfigError, ModelConfig
from tests import oracle

L = 40  # > the oracle's window of 8: windowed and full layers differ


def _batch(cfg):
    ids_BxL = jnp.asarray(np.random.RandomState(0).randint(1, cfg.vocab_size, (2, L)), jnp.int32)
    return ids_BxL, jnp.asarray(np.arange(L)[None] < np.array([[L], [23]]))  # row 1 right-padded


@pytest.mark.parametrize("family,kernel", [("gemma3", "xla_fused"), ("gemma2", "splash"), ("olmo3", "splash"),
                                           ("smollm3", "xla_fused")])
def test_kernels_pick_each_layers_window_in_the_scan(family, kernel):
    """A kernel takes its window as a static argument, so a scanned layer chooses between a windowed and
    a full call (lax.cond); the same hidden states and gradients as the einsum path, which masks. Gemma 2's
    soft cap on the scores goes into splash; the cuDNN call has none (attention_impl avoids it). OLMo 3's
    and SmolLM3's windowed layers (the first's with its own rope, the second's with none) are picked so too."""
    cfg, params = oracle.spjax_model(family)
    ids_BxL, valid_BxL = _batch(cfg)

    def loss(p, c):
        hidden_BxLxD = model.apply(c, p, ids_BxL, kv_mask_BxS=valid_BxL, right_padded=True)[0]
        return jnp.sum(jnp.where(valid_BxL[..., None], hidden_BxLxD, 0) ** 2), hidden_BxLxD

    fast = dataclasses.replace(cfg, attention=kernel)
    assert "cond[" in str(jax.make_jaxpr(lambda p: loss(p, fast))(params))
    (g_fast, h_fast), (g_xla, h_xla) = (jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, c)
                                        for c in (fast, dataclasses.replace(cfg, attention="xla")))
    valid = np.asarray(valid_BxL)
    assert np.abs(np.asarray(h_fast) - np.asarray(h_xla))[valid].max() <= 1e-5
    for path, gx in jax.tree_util.tree_leaves_with_path(g_xla):
        gf = dict(jax.tree_util.tree_leaves_with_path(g_fast))[path]
        assert np.abs(np.asarray(gf) - np.asarray(gx)).max() <= 1e-5 * max(np.abs(np.asarray(gx)).max(), 1.0), path
    if kernel == "xla_fused":  # and a soft cap on the scores keeps Gemma 2 off the fused call
        assert model.attention_impl(dataclasses.replace(oracle.spjax_model("gemma2")[0], attention=kernel),
                                    cached=False, right_padded=True, q_len=L) == "xla"


@pytest.mark.parametrize("chunk", [None, 8])
def test_soft_capped_head_log_probs_and_gradients(chunk):
    """logprobs' head (its own VJP: a recomputed chunk's softmax times the cap's derivative) against
    autodiff of cap * tanh(logits / cap) then log_softmax, in one chunk and in several."""
    cfg, params = oracle.spjax_model("gemma2")
    cfg = dataclasses.replace(cfg, final_softcap=0.5)  # low: it bends these small logits strongly
    ids_BxL, valid_BxL = _batch(cfg)
    target_BxL = jnp.asarray(np.arange(L)[None] >= 10).repeat(2, 0)

    def ours(p):
        return logprobs.token_logprobs(cfg, p, ids_BxL, target_BxL, valid_BxL, chunk=chunk)

    def reference(p):
        hidden_BxLxD = model.apply(cfg, p, ids_BxL, kv_mask_BxS=valid_BxL, right_padded=True)[0]
        logp_BxLxV = jax.nn.log_softmax(model.unembed(cfg, p, hidden_BxLxD), axis=-1)
        lp_BxT = jnp.take_along_axis(logp_BxLxV[:, :-1], ids_BxL[:, 1:, None], axis=-1)[..., 0]
        scored_BxT = (target_BxL & valid_BxL)[:, 1:]
        return jnp.concatenate([jnp.zeros((2, 1)), jnp.where(scored_BxT, lp_BxT, 0)], axis=1)

    np.testing.assert_allclose(np.asarray(jax.jit(ours)(params)), np.asarray(jax.jit(reference)(params)),
                               atol=1e-5, rtol=0)
    weights_BxL = jax.random.normal(jax.random.key(3), (2, L))
    g_ours, g_ref = (jax.jit(jax.grad(lambda p: jnp.sum(f(p) * weights_BxL)))(params) for f in (ours, reference))
    for path, gr in jax.tree_util.tree_leaves_with_path(g_ref):
        go = dict(jax.tree_util.tree_leaves_with_path(g_ours))[path]
        assert np.abs(np.asarray(go) - np.asarray(gr)).max() <= 1e-5 * max(np.abs(np.asarray(gr)).max(), 1.0), path
    uncapped = dataclasses.replace(cfg, final_softcap=0.0)
    capped_BxL = jax.jit(ours)(params)
    assert np.abs(np.asarray(jax.jit(logprobs.token_logprobs, static_argnums=0)(
        uncapped, params, ids_BxL, target_BxL, valid_BxL)) - np.asarray(capped_BxL)).max() > 1e-2  # the cap binds: the comparison above counts


GEMMA3_4X = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=256, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window=512,
                 sliding_window_pattern=3, rope_scaling={"rope_type": "linear", "factor": 8.0},
                 query_pre_attn_scalar=16, max_position_embeddings=4096)


@pytest.mark.parametrize("conf", [GEMMA3_4X, dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2",
                                                 vocab_size=256, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=4, num_attention_heads=4,
                                                 max_position_embeddings=8192)],
                         ids=["gemma3-4.x-keys", "gemma2-defaults"])
def test_configs_read_and_written_as_transformers_does(conf):
    """A config read as transformers' config class reads it (its defaults, 4.x keys), and exported so that
    the class reads the same settings again."""
    import transformers
    cls = transformers.Gemma3TextConfig if conf["model_type"] == "gemma3_text" else transformers.Gemma2Config
    ours, theirs = hf.config_from_hf(dict(conf)), cls(**conf)

    def settings(c):  # what transformers computes with, per layer type
        rope = c.rope_parameters
        full, local = (rope["full_attention"], rope["sliding_attention"]) if "full_attention" in rope else (rope, rope)
        return (c.layer_types, c.sliding_window, c.head_dim, c.query_pre_attn_scalar, c.final_logit_softcapping,
                c.attn_logit_softcapping if cls is transformers.Gemma2Config else None, c.tie_word_embeddings,
                full["rope_type"], full["rope_theta"], full.get("factor"), local["rope_theta"], c.hidden_activation)

    want = settings(theirs)
    assert ours.windowed == tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert (ours.sliding_window, ours.head_dim, ours.query_scale, ours.final_softcap or None) == want[1:5]
    assert (ours.attn_softcap or None, ours.tie_embeddings, ours.rope_type, ours.rope_theta) == want[5:9]
    assert (ours.rope_factor if ours.rope_type == "linear" else None, ours.rope_local_theta or ours.rope_theta) \
        == want[9:11]
    exported = hf.config_to_hf(ours)
    assert settings(cls(**exported)) == want
    assert hf.config_from_hf(exported) == ours


@pytest.mark.parametrize("change,message", [
    (dict(hidden_activation="gelu"), "hidden_activation 'gelu' is not supported"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention is true"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "rope_parameters.sliding_attention is 'linear'"),
])
def test_what_spjax_would_compute_otherwise_is_refused(change, message):
    conf = {k: v for k, v in GEMMA3_4X.items() if k != "rope_scaling"}
    with pytest.raises(hf.CheckpointError, match=f"^c.json: {message}"):
        hf.config_from_hf(dict(conf, **change), "c.json")


@pytest.mark.parametrize("fields,message", [
    (dict(attn_softcap=50.0), "model.attn_softcap: is Gemma's"),
    (dict(query_scale=24.0), "model.query_scale: is Gemma's"),
    (dict(sliding_window=8, layer_types=("sliding_attention", "full_attention")),
     "model.layer_types: windows on some layers only with llama"),
    (dict(architecture="gemma2", qk_norm=True), "model.qk_norm: True with gemma2"),
    (dict(architecture="gemma3", qk_norm=True, rope_type="llama3"), "model.rope_type: llama3 with gemma3"),
    (dict(architecture="gemma3", qk_norm=True, attn_softcap=50.0), "model.attn_softcap: is Gemma 2's"),
    (dict(layer_types=("sliding_attention",)), "model.layer_types: 1 entries for 2 layers"),
])
def test_gemma_settings_elsewhere_are_one_config_line(fields, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                    **fields)
