"""Tiny random transformers (PyTorch) models: the numerical oracle for spjax's model and sampler."""
import functools

import numpy as np

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

# Each: transformers config class name, extra config fields.
FAMILIES = {
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "mistral": ("MistralConfig", dict(rope_theta=10000.0, tie_word_embeddings=False, sliding_window=4096, eos_token_id=3)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=False)),
    # q/k norms, and a head_dim that is not hidden_size / heads (Qwen3-0.6B: 128 against 1024 / 16)
    "qwen3": ("Qwen3Config", dict(rope_theta=1000000.0, tie_word_embeddings=True, head_dim=32)),
    # fused qkv_proj and gate_up_proj, 12 of each head's 16 dims rotated (Phi-4-mini: 0.75), LongRoPE's
    # per-frequency divisors (the short ones: these tests stay within the original 256 positions; test_phi3 passes it)
    "phi3": ("Phi3Config", dict(tie_word_embeddings=True, partial_rotary_factor=0.75, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, original_max_position_embeddings=256, rope_scaling=dict(
                                    rope_type="longrope", short_factor=[1.0, 1.3, 1.9, 2.6, 3.1, 4.0],
                                    long_factor=[1.5, 2.5, 4.0, 6.0, 9.0, 12.0]))),
    # a window on every other layer (8 tokens: it binds at the tests' lengths), scores scaled by
    # query_pre_attn_scalar 24 (not head_dim 16), soft caps low enough to bind on random weights
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0, pad_token_id=0)),
    # q/k norms, windowed layers rotating by their own theta, the full ones by linearly scaled rope
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, pad_token_id=0,
                                        layer_types=["sliding_attention", "full_attention"],
                                        final_logit_softcapping=4.0, rope_parameters={
                                            "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                                            "sliding_attention": dict(rope_type="default", rope_theta=100.0)})),
    # no norms before attention or the MLP, one after each; q/k norms over all heads at once
    "olmo2": ("Olmo2Config", dict(rope_theta=500000.0, tie_word_embeddings=False)),
    # OLMo 2's layers, a window on the first (8 tokens: it binds), YaRN on the full layer alone (the windowed
    # one rotates by unscaled rope)
    "olmo3": ("Olmo3Config", dict(rope_theta=500000.0, tie_word_embeddings=False, sliding_window=8, eos_token_id=2,
                                  layer_types=["sliding_attention", "full_attention"], rope_scaling=dict(
                                      rope_type="yarn", factor=2.0, original_max_position_embeddings=256))),
    # Mistral with YaRN and Llama 4's query scale by position, which grows every 32 positions here (Ministral 3: beta 0.1)
    "ministral3": ("Ministral3Config", dict(head_dim=16, pad_token_id=0, eos_token_id=3, rope_parameters=dict(
        type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=32, max_position_embeddings=512,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=1.0))),
    # Llama with muP's multipliers (Granite 3.x: 12, 1/128 = 1/head_dim, 0.22, 16; these bend random weights too)
    "granite": ("GraniteConfig", dict(embedding_multiplier=3.0, attention_multiplier=0.0625, residual_multiplier=0.5,
                                      logits_scaling=4.0, rope_theta=1e4, tie_word_embeddings=True)),
    # Llama whose second layer rotates nothing (NoPE) and, as SmolLM3 windows by default, is windowed (8 tokens)
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0], use_sliding_window=True, sliding_window=8,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # mixtures of experts: 4 experts, 2 a token (Mixtral's weights renormalized); 8 experts of width 48, 3 a token,
    # not renormalized (Qwen3-MoE's norm_topk_prob false), q/k norms
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6,
                                      tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, head_dim=32,
                                         norm_topk_prob=False, tie_word_embeddings=False)),
    # 4 experts of width 48, 2 a token, not renormalized, beside a shared expert of width 80 (sigmoid-gated); q/k/v biases
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=80, norm_topk_prob=False, rope_theta=1e6,
                                         tie_word_embeddings=False)),
    # 4 experts, 2 a token, not renormalized; q/k norms over all heads at once
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, rope_theta=1e4,
                                  tie_word_embeddings=False)),
}


@functools.lru_cache(maxsize=None)
def torch_model(family: str, seed: int = 0):
    """A random-init fp32 transformers model of the given family (cached per session)."""
    import torch
    import transformers
    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**TINY, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # HF zero-inits biases; random ones make the Qwen2 bias path count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def torch_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch
    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(np.asarray(ids), dtype=torch.long), **kw).logits.float().numpy()


def spjax_model(family: str, seed: int = 0):
    from spjax import hf
    return hf.from_transformers(torch_model(family, seed))


def fp8_quantize(path, block, per_tensor=(), only=lambda name: True):
    """Rewrite a safetensors checkpoint as transformers' FP8 ('fp8', fine-grained): each projection weight
    `only` picks as float8_e4m3fn beside a float32 weight_scale_inv multiplier per `block` (per tensor for the
    names in per_tensor), as DeepSeek's and Qwen3's -FP8 releases store them."""
    import torch
    from safetensors.torch import load_file, save_file
    out = {}
    for name, w in load_file(path).items():
        if not (name.endswith("proj.weight") and only(name)):
            out[name] = w
            continue
        r, c = w.shape
        bm, bn = (r, c) if name in per_tensor else block
        amax = w.reshape(r // bm, bm, c // bn, bn).abs().amax(dim=(1, 3)).clamp(min=1e-12).float()
        scale = amax / 448.0  # (float8_e4m3fn's largest value)
        out[name] = (w.reshape(r // bm, bm, c // bn, bn) / scale[:, None, :, None]).reshape(r, c).to(torch.float8_e4m3fn)
        out[name + "_scale_inv"] = scale.reshape(1) if name in per_tensor else scale
    save_file(out, path, metadata={"format": "pt"})
