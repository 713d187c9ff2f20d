"""chi2 self-play on one GPU: a Qwen2-0.5B-Instruct-like model (a local HF directory) on the SPIN
UltraChat data (the 7B configs' files; see docs/scale_out.md).

  bash launch/gpu_single_host.sh --cuda --config configs/single_gpu_qwen2_0.5b.py --workdir runs/qwen2_0.5b

or, with jax's CUDA wheels already installed,

  python -m spjax.train --config configs/single_gpu_qwen2_0.5b.py --workdir runs/qwen2_0.5b

Another Qwen2 checkpoint of a different size: `model_path=DIR` (the run reads DIR/config.json; the
`model` shape below only serves compile_check where the weights are absent).
Check memory first: python -m spjax.compile_check --config configs/single_gpu_qwen2_0.5b.py
"""
from spjax.config import Config, DataConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, RunConfig, \
    SamplingConfig

DEVICES = 1
TOPOLOGY = "h100"  # one 80 GB GPU; compile_check --topology h200 etc. for others

# Qwen2-0.5B-Instruct's config.json
QWEN2_05B = ModelConfig(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_embeddings=True, qkv_bias=True, max_position_embeddings=32768,
    architecture="qwen2", bos_token_id=151643, eos_token_ids=(151645,))


def get_config() -> Config:
    return Config(
        model_path="/data/models/Qwen2-0.5B-Instruct",  # HF directory (config.json, safetensors, tokenizer)
        model=QWEN2_05B,
        param_dtype="float32",  # fp32 master params and AdamW moments
        compute_dtype="bfloat16",
        remat="full",  # 32 sequences of 1024 tokens per micro-batch; recompute layers in the backward pass
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),  # one device
        data=DataConfig(path="/data/ultrachat_200k/spin_train_50k.jsonl",
                        eval_path="/data/ultrachat_200k/spin_test.jsonl", format="prompt_response",
                        max_prompt_len=512, max_len=1024, buckets=(256, 512, 768, 1024), max_examples=50_000),
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=256, batch_size=256),
        # c = 1 bounds the optimal reward to [-1, 1]: a round moves a log-ratio by at most ~1/(beta c).
        objective=ObjectiveConfig(name="chi2", beta=0.1, c=1.0),
        # A small model wants a larger step than SPIN's 7B 5e-7; a starting point, not a tuned value.
        optim=OptimConfig(name="adamw", lr=5e-6, warmup_frac=0.1, schedule="linear", weight_decay=0.0,
                          clip_norm=1.0, grad_accum=4),  # 4 micro-batches of 16 pairs
        run=RunConfig(rounds=3, epochs=2, batch_size=64, mix_previous=False, seed=0, checkpoint_every=200,
                      keep_checkpoints=2, log_every=10, eval_examples=256, eval_show=3, eval_max_new_tokens=256,
                      score_batch_size=64),
    )
