"""Import refuses what it would get wrong: RoPE scaling in GGUF files, Llama biases, tensors it does
not read, per-layer Qwen2 windows; and what it reads (GGUF linear, llama3, YaRN and Phi-3 LongRoPE,
Qwen2 windows) matches transformers, through an export too."""
import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

import spjax
from spjax import hf
from tests import oracle

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def _torch(cls_name, **extra):
    import torch
    import transformers
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**TINY, **extra)).float().eval()
    with torch.no_grad():  # HF zero-inits biases; random ones make a dropped bias visible
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _ids(shape=(2, 100)):
    return np.random.RandomState(0).randint(0, TINY["vocab_size"], shape).astype(np.int32)


def _max_diff(cfg, params, tm, ids):
    return float(np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids))) - oracle.torch_logits(tm, ids)).max())


def _write_gguf(path, m, scaling=None, factor=None, tensors=None, rot_dims=None, eos_eot=None, per_layer=False,
                vocab=True, split_max_tensors=0, cast=None, arch="llama", floats=None, orig_ctx=None, ints=None,
                arrays=None):
    """A llama GGUF as llama.cpp's converter writes it (Q/K rows permuted), plus extra `tensors`;
    per_layer: head counts as one value per layer; split_max_tensors: in parts as gguf-split cuts them;
    cast: {name: numpy dtype} stored so (F64, ...); arch 'qwen3': its q/k norms, head size and no permutation;
    floats, ints, arrays: more float32 / uint32 / array metadata, {key with {arch}: value}; orig_ctx: rope
    scaling's pretraining context."""
    import gguf
    c, sd = m.config, {k: v.float().numpy() for k, v in m.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    if arch in ("qwen3", "qwen3moe", "olmoe"):  # (a head size of their own; the others' is hidden / heads)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    layers = lambda n: [n] * c.num_hidden_layers if per_layer else n
    w.add_head_count(layers(c.num_attention_heads))
    w.add_head_count_kv(layers(c.num_key_value_heads))
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)  # (OLMo 3's: one set per layer type)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if vocab:
        w.add_vocab_size(c.vocab_size)
    if scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(scaling))
    if factor:
        w.add_rope_scaling_factor(factor)
    if orig_ctx:
        w.add_rope_scaling_orig_ctx_len(orig_ctx)
    for key, value in (floats or {}).items():
        w.add_float32(key.format(arch=arch), value)
    for key, value in (ints or {}).items():
        w.add_uint32(key.format(arch=arch), value)
    for key, value in (arrays or {}).items():
        w.add_array(key.format(arch=arch), value)
    if rot_dims:
        w.add_rope_dimension_count(rot_dims)
    if eos_eot:
        w.add_eos_token_id(eos_eot[0])
        w.add_eot_token_id(eos_eot[1])
    named = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not c.tie_word_embeddings:
        named["output.weight"] = "lm_head.weight"
    experts = getattr(c, "num_local_experts", 0) or getattr(c, "num_experts", 0)  # stacked experts (Mixtral: a llama)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        if getattr(c, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if getattr(c, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    projections = ([("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")] if arch == "phi3" else
                   [("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj")]
                   + ([] if experts else [("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj")]))
    projections += [] if experts else [("ffn_down", "mlp.down_proj")]
    norms = ([("post_attention_norm", "post_attention_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm")]
             if arch == "olmo2" else [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")])
    for i in range(c.num_hidden_layers):
        for dst, src in norms + [("attn_output", "self_attn.o_proj")] + projections:
            named[f"blk.{i}.{dst}.weight"] = f"model.layers.{i}.{src}.weight"
        if f"model.layers.{i}.self_attn.q_proj.bias" in sd:  # Qwen2's q/k/v biases
            named.update({f"blk.{i}.attn_{n}.bias": f"model.layers.{i}.self_attn.{n}_proj.bias" for n in "qkv"})
        if f"model.layers.{i}.mlp.shared_expert_gate.weight" in sd:  # Qwen2-MoE's shared expert; its gate 1-D [D]
            x = f"model.layers.{i}.mlp."
            sd[x + "shared_gate_1d"] = sd[x + "shared_expert_gate.weight"].reshape(-1)
            named.update({f"blk.{i}.ffn_gate_inp_shexp.weight": x + "shared_gate_1d",
                          **{f"blk.{i}.ffn_{n}_shexp.weight": x + f"shared_expert.{n}_proj.weight"
                             for n in ("gate", "up", "down")}})
        if experts:  # transformers 5 holds them fused: gate_up [E, 2F, D] (gate rows first), down [E, D, F]
            F, x = getattr(c, "moe_intermediate_size", None) or c.intermediate_size, f"model.layers.{i}.mlp."
            sd[x + "gate_exps"], sd[x + "up_exps"] = np.split(sd[x + "experts.gate_up_proj"], [F], axis=1)
            named.update({f"blk.{i}.ffn_gate_inp.weight": x + "gate.weight", f"blk.{i}.ffn_gate_exps.weight":
                          x + "gate_exps", f"blk.{i}.ffn_up_exps.weight": x + "up_exps",
                          f"blk.{i}.ffn_down_exps.weight": x + "experts.down_proj"})
        if arch in ("qwen3", "qwen3moe", "olmo2", "olmoe"):  # (OLMo's as wide as all heads)
            for n in ("q", "k"):
                named[f"blk.{i}.attn_{n}_norm.weight"] = f"model.layers.{i}.self_attn.{n}_norm.weight"
    for dst, src in named.items():
        t = sd[src]
        if arch in ("llama", "smollm3", "granite") and (".attn_q." in dst or ".attn_k." in dst):  # LlamaModel.permute
            n = c.num_attention_heads if ".attn_q." in dst else c.num_key_value_heads
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(dst, t.astype((cast or {}).get(dst, t.dtype)))
    for name, t in (tensors or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    w.close()
    return str(path)


def test_gguf_linear_rope_scaling_matches_transformers(tmp_path):
    tm = _torch("LlamaConfig", rope_theta=500000.0, rope_scaling=dict(rope_type="linear", factor=4.0))
    cfg, params = spjax.load_pretrained(_write_gguf(tmp_path / "lin.gguf", tm, "linear", 4.0))
    assert (cfg.rope_type, cfg.rope_factor) == ("linear", 4.0)
    assert _max_diff(cfg, params, tm, _ids()) <= 1e-5


def test_gguf_qwen3_matches_transformers(tmp_path):
    """llama.cpp's qwen3: q/k norm tensors, head size from attention.key_length (not D / H), rows unpermuted."""
    tm = _torch("Qwen3Config", rope_theta=1000000.0, head_dim=16, tie_word_embeddings=True)
    cfg, params = spjax.load_pretrained(_write_gguf(tmp_path / "q3.gguf", tm, arch="qwen3"))
    assert (cfg.architecture, cfg.qk_norm, cfg.head_dim, cfg.tie_embeddings) == ("qwen3", True, 16, True)
    assert _max_diff(cfg, params, tm, _ids()) <= 1e-5


def _converter_rope_freqs(theta, dh, factor, lo, hi, old):
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf writes it for llama3 scaling (its formula)."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, dh, 2) / dh):
        wavelen = 2 * np.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def test_gguf_mixtral_matches_transformers(tmp_path):
    """A Mixtral GGUF (llama.cpp's llama with stacked experts) reads as the Mixtral it was converted from: the same
    logits; llama.cpp's older layout (an expert's tensors apart) is refused in one line. Before, every GGUF
    mixture was refused."""
    tm = oracle.torch_model("mixtral")
    cfg, params = spjax.load_pretrained(_write_gguf(tmp_path / "m.gguf", tm))
    assert (cfg.architecture, cfg.num_experts, cfg.experts_per_token) == ("mixtral", 4, 2)
    ids = _ids((2, 24))
    assert _max_diff(cfg, params, tm, ids) <= 1e-4
    old = {f"blk.{i}.ffn_gate.{e}.weight": np.zeros((128, 64), np.float32) for i in range(2) for e in range(4)}
    with pytest.raises(hf.CheckpointError, match="llama.cpp.s older MoE layout"):
        spjax.load_pretrained(_write_gguf(tmp_path / "old.gguf", tm, tensors=old))


def test_gguf_qwen2_moe_matches_transformers(tmp_path):
    """A Qwen2-MoE GGUF (llama.cpp's qwen2moe: q/k/v biases, experts not renormalized, a shared expert whose gate
    is a 1-D [D] tensor there): the same logits as transformers."""
    tm = _torch("Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                shared_expert_intermediate_size=40, norm_topk_prob=False)
    cfg, params = spjax.load_pretrained(_write_gguf(tmp_path / "q2.gguf", tm, arch="qwen2moe"))
    assert (cfg.architecture, cfg.num_experts, cfg.intermediate_size, cfg.shared_expert_size, cfg.norm_topk,
            cfg.qkv_bias) == ("qwen2_moe", 4, 24, 40, False, True)
    assert _max_diff(cfg, params, tm, _ids((2, 24))) <= 1e-4


@pytest.mark.parametrize("family", ["olmo2", "olmoe"])
def test_gguf_olmo_matches_transformers(family, tmp_path):
    """OLMo 2 (norms after attention and the MLP alone) and OLMoE (a mixture, weights not renormalized) GGUF files,
    their q/k norms over all heads at once: the same logits as transformers."""
    tm = oracle.torch_model(family)
    cfg, params = spjax.load_pretrained(_write_gguf(tmp_path / "o.gguf", tm, arch=family))
    assert (cfg.architecture, cfg.qk_norm_full, cfg.post_norms) == (family, True, family == "olmo2")
    if family == "olmoe":
        assert (cfg.num_experts, cfg.norm_topk) == (tm.config.num_experts, False)
    assert _max_diff(cfg, params, tm, _ids((2, 24))) <= 1e-4


def test_gguf_olmo3_and_smollm3_match_transformers(tmp_path):
    """llama.cpp files OLMo 3 as an olmo2 with a window, a per-layer pattern (true: windowed) and YaRN whose
    attn_factor is the HF config's attention_factor; its windowed layers rotate unscaled. Its smollm3 is Llama
    (Q/K permuted) with no rotation in every fourth layer, a constant of llama.cpp's. Both: transformers' logits,
    past the window and YaRN's original context, and through an export."""
    import math
    tm = oracle.torch_model("olmo3")  # (layer 0 windowed over 8 tokens; YaRN x2 over 256 on layer 1)
    path = _write_gguf(tmp_path / "o3.gguf", tm, "yarn", 2.0, arch="olmo2", orig_ctx=256,
                       ints={"{arch}.attention.sliding_window": 8}, arrays={"{arch}.attention.sliding_window_pattern":
                                                                            [True, False]},
                       floats={"{arch}.rope.scaling.attn_factor": 0.1 * math.log(2.0) + 1})
    cfg, params = spjax.load_pretrained(path)
    assert (cfg.architecture, cfg.windowed, cfg.rope_type, cfg.rope_local_theta) == ("olmo3", (True, False), "yarn",
                                                                                    500000.0)
    assert _max_diff(cfg, params, tm, _ids((2, 300))) <= 1e-4
    import torch
    import transformers
    smol = transformers.SmolLM3Config(**dict(TINY, num_hidden_layers=4), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    sm = transformers.AutoModelForCausalLM.from_config(smol).float().eval()
    cfg, params = spjax.load_pretrained(_write_gguf(tmp_path / "s3.gguf", sm, arch="smollm3"))
    assert (cfg.architecture, cfg.nope_layers, sm.config.no_rope_layers) == ("smollm3", (3,), [1, 1, 1, 0])
    assert _max_diff(cfg, params, sm, _ids((2, 40))) <= 1e-4
    out = spjax.save_pretrained(cfg, params, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert _max_diff(cfg, params, back, _ids((2, 40))) <= 1e-4


def test_gguf_granite_matches_transformers(tmp_path):
    """llama.cpp's granite: Llama (Q/K permuted) with the multipliers as embedding_scale, residual_scale,
    logit_scale and attention.scale: transformers' logits."""
    tm = oracle.torch_model("granite")
    scales = {"{arch}.embedding_scale": 3.0, "{arch}.residual_scale": 0.5, "{arch}.logit_scale": 4.0,
              "{arch}.attention.scale": 0.0625}
    cfg, params = spjax.load_pretrained(_write_gguf(tmp_path / "g.gguf", tm, arch="granite", floats=scales))
    assert (cfg.architecture, cfg.embedding_multiplier, cfg.logits_scaling) == ("granite", 3.0, 4.0)
    assert _max_diff(cfg, params, tm, _ids((2, 40))) <= 1e-4


def test_gguf_qwen3_moe_matches_transformers(tmp_path):
    """A Qwen3-MoE GGUF (llama.cpp's qwen3moe: experts expert_feed_forward_length wide, their weights always
    renormalized, as the released Qwen3-MoE configs ask): the same logits as transformers. A scale on the
    experts' weights (expert_weights_scale) is refused in one line."""
    tm = _torch("Qwen3MoeConfig", rope_theta=1e6, head_dim=16, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=24, norm_topk_prob=True)
    cfg, params = spjax.load_pretrained(_write_gguf(tmp_path / "q.gguf", tm, arch="qwen3moe"))
    assert (cfg.architecture, cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size, cfg.norm_topk) == (
        "qwen3_moe", 4, 2, 24, True)
    assert _max_diff(cfg, params, tm, _ids((2, 24))) <= 1e-4
    with pytest.raises(hf.CheckpointError, match="qwen3moe.expert_weights_scale 2.5: scaled expert weights"):
        spjax.load_pretrained(_write_gguf(tmp_path / "s.gguf", tm, arch="qwen3moe",
                                          floats={"{arch}.expert_weights_scale": 2.5}))


def test_gguf_llama3_rope_freqs_read_as_llama3_scaling(tmp_path):
    """Llama 3.1/3.2 GGUFs carry their rope scaling as per-frequency divisors: refused before."""
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    tm = _torch("LlamaConfig", rope_theta=500000.0, rope_scaling=scaling)  # head_dim 8: one medium, one scaled
    freqs = _converter_rope_freqs(500000.0, 8, 8.0, 1.0, 4.0, 8192)
    assert np.allclose(sorted(set(freqs.tolist())), [1.0, 2.695, 8.0], atol=1e-3)
    cfg, params = spjax.load_pretrained(_write_gguf(tmp_path / "l3.gguf", tm, tensors={"rope_freqs.weight": freqs}))
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position) == ("llama3", 8.0, 8192)
    assert _max_diff(cfg, params, tm, _ids()) <= 1e-5


def test_gguf_split_files_per_layer_head_counts_and_no_vocab_key(tmp_path):
    """Files cut by gguf-split (NAME-0000k-of-0000n.gguf) read whole from any part (before: 'tensor
    missing', or 'architecture None'); head counts per layer (all equal) and the vocabulary size from
    the embedding (no vocab key, no tokenizer) load too."""
    tm = _torch("LlamaConfig")
    _write_gguf(tmp_path / "m.gguf", tm, split_max_tensors=7, per_layer=True, vocab=False)
    names = sorted(os.listdir(tmp_path))
    assert names == ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"], names
    for part in names[::2]:
        cfg, params = spjax.load_pretrained(str(tmp_path / part))
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (4, 2, TINY["vocab_size"])
        assert _max_diff(cfg, params, tm, _ids()) <= 1e-5
    os.remove(tmp_path / names[1])
    with pytest.raises(hf.CheckpointError, match=r"m-00001-of-00003.gguf: part of a GGUF split into 3 files; missing "
                                                 r".*m-00002-of-00003.gguf"):
        spjax.load_pretrained(str(tmp_path / names[0]))


def test_gguf_tensor_types_it_cannot_dequantize_are_one_line(tmp_path):
    """gguf.quants cannot dequantize F64, I8..I64, Q8_1, ...: a bare NotImplementedError traceback before."""
    path = _write_gguf(tmp_path / "f64.gguf", _torch("LlamaConfig"), cast={"output_norm.weight": np.float64})
    with pytest.raises(hf.CheckpointError, match=r"f64.gguf: tensor 'output_norm.weight' has type F64, which the "
                                                 r"gguf package .* cannot dequantize"):
        spjax.load_pretrained(path)


def test_gguf_refuses_rope_scaling_it_cannot_read(tmp_path):
    tm = _torch("LlamaConfig")
    path = _write_gguf(tmp_path / "m.gguf", tm, tensors={"rope_freqs.weight": np.linspace(1, 8, 4, dtype=np.float32)})
    with pytest.raises(hf.CheckpointError, match=r"m.gguf: the GGUF carries RoPE scaling .*rope_freqs.*Hugging Face"):
        spjax.load_pretrained(path)
    path = _write_gguf(tmp_path / "l.gguf", tm, scaling="longrope", factor=4.0)
    with pytest.raises(hf.CheckpointError, match=r"l.gguf: the GGUF carries RoPE scaling .*longrope.*Hugging Face"):
        spjax.load_pretrained(path)


def test_gguf_mixture_of_experts_other_than_mixtral_is_one_line(tmp_path):
    """Of GGUF mixtures spjax reads Mixtral's (llama with expert_count); another family's (here a qwen3 file with
    experts) is refused in one line, not read as a dense model whose missing tensors would be the error."""
    tm = _torch("Qwen3Config", rope_theta=1e6, head_dim=16)
    path = _write_gguf(tmp_path / "moe.gguf", tm, arch="qwen3", ints={"{arch}.expert_count": 8})
    with pytest.raises(hf.CheckpointError, match=r"moe.gguf: qwen3.expert_count 8: a qwen3 mixture of experts, which "
                                                 r"spjax reads from Hugging Face checkpoints only"):
        spjax.load_pretrained(path)


def test_gguf_yarn_matches_transformers(tmp_path):
    """YaRN as llama.cpp's converter writes it (type, factor, pretraining context): refused before."""
    tm = _torch("Qwen3Config", rope_theta=1e6, head_dim=16, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=16.0))
    path = _write_gguf(tmp_path / "y.gguf", tm, "yarn", 4.0, arch="qwen3", orig_ctx=32,
                       floats={"{arch}.rope.scaling.yarn_beta_fast": 16.0})
    cfg, params = spjax.load_pretrained(path)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position, cfg.rope_beta_fast) == ("yarn", 4.0, 32, 16.0)
    assert _max_diff(cfg, params, tm, _ids()) <= 1e-5
    for extra, message in [(dict(orig_ctx=32, floats={"{arch}.rope.scaling.yarn_log_multiplier": 0.1}),
                            r"qwen3.rope.scaling.yarn_log_multiplier = 0.1\d* changes llama.cpp's YaRN"),
                           ({}, r"YaRN scaling needs qwen3.rope.scaling.factor and qwen3.rope.scaling.original")]:
        with pytest.raises(hf.CheckpointError, match=rf"n.gguf: {message}"):
            spjax.load_pretrained(_write_gguf(tmp_path / "n.gguf", tm, "yarn", 4.0, arch="qwen3", **extra))


def test_gguf_phi3_matches_transformers(tmp_path):
    """llama.cpp's phi3 as its converter writes it: fused attn_qkv and ffn_up (gate, up), the rotated dims,
    LongRoPE factors as tensors, the pretraining context and the attention factor: refused before."""
    import math
    tm = oracle.torch_model("phi3")
    c = tm.config
    rope = c.rope_parameters
    scale = c.max_position_embeddings / rope["original_max_position_embeddings"]
    attn = math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"]))
    factors = {f"rope_factors_{k}.weight": np.asarray(rope[f"{k}_factor"], np.float32) for k in ("short", "long")}
    path = _write_gguf(tmp_path / "phi.gguf", tm, arch="phi3", rot_dims=12, tensors=factors,
                       orig_ctx=rope["original_max_position_embeddings"], floats={"{arch}.rope.scaling.attn_factor": attn})
    cfg, params = spjax.load_pretrained(path)
    assert (cfg.architecture, cfg.rotary_dim, cfg.rope_type, cfg.rope_attention_factor) == ("phi3", 12, "longrope", 0.0)
    assert cfg.rope_short_factor == pytest.approx(rope["short_factor"])
    assert _max_diff(cfg, params, tm, _ids()) <= 1e-5  # (100 positions: within the original 256)
    # Phi-3 mini's config windows every layer (2047): llama.cpp's converter writes it, both apply it. Before, the
    # GGUF's window was ignored (logits past it differed).
    ids, full = _ids(), np.asarray(spjax.forward(cfg, params, jnp.asarray(_ids())))
    path = _write_gguf(tmp_path / "phi_w.gguf", tm, arch="phi3", rot_dims=12, tensors=factors,
                       orig_ctx=rope["original_max_position_embeddings"], ints={"{arch}.attention.sliding_window": 24},
                       floats={"{arch}.rope.scaling.attn_factor": attn})
    cfg, params = spjax.load_pretrained(path)
    assert cfg.sliding_window == 24 and all(cfg.windowed)
    tm.config.sliding_window = 24  # (the session's cached model: put back below)
    try:
        assert _max_diff(cfg, params, tm, ids) <= 1e-5
    finally:
        tm.config.sliding_window = None
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids))) - full).max() > 1e-3  # the window counts


