"""chi2 self-play on one GPU: a Llama-3.2-1B-Instruct-like model (a local HF directory) on the SPIN
UltraChat data (the 7B configs' files; see docs/scale_out.md).

  bash launch/gpu_single_host.sh --cuda --config configs/single_gpu_llama3.2_1b.py --workdir runs/llama3.2_1b

or, with jax's CUDA wheels already installed,

  python -m spjax.train --config configs/single_gpu_llama3.2_1b.py --workdir runs/llama3.2_1b

Check memory first: python -m spjax.compile_check --config configs/single_gpu_llama3.2_1b.py
"""
from spjax.config import Config, DataConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, RunConfig, \
    SamplingConfig

DEVICES = 1
TOPOLOGY = "h100"  # one 80 GB GPU

# Llama-3.2-1B-Instruct's config.json (llama3 RoPE scaling, tied embeddings, three EOS ids)
LLAMA32_1B = ModelConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
    head_dim=64, rope_theta=500_000.0, rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0, rope_original_max_position=8192, rms_norm_eps=1e-5, tie_embeddings=True,
    max_position_embeddings=131072, architecture="llama", bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009))


def get_config() -> Config:
    return Config(
        model_path="/data/models/Llama-3.2-1B-Instruct",  # HF directory (config.json, safetensors, tokenizer)
        model=LLAMA32_1B,
        param_dtype="float32",  # fp32 master params and AdamW moments: ~20 GB with the gradients
        compute_dtype="bfloat16",
        remat="full",  # recompute layers in the backward pass
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),  # one device
        data=DataConfig(path="/data/ultrachat_200k/spin_train_50k.jsonl",
                        eval_path="/data/ultrachat_200k/spin_test.jsonl", format="prompt_response",
                        max_prompt_len=512, max_len=1024, buckets=(256, 512, 768, 1024), max_examples=50_000),
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=256, batch_size=128),
        objective=ObjectiveConfig(name="chi2", beta=0.1, c=1.0),  # rewards bounded to [-1/c, 1/c]
        # A starting point between SPIN's 7B 5e-7 and what 135M-class models take; not tuned.
        optim=OptimConfig(name="adamw", lr=2e-6, warmup_frac=0.1, schedule="linear", weight_decay=0.0,
                          clip_norm=1.0, grad_accum=4),  # 4 micro-batches of 16 pairs
        run=RunConfig(rounds=3, epochs=2, batch_size=64, mix_previous=False, seed=0, checkpoint_every=200,
                      keep_checkpoints=2, log_every=10, eval_examples=256, eval_show=3, eval_max_new_tokens=256,
                      score_batch_size=64),
    )
