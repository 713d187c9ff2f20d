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


def _random_b(params, seed=1):
    rng = np.random.default_rng(seed)
    return {**params, "layers": {k: (rng.normal(0, 0.05, v.shape).astype(np.float32) if k.endswith("_lora_b") else v)
                                 for k, v in params["layers"].items()}}


@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "gate", "up", "down"), ("q", "v", "up")])
def test_lora_export_is_a_peft_adapter_of_the_fused_modules(targets, tmp_path):
    """transformers' Phi-3 adapts qkv_proj and gate_up_proj as one module each: the adapter holds the
    parts' adapters side by side (rank m·r, block-diagonal B) and reads back to the same policy."""
    import json

    import peft
    import torch
    import transformers
    base = oracle.torch_model("phi3")
    base.save_pretrained(tmp_path / "base")
    cfg, params = hf.from_transformers(base, lora=LoraConfig(rank=4, alpha=8.0, targets=targets))
    params = _random_b(params)
    out = hf.save_pretrained(cfg, params, str(tmp_path / "export"), source=str(tmp_path / "base"))
    conf = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    m = {"qkv_proj": sum(t in targets for t in "qkv"), "gate_up_proj": sum(t in targets for t in ("gate", "up"))}
    assert conf["rank_pattern"] == {k: 4 * n for k, n in m.items() if n > 1}
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    ours = np.asarray(spjax.forward(cfg, params, ids))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(oracle.torch_logits(merged, ids), ours, atol=1e-4)
    adapted = peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    try:
        np.testing.assert_allclose(oracle.torch_logits(adapted, ids), ours, atol=1e-4)
    finally:
        adapted.unload()
    again = hf.with_init_adapter(dataclasses.replace(cfg, lora=dataclasses.replace(
        cfg.lora, init_path=os.path.join(out, "adapter"))), hf.from_transformers(base, lora=cfg.lora)[1])
    for k, v in params["layers"].items():
        np.testing.assert_allclose(np.asarray(again["layers"][k]), np.asarray(v), atol=1e-6, err_msg=k)


def test_a_peft_trained_fused_adapter_is_read_as_parts_sharing_its_a(tmp_path):
    """A PEFT adapter of rank r on qkv_proj/gate_up_proj (as PEFT trains one on Phi-3): each part takes
    the shared A and its rows of B, with PEFT's alpha folded in."""
    import peft
    import torch
    base = oracle.torch_model("phi3")
    pc = peft.LoraConfig(r=4, lora_alpha=12.0, target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"],
                         init_lora_weights=False)
    torch.manual_seed(3)
    adapted = peft.get_peft_model(base, pc).eval()
    ids = np.random.default_rng(1).integers(0, 256, (2, 9)).astype(np.int32)
    try:
        adapted.save_pretrained(str(tmp_path / "adapter"))
        want = oracle.torch_logits(adapted, ids)
    finally:
        adapted.unload()
    cfg, params = hf.from_transformers(base, lora=LoraConfig(rank=4, alpha=8.0, init_path=str(tmp_path / "adapter")))
    params = hf.with_init_adapter(cfg, params)
    np.testing.assert_allclose(np.asarray(spjax.forward(cfg, params, ids)), want, atol=1e-4)
    with pytest.raises(CheckpointError, match=r"qkv_proj: its B is not zero outside the blocks of the parts "
                                              r"lora.targets adapts \(q, v\)"):
        two = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "gate", "up", "down"),
                         init_path=str(tmp_path / "adapter"))
        hf.with_init_adapter(dataclasses.replace(cfg, lora=two), hf.from_transformers(base, lora=two)[1])