def test_gguf_refuses_partial_rotary(tmp_path):
    tm = _torch("LlamaConfig")
    cfg = spjax.load_pretrained(_write_gguf(tmp_path / "full.gguf", tm, rot_dims=8, eos_eot=(2, 9)))[0]
    assert cfg.head_dim == 8 and cfg.eos_token_ids == (2, 9)  # eos and end-of-turn: both stop the sampler
    with pytest.raises(hf.CheckpointError, match=r"part.gguf: llama.rope.dimension_count 4 rotates part of each .* "
                                                 r"for phi3 only"):
        spjax.load_pretrained(_write_gguf(tmp_path / "part.gguf", tm, rot_dims=4))


@pytest.mark.parametrize("key,value,message", [("hidden_act", "gelu", r"hidden_act 'gelu' is not supported"),
                                               ("partial_rotary_factor", 0.5, r"partial_rotary_factor 0.5 with llama: transformers' llama rotates every")])
def test_config_refuses_what_the_model_does_not_compute(key, value, message):
    conf = oracle.torch_model("llama3").config.to_dict()
    assert hf.config_from_hf(dict(conf, hidden_act="swish"), "c.json").architecture == "llama"  # SiLU by name
    with pytest.raises(hf.CheckpointError, match=rf"^c.json: {message}"):
        hf.config_from_hf(dict(conf, **{key: value}), "c.json")


