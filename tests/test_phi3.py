"""Phi-3/Phi-4 (Phi3ForCausalLM): fused q/k/v and gate/up tensors, partial rotary and LongRoPE, against
transformers' PyTorch Phi3 (logits, greedy decoding, export and import are also in the family-wide tests
of test_hf, test_model and test_sampler through tests.oracle's "phi3")."""
import copy
import dataclasses
import os

import numpy as np
import pytest

import spjax
from spjax import hf, rope
from spjax.config import ConfigError, LoraConfig
from spjax.tensor_names import CheckpointError
from tests import oracle

BASE = dict(architectures=["Phi3ForCausalLM"], vocab_size=64, hidden_size=64, intermediate_size=96,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
            original_max_position_embeddings=512, rope_theta=10000.0, pad_token_id=0)
LONG = dict(rope_type="longrope", short_factor=list(np.linspace(1.0, 5.0, 12)), long_factor=list(np.linspace(2, 40, 12)))


@pytest.mark.parametrize("extra", [
    dict(partial_rotary_factor=0.75, rope_scaling=LONG),  # Phi-4-mini: 24 of 32 dims, LongRoPE
    dict(rope_scaling=dict(LONG, short_factor=list(np.linspace(1, 3, 16)), long_factor=list(np.linspace(1, 9, 16)))),
    dict(rope_scaling=dict(LONG, attention_factor=1.2, factor=4.0,
                           short_factor=list(np.linspace(1, 3, 16)), long_factor=list(np.linspace(1, 9, 16)))),
    dict(partial_rotary_factor=0.5),  # default rope on half the dims
    dict(rope_scaling=dict(LONG, rope_type="su", short_factor=[1.0] * 16, long_factor=[2.0] * 16)),  # older name
])
def test_frequencies_equal_phi3_rotary(extra):
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    conf = dict(BASE, **copy.deepcopy(extra))
    ours = hf.config_from_hf(copy.deepcopy(conf))
    if (extra.get("rope_scaling") or {}).get("rope_type") == "su":  # transformers 5 reads "su" before renaming it
        conf["rope_scaling"]["rope_type"] = "longrope"
    theirs = Phi3RotaryEmbedding(Phi3Config.from_dict(conf))
    assert ours.rotary_dim == 2 * theirs.inv_freq.shape[0]
    np.testing.assert_allclose(rope.inv_freq(ours), theirs.inv_freq.numpy(), rtol=1e-6, atol=0)
    assert rope.attention_factor(ours) == pytest.approx(float(theirs.attention_scaling), rel=1e-12)


def test_fused_tensors_split_on_import_and_stack_on_export(tmp_path):
    from safetensors.numpy import load_file
    tm = oracle.torch_model("phi3")
    tm.save_pretrained(tmp_path / "src")
    cfg, params = spjax.load_pretrained(str(tmp_path / "src"))
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    H, K, Dh, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    qkv = sd["model.layers.1.self_attn.qkv_proj.weight"]
    np.testing.assert_array_equal(np.asarray(params["layers"]["k"][1]).reshape(cfg.hidden_size, -1).T,
                                  qkv[H * Dh:(H + K) * Dh])
    np.testing.assert_array_equal(np.asarray(params["layers"]["up"][1]).T,
                                  sd["model.layers.1.mlp.gate_up_proj.weight"][F:])
    out = spjax.save_pretrained(cfg, params, tmp_path / "export")
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert set(saved) == {k for k in sd if k != "lm_head.weight"}  # (tied: the head is the embedding)
    for k, v in saved.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_a_fused_tensor_of_the_wrong_size_is_one_line(tmp_path):
    from safetensors.numpy import load_file, save_file
    tm = oracle.torch_model("phi3")
    tm.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    sd = load_file(path)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    sd[name] = sd[name][:-16]  # v lost a head
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: tensor '{name}' has shape \(112, 64\), expected 128 rows"):
        spjax.load_pretrained(str(tmp_path))


def test_lora_export_writes_the_merged_model_and_no_adapter(tmp_path, caplog):
    """transformers' Phi-3 adapts its fused modules as one: the merged export is exact, no PEFT adapter."""
    import torch
    import transformers
    cfg, params = hf.from_transformers(oracle.torch_model("phi3"), lora=LoraConfig(rank=4, alpha=8.0))
    rng = np.random.default_rng(1)
    params = {**params, "layers": {k: (rng.normal(0, 0.05, v.shape).astype(np.float32) if k.endswith("_lora_b") else v)
                                   for k, v in params["layers"].items()}}
    out = hf.save_pretrained(cfg, params, str(tmp_path / "export"))
    assert not os.path.exists(os.path.join(out, "adapter")) and "no adapter/ directory" in caplog.text
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(oracle.torch_logits(merged, ids), np.asarray(spjax.forward(cfg, params, ids)), atol=1e-4)
    with pytest.raises(CheckpointError, match=r"does not read PEFT adapters of Phi-3"):
        hf.with_init_adapter(dataclasses.replace(cfg, lora=LoraConfig(rank=4, init_path=str(tmp_path))), params)


def test_longrope_runs_past_the_original_context_are_refused():
    """transformers switches a whole batch to the long factors past the original context; spjax
    computes the short ones: a run that long is refused before anything is computed."""
    from spjax import preflight
    from spjax.config import load_config
    cfg = load_config("configs/tiny.py")
    phi = hf.config_from_hf(dict(BASE, partial_rotary_factor=0.75, rope_scaling=copy.deepcopy(LONG)))
    with pytest.raises(ConfigError, match=r"^data.max_len: sequences of up to 600 tokens .* pass the model's "
                                          r"original context of 512 positions"):
        preflight.check_lengths(cfg, phi, (600,), print)
    preflight.check_lengths(cfg, phi, (512,), print)  # within it: runs


@pytest.mark.parametrize("change,message", [
    (dict(partial_rotary_factor=0.72), r"model.partial_rotary_factor: RoPE rotates pairs of dims: 23 of head_dim 32"),
    (dict(rope_short_factor=(1.0,) * 3), r"model.rope_short_factor: longrope needs 12 positive divisors"),
    (dict(qkv_bias=True), r"model.qkv_bias: with partial rotary or longrope: no transformers family"),
])
def test_bad_phi3_settings_are_one_line(change, message):
    phi = hf.config_from_hf(dict(BASE, partial_rotary_factor=0.75, rope_scaling=copy.deepcopy(LONG)))
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(phi, **change)
