"""RoPE scaling read from transformers configs equals transformers' own: the frequencies and YaRN's
attention factor of each type, a model's logits with YaRN, and an export transformers reads back."""
import copy

import jax.numpy as jnp
import numpy as np
import pytest

import spjax
from spjax import hf, rope
from spjax.config import ConfigError
from tests import oracle

BASE = dict(architectures=["Qwen3ForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            max_position_embeddings=512, rope_theta=1e6)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128)

SCALINGS = {
    "default": None,
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
    "yarn": YARN,  # Qwen's recipe: factor 4 over the pretraining context; attention factor 0.1 ln 4 + 1
    "yarn_betas_untruncated": dict(YARN, beta_fast=16, beta_slow=2, truncate=False),  # (gpt-oss: truncate off)
    "yarn_attention_factor": dict(YARN, attention_factor=1.25),
    "yarn_mscale": dict(YARN, factor=40.0, mscale=1.0, mscale_all_dim=0.707),  # DeepSeek's keys
    "yarn_implicit_factor": dict(YARN, factor=None),  # max / original = 4
    "yarn_no_original": dict(rope_type="yarn", factor=2.0),  # transformers: max_position_embeddings
    "dynamic": dict(rope_type="dynamic", factor=2.0),  # NTK: the default frequencies within the context
}


def _theirs(scaling):
    """transformers' (inv_freq [Dh/2], attention factor) for BASE with these rope settings."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
    conf = dict(BASE, **({} if scaling is None else {"rope_scaling": copy.deepcopy(scaling)}))
    emb = Qwen3RotaryEmbedding(Qwen3Config.from_dict(conf))  # the model's own rotary module
    return emb.inv_freq.numpy(), float(emb.attention_scaling)


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_frequencies_and_attention_factor_equal_transformers(name):
    scaling = SCALINGS[name]
    ours = hf.config_from_hf(dict(BASE, **({} if scaling is None else {"rope_scaling": copy.deepcopy(scaling)})))
    inv, factor = _theirs(scaling)
    assert ours.rope_type == (scaling or {}).get("rope_type", "default")
    np.testing.assert_allclose(rope.inv_freq(ours), inv, rtol=1e-6, atol=0)
    assert rope.attention_factor(ours) == pytest.approx(factor, rel=1e-12)
    # an export carries the same settings: transformers reads them back to the same frequencies
    again_inv, again_factor = _theirs(hf.config_to_hf(ours).get("rope_scaling"))
    np.testing.assert_allclose(again_inv, inv, rtol=1e-6, atol=0)
    assert again_factor == pytest.approx(factor, rel=1e-12)


def test_yarn_frequencies_interpolate_only_the_slow_dimensions():
    cfg = hf.config_from_hf(dict(BASE, rope_scaling=YARN))
    plain = rope.inv_freq(hf.config_from_hf(BASE))
    ratio = plain / rope.inv_freq(cfg)
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(4.0)  # fast kept, slow divided
    assert np.all(np.diff(ratio) >= -1e-6)  # a ramp between
    assert rope.attention_factor(cfg) == pytest.approx(0.1 * np.log(4.0) + 1)


def test_an_omitted_max_position_is_one_default():
    """A config without max_position_embeddings: the length limit said 4096 while YaRN's pretraining
    context (its original_max_position_embeddings fallback) assumed 8192."""
    from spjax.config import ModelConfig
    bare = {k: v for k, v in BASE.items() if k != "max_position_embeddings"}
    cfg = hf.config_from_hf(dict(bare, rope_scaling=dict(rope_type="yarn", factor=2.0)))
    assert cfg.rope_original_max_position == cfg.max_position_embeddings == ModelConfig.max_position_embeddings


def test_yarn_model_logits_equal_transformers(tmp_path):
    """A Qwen3 with YaRN (positions past the original context): before, its config was refused."""
    import torch
    import transformers
    conf = dict(BASE, rope_scaling=dict(YARN, original_max_position_embeddings=32, attention_factor=1.3))
    torch.manual_seed(0)
    tm = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config.from_dict(conf)).float().eval()
    cfg, params = hf.from_transformers(tm)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position) == ("yarn", 4.0, 32)
    ids = np.random.RandomState(0).randint(0, 64, (2, 80)).astype(np.int32)
    theirs = oracle.torch_logits(tm, ids)
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids))) - theirs).max() <= 1e-4
    out = spjax.save_pretrained(cfg, params, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert back.config.rope_parameters["rope_type"] == "yarn"
    assert np.abs(oracle.torch_logits(back, ids) - theirs).max() <= 1e-5


def test_dynamic_rope_equals_transformers_within_the_context_and_is_refused_past_it():
    """Dynamic NTK scaling: the default angles up to max_position_embeddings (transformers rescales past it,
    by the batch's longest sequence); a run or a sample() reaching past it is refused in one line. Before,
    such a config was refused outright."""
    import dataclasses
    import torch
    import transformers
    from spjax import preflight
    from spjax.config import load_config
    conf = dict(BASE, max_position_embeddings=48, rope_scaling=dict(rope_type="dynamic", factor=2.0))
    torch.manual_seed(0)
    tm = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config.from_dict(conf)).float().eval()
    cfg, params = hf.from_transformers(tm)
    assert (cfg.rope_type, cfg.rope_factor) == ("dynamic", 2.0)
    ids = np.random.RandomState(0).randint(0, 64, (2, 48)).astype(np.int32)  # the whole context
    theirs = oracle.torch_logits(tm, ids)
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids))) - theirs).max() <= 1e-4
    assert np.abs(oracle.torch_logits(tm, np.concatenate([ids, ids[:, :8]], 1))[:, :48] - theirs).max() > 1e-3
    with pytest.raises(ValueError, match="reach 49 positions: dynamic rope scaling is computed up to "
                                         "max_position_embeddings=48 only"):
        spjax.sample(cfg, params, [list(range(40))], key=0, max_new_tokens=10)
    spjax.sample(cfg, params, [list(range(40))], key=0, max_new_tokens=9)  # 48 positions: fine
    run = load_config("configs/tiny.py", ["data.max_len=64"])
    with pytest.raises(ConfigError, match=r"data.max_len: sequences of up to 72 tokens .* dynamic rope scaling"):
        preflight.check_lengths(run, cfg, (64,), print)
    notes = []
    preflight.check_lengths(run, dataclasses.replace(cfg, rope_type="default"), (64,), notes.append)
    assert "exceed the model's max_position_embeddings=48" in notes[0]  # any other rope: a note only


@pytest.mark.parametrize("override,message", [
    ("rope_beta_fast", r"model.rope_beta_fast: must be > 0"),
    ("rope_original_max_position", r"model.rope_original_max_position: must be > 0"),
    ("rope_attention_factor", r"model.rope_attention_factor: must be >= 0"),
])
def test_bad_yarn_settings_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        hf.config_from_hf(dict(BASE, rope_scaling=YARN), **{override: -1})