def test_mistral_without_a_window_key_gets_transformers_default():
    conf = oracle.torch_model("mistral").config.to_dict()
    del conf["sliding_window"]
    assert hf.config_from_hf(conf).sliding_window == 4096  # MistralConfig's default
    assert hf.config_from_hf(dict(conf, sliding_window=None)).sliding_window is None


def test_config_keys_read_as_transformers_reads_them():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=128,
                num_hidden_layers=1, num_attention_heads=4)
    # rope_scaling beside rope_parameters (a 4.x-style edit of a 5.x config): transformers reads rope_scaling
    # alone, its theta from the top level or its default (before: the two merged, rope_parameters' type and
    # theta won over a 4.x {"type": ...})
    import copy
    from transformers import LlamaConfig
    five = {"rope_type": "default", "rope_theta": 5e5}
    for extra in [dict(rope_parameters=five, rope_scaling={"rope_type": "linear", "factor": 4.0}),
                  dict(rope_parameters=five, rope_scaling={"type": "linear", "factor": 4.0}),
                  dict(rope_parameters=five, rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=2e5),
                  dict(rope_parameters=five), dict(rope_theta=2e5, rope_scaling={"type": "linear", "factor": 4.0})]:
        theirs = LlamaConfig.from_dict(copy.deepcopy(dict(base, **extra))).rope_parameters  # (it edits the dicts)
        ours = hf.config_from_hf(dict(base, **extra))
        assert (ours.rope_type, ours.rope_factor, ours.rope_theta) == (
            theirs["rope_type"], theirs.get("factor", 1.0), theirs["rope_theta"]), extra
    # llama3 scaling without original_max_position_embeddings: transformers takes max_position_embeddings
    llama3 = hf.config_from_hf(dict(base, max_position_embeddings=64,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    assert llama3.rope_original_max_position == 64
    qwen = dict(base, architectures=["Qwen2ForCausalLM"], use_sliding_window=True, max_window_layers=0)
    assert hf.config_from_hf(qwen).sliding_window == 4096  # Qwen2Config's default window
    with pytest.raises(hf.CheckpointError, match=r"^m/config.json: required key\(s\) vocab_size missing$"):
        hf.config_from_hf({k: v for k, v in base.items() if k != "vocab_size"}, "m/config.json")


def test_generation_config_eos_ids_are_stop_ids(tmp_path):
    """Instruct models keep end-of-turn ids in generation_config.json (Llama 3: 128009), where
    generate() reads them: before, the sampler ran past the end of a turn to max_new_tokens."""
    import json
    cfg, params = oracle.spjax_model("llama3")
    out = spjax.save_pretrained(dataclasses.replace(cfg, eos_token_ids=(2,)), params, tmp_path / "m")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7, 9]}, f)
    assert spjax.load_pretrained(out)[0].eos_token_ids == (2, 7, 9)
    assert hf.load_model_config(out).eos_token_ids == (2, 7, 9)


