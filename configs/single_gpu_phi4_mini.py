"""chi2 self-play with LoRA on one GPU: a Phi-4-mini-like model (3.8B, a local HF directory) on the SPIN
UltraChat data (the 7B configs' files; see docs/scale_out.md).

  bash launch/gpu_single_host.sh --cuda --config configs/single_gpu_phi4_mini.py --workdir runs/phi4_mini

or, with jax's CUDA wheels already installed,

  python -m spjax.train --config configs/single_gpu_phi4_mini.py --workdir runs/phi4_mini

Phi-4-mini rotates 96 of each head's 128 dims (partial_rotary_factor 0.75) with LongRoPE factors: the
short ones within its original 4096 positions (all sequences here), the long ones past them (a longer
data.max_len or sampling.max_new_tokens: spjax.rope). Its q/k/v and gate/up are fused tensors, split on import; the export stacks them back and
writes the adapter in PEFT's layout for the fused modules. Another Phi-3/Phi-4 checkpoint:
`model_path=DIR` (the run reads DIR/config.json, LongRoPE factors included; the `model` below only gives
compile_check the shapes where the weights are absent, so its factors are placeholders).
Check memory first: python -m spjax.compile_check --config configs/single_gpu_phi4_mini.py
"""
from spjax.config import Config, DataConfig, LoraConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, \
    RunConfig, SamplingConfig

DEVICES = 1
TOPOLOGY = "h100"  # one 80 GB GPU; compile_check --topology h200 etc. for others

# Phi-4-mini-instruct's shapes (config.json); 48 LongRoPE factors, one per rotated pair (values: placeholders)
PHI4_MINI = ModelConfig(
    vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_layers=32, num_heads=24, num_kv_heads=8,
    rope_theta=10000.0, rope_type="longrope", rope_factor=32.0, rope_original_max_position=4096,
    rope_short_factor=(1.0,) * 48, rope_long_factor=(1.0,) * 48, partial_rotary_factor=0.75, rms_norm_eps=1e-5,
    tie_embeddings=True, max_position_embeddings=131072, architecture="phi3", bos_token_id=199999,
    eos_token_ids=(199999,), pad_token_id=199999)


def get_config() -> Config:
    return Config(
        model_path="/data/models/Phi-4-mini-instruct",  # HF directory (config.json, safetensors, tokenizer)
        model=PHI4_MINI,
        param_dtype="bfloat16",  # the frozen base; adapters train in fp32 regardless
        compute_dtype="bfloat16",
        remat="full",
        lora=LoraConfig(rank=16, alpha=16.0),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),  # one device
        data=DataConfig(path="/data/ultrachat_200k/spin_train_50k.jsonl",
                        eval_path="/data/ultrachat_200k/spin_test.jsonl", format="prompt_response",
                        max_prompt_len=512, max_len=1024, buckets=(256, 512, 768, 1024), max_examples=50_000),
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=256, batch_size=64),
        # c = 1 bounds the optimal reward to [-1, 1]: a round moves a log-ratio by at most ~1/(beta c).
        objective=ObjectiveConfig(name="chi2", beta=0.1, c=1.0),
        # A LoRA-sized step (lora_zephyr7b_1gpu's); a starting point, not a tuned value.
        optim=OptimConfig(name="adamw", lr=5e-5, warmup_frac=0.1, schedule="linear", weight_decay=0.0,
                          clip_norm=1.0, grad_accum=8),  # 8 micro-batches of 8 pairs
        run=RunConfig(rounds=3, epochs=2, batch_size=64, mix_previous=False, seed=0, checkpoint_every=200,
                      keep_checkpoints=2, log_every=10, eval_examples=256, eval_show=3, eval_max_new_tokens=256,
                      score_batch_size=16),
    )