@pytest.fixture(scope="module")
def phi_long():
    """A tiny Phi-3 whose original context is 16 positions (LongRoPE switches to its long divisors past
    it): (transformers model, spjax config, params)."""
    import torch
    import transformers
    conf = dict(oracle.TINY, **copy.deepcopy(oracle.FAMILIES["phi3"][1]), max_position_embeddings=64)
    conf["original_max_position_embeddings"] = 16
    torch.manual_seed(0)
    tm = transformers.Phi3ForCausalLM(transformers.Phi3Config(**conf)).float().eval()
    qk = (conf["num_attention_heads"] + conf["num_key_value_heads"]) * (conf["hidden_size"] // conf["num_attention_heads"])
    with torch.no_grad():  # sharper attention than random init's: the rotation (which divisors) then shows
        for layer in tm.model.layers:
            layer.self_attn.qkv_proj.weight[:qk] *= 6.0
    cfg, params = hf.from_transformers(tm)
    assert cfg.rope_original_max_position == 16 and cfg.rope_long_factor
    return tm, cfg, params


def _alone(tm, ids):
    return oracle.torch_logits(tm, np.asarray([ids]))[0]


def test_longrope_past_the_original_context_equals_transformers_per_sequence(phi_long):
    """transformers takes the long divisors when a call's largest position passes the original context;
    spjax decides per sequence: each row of a padded batch, each segment of a packed row, equals
    transformers on that sequence alone (16 and under: short divisors; 17 and over: long)."""
    import jax.numpy as jnp
    from spjax import model
    tm, cfg, params = phi_long
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (10, 16, 17, 29)]
    ids, mask = np.zeros((4, 32), np.int32), np.zeros((4, 32), bool)
    for r, q in enumerate(seqs):
        ids[r, :len(q)], mask[r, :len(q)] = q, True
    hidden, _ = model.apply(cfg, params, jnp.asarray(ids), kv_mask_BxS=jnp.asarray(mask), right_padded=True)
    logits = np.asarray(model.unembed(cfg, params, hidden))
    short = dataclasses.replace(cfg, rope_long_factor=cfg.rope_short_factor)  # before: the short ones everywhere
    hidden_short, _ = model.apply(short, params, jnp.asarray(ids), kv_mask_BxS=jnp.asarray(mask), right_padded=True)
    logits_short = np.asarray(model.unembed(short, params, hidden_short))
    for r, q in enumerate(seqs):
        theirs = _alone(tm, q)
        np.testing.assert_allclose(logits[r, :len(q)], theirs, atol=2e-5, rtol=1e-5, err_msg=f"length {len(q)}")
        assert (np.abs(logits_short[r, :len(q)] - theirs).max() > 1e-3) == (len(q) > 16)  # the switch matters
    # packed: 12 and 20 tokens in one row, positions restarting, each segment its own choice
    packed = seqs[0][:10] + [5, 6] + seqs[3][:20]
    positions = np.asarray([list(range(12)) + list(range(20))], np.int32)
    segments = np.asarray([[1] * 12 + [2] * 20], np.int32)
    hidden, _ = model.apply(cfg, params, jnp.asarray([packed]), jnp.asarray(positions),
                            kv_mask_BxS=jnp.ones((1, 32), bool), segment_ids_BxL=jnp.asarray(segments))
    logits = np.asarray(model.unembed(cfg, params, hidden))[0]
    np.testing.assert_allclose(logits[:12], _alone(tm, packed[:12]), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[12:], _alone(tm, packed[12:]), atol=2e-5, rtol=1e-5)


def test_longrope_greedy_decoding_equals_transformers_across_the_original_context(phi_long):
    """Prompts within the original context whose responses pass it (10 and 5 tokens, 14 new: each row's
    cache is recomputed with the long divisors where it crosses, as transformers' Phi-3 generate
    recomputes its cache) and one past it from the start (20): tokens and log-probs as transformers'
    generate, each prompt alone there (its choice is per call, ours per row); K = 2 samples each (their
    rows repeat the prefilled cache: each recomputes its own)."""
    import torch
    from spjax import sampler
    tm, cfg, params = phi_long
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (10, 5, 20)]
    res = sampler.sample(cfg, params, prompts, key=0, max_new_tokens=14, temperature=0, num_samples=2)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = tm.generate(torch.tensor([p]), do_sample=False, max_new_tokens=14, pad_token_id=0, eos_token_id=None,
                              output_logits=True, return_dict_in_generate=True)
        ref = out.sequences[0, len(p):].tolist()
        theirs = [torch.log_softmax(step[0], -1)[t].item() for step, t in zip(out.logits, ref)]
        for k in range(2):
            assert res.tokens[2 * i + k] == ref, (len(p), k)
            np.testing.assert_allclose(res.logprobs[2 * i + k], theirs, atol=1e-4, err_msg=f"prompt of {len(p)}, {k}")


def test_longrope_sampler_log_probs_are_not_reused_past_the_original_context(phi_long):
    """A forward pass over a sequence past the original context rotates every token by the long divisors;
    decoding rotated the earlier ones by the short: the score phase then scores the samples itself."""
    from spjax import pairs
    from spjax.config import load_config
    _, cfg, _ = phi_long
    within = load_config("configs/tiny.py", ["data.max_prompt_len=8", "sampling.max_new_tokens=8"])
    past = load_config("configs/tiny.py", ["data.max_prompt_len=8", "sampling.max_new_tokens=9"])
    assert pairs.sampler_scores_usable(within, cfg) and not pairs.sampler_scores_usable(past, cfg)
    assert pairs.sampler_scores_usable(past, dataclasses.replace(cfg, rope_type="default"))


@pytest.mark.parametrize("change,message", [
    (dict(partial_rotary_factor=0.72), r"model.partial_rotary_factor: RoPE rotates pairs of dims: 23 of head_dim 32"),
    (dict(rope_short_factor=(1.0,) * 3), r"model.rope_short_factor: longrope needs 12 positive divisors"),
    (dict(qkv_bias=True), r"model.qkv_bias: with partial rotary or longrope: no transformers family"),
    (dict(rope_type="yarn"), r"model.rope_type: 'yarn' with a Phi-3 model .* default or longrope only"),
])
def test_bad_phi3_settings_are_one_line(change, message):
    phi = hf.config_from_hf(dict(BASE, partial_rotary_factor=0.75, rope_scaling=copy.deepcopy(LONG)))
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(phi, **change)