def test_export_keeps_the_source_generation_config(tmp_path):
    """An export's generation_config.json is its source's, with the exported bos/eos ids: before, every
    export said do_sample=True and nothing else, so a greedy model's generate() sampled at temperature 1
    and a sampling model lost its temperature and top_p."""
    import json
    cfg, params = oracle.spjax_model("llama3")
    src = spjax.save_pretrained(dataclasses.replace(cfg, eos_token_ids=(2,)), params, tmp_path / "src")
    for gen in ({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
                {"eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9}):
        with open(os.path.join(src, "generation_config.json"), "w") as f:
            json.dump(gen, f)
        loaded, params = spjax.load_pretrained(src)
        out = spjax.save_pretrained(loaded, params, tmp_path / "out", source=src)
        with open(os.path.join(out, "generation_config.json")) as f, open(os.path.join(out, "config.json")) as c:
            got, eos = json.load(f), json.load(c)["eos_token_id"]
        assert got == dict(gen, bos_token_id=loaded.bos_token_id, eos_token_id=eos), got
    bare = spjax.save_pretrained(loaded, params, tmp_path / "gguf_like")
    with open(os.path.join(bare, "generation_config.json")) as f:
        assert "do_sample" not in json.load(f)  # no source: generate()'s own defaults


def test_gguf_refuses_tensors_it_does_not_read(tmp_path):
    tm = _torch("LlamaConfig")
    path = _write_gguf(tmp_path / "m.gguf", tm, tensors={"blk.0.attn_output.bias": np.ones(32, np.float32)})
    with pytest.raises(hf.CheckpointError, match=r"m.gguf: tensor\(s\) blk.0.attn_output.bias are not part"):
        spjax.load_pretrained(path)


@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias"])
def test_llama_biases_are_refused(key, tmp_path):
    tm = _torch("LlamaConfig", **{key: True})
    with pytest.raises(hf.CheckpointError, match=rf"<LlamaForCausalLM>: {key} is true"):
        hf.from_transformers(tm)
    tm.save_pretrained(tmp_path / "hf")
    with pytest.raises(hf.CheckpointError, match=rf"hf/config.json: {key} is true"):
        spjax.load_pretrained(str(tmp_path / "hf"))


def test_unread_tensors_are_refused_but_derivable_ones_load(tmp_path):
    from safetensors.numpy import load_file, save_file
    cfg, params = oracle.spjax_model("llama3")  # tied embeddings: no lm_head.weight in the export
    good = str(spjax.save_pretrained(cfg, params, tmp_path / "good"))
    tensors = load_file(os.path.join(good, "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]

    def load_with(**extra):
        save_file(dict(tensors, **extra), os.path.join(good, "model.safetensors"))
        return spjax.load_pretrained(good)

    # a buffer transformers recomputes, and a tied head stored as well (equal to the embedding)
    _, p2 = load_with(**{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
                         "lm_head.weight": embed.copy()})
    assert float(jnp.abs(p2["embed"] - params["embed"]).max()) == 0.0
    with pytest.raises(hf.CheckpointError, match=r"good: tensor\(s\) lm_head.weight are not part"):
        load_with(**{"lm_head.weight": embed + 1})
    with pytest.raises(hf.CheckpointError, match=r"good: tensor\(s\) score.weight are not part"):
        load_with(**{"score.weight": embed[:1]})  # a reward model's head: spjax.reward_model reads those
    o_bias = {f"model.layers.{i}.self_attn.o_proj.bias": np.ones(cfg.hidden_size, np.float32) for i in range(2)}
    up_bias = {f"model.layers.{i}.mlp.up_proj.bias": np.ones(cfg.intermediate_size, np.float32) for i in range(2)}
    with pytest.raises(hf.CheckpointError, match=r"good: tensor\(s\) model.layers.0.mlp.up_proj.bias, "
                       r"model.layers.0.self_attn.o_proj.bias, model.layers.1.mlp.up_proj.bias and 1 more are not"):
        load_with(**o_bias, **up_bias)


@pytest.mark.parametrize("max_window_layers,window", [(0, 6), (2, None), (1, "layer 1")])
def test_qwen2_sliding_window_layers_as_transformers(max_window_layers, window, tmp_path):
    tm = _torch("Qwen2Config", use_sliding_window=True, sliding_window=6, max_window_layers=max_window_layers)
    cfg, params = hf.from_transformers(tm)
    assert _max_diff(cfg, params, tm, _ids((2, 24))) <= 1e-4
    if window != "layer 1":
        assert cfg.sliding_window == window and cfg.layer_types == ()
        return
    # layer 0 full, layer 1 windowed: read from 5.x's layer_types and from 4.x's max_window_layers alike,
    # and exported so that transformers computes the same model again
    assert cfg.windowed == (False, True) and cfg.sliding_window == 6
    conf = {k: v for k, v in tm.config.to_dict().items() if k != "layer_types"}  # transformers 4.x's keys
    assert hf.config_from_hf(conf).windowed == (False, True)
    import torch
    import transformers
    back = transformers.AutoModelForCausalLM.from_pretrained(spjax.save_pretrained(cfg, params, tmp_path / "hf"),
                                                             dtype=torch.float32)
    assert back.config.layer_types == ["full_attention", "sliding_attention"]
    assert _max_diff(cfg, params, back, _ids((2, 24))) <= 1e-4
    full, _ = hf.from_transformers(tm, sliding_window=None)
    assert _max_diff(full, params, tm, _ids((2, 24))) > 1e-3  # the window binds: the checks above count


def test_qwen2_window_survives_export_to_transformers(tmp_path):
    import torch
    import transformers
    cfg, params = hf.from_transformers(oracle.torch_model("qwen2"), sliding_window=6)
    out = spjax.save_pretrained(cfg, params, tmp_path / "hf")
    tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = _ids((2, 24))
    assert _max_diff(cfg, params, tm, ids) <= 1e-4
    full, _ = hf.from_transformers(oracle.torch_model("qwen2"))
    assert _max_diff(full, params, tm, ids) > 1e-3  # the window changes these logits: the check above counts
    assert spjax.load_pretrained(out)[0].sliding_window == 6


@pytest.mark.parametrize("family,extra,exported", [
    ("qwen2", dict(architecture="llama"), "Qwen2ForCausalLM"),
    ("qwen2", dict(architecture="mistral", sliding_window=6), "Qwen2ForCausalLM"),  # before: biases dropped
    ("llama3", dict(sliding_window=6), "MistralForCausalLM"),
    ("qwen3", dict(architecture="llama"), "Qwen3ForCausalLM")])
def test_llama_variants_export_as_the_family_that_computes_them(family, extra, exported, tmp_path):
    """A llama with q/k/v biases (a Llama GGUF can hold them) or a window (an override) has no transformers
    Llama equivalent (attention_bias adds an o_proj bias): it exports as Qwen2 or Mistral, the same model."""
    import torch
    import transformers
    cfg, params = hf.from_transformers(oracle.torch_model(family), **extra)
    assert cfg.architecture == extra.get("architecture", "llama")
    out = spjax.save_pretrained(cfg, params, tmp_path / "hf")
    tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(tm).__name__ == exported
    assert _max_diff(cfg, params, tm, _ids((2, 24))) <= 1e-4
