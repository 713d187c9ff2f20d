"""chi2 self-play on one GPU: a Qwen3-0.6B-like model (a local HF directory) on the SPIN UltraChat data
(the 7B configs' files; see docs/scale_out.md), answering without thinking.

  bash launch/gpu_single_host.sh --cuda --config configs/single_gpu_qwen3_0.6b.py --workdir runs/qwen3_0.6b

or, with jax's CUDA wheels already installed,

  python -m spjax.train --config configs/single_gpu_qwen3_0.6b.py --workdir runs/qwen3_0.6b

Qwen3's chat template thinks by default: its prompts end at "<|im_start|>assistant\\n" and it writes an
empty <think></think> block at the start of every real response, so the opponent would sample long
reasoning against answers without any. `data.template_args=("enable_thinking=false",)` puts that empty
block at the end of every prompt instead: real and sampled responses are both plain answers. Drop it
(`data.template_args=`) to play in thinking mode, with a max_new_tokens that fits the reasoning.
Another Qwen3 checkpoint: `model_path=DIR` (the run reads DIR/config.json; the `model` shape below
only serves compile_check where the weights are absent).
Check memory first: python -m spjax.compile_check --config configs/single_gpu_qwen3_0.6b.py
"""
from spjax.config import Config, DataConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, RunConfig, \
    SamplingConfig

DEVICES = 1
TOPOLOGY = "h100"  # one 80 GB GPU; compile_check --topology h200 etc. for others

# Qwen3-0.6B's config.json (head_dim 128: not hidden_size / heads) and generation_config.json's stop ids
QWEN3_06B = ModelConfig(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
    head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_embeddings=True, qk_norm=True,
    max_position_embeddings=40960, architecture="qwen3", bos_token_id=151643, eos_token_ids=(151645, 151643))


def get_config() -> Config:
    return Config(
        model_path="/data/models/Qwen3-0.6B",  # HF directory (config.json, safetensors, tokenizer)
        model=QWEN3_06B,
        param_dtype="float32",  # fp32 master params and AdamW moments
        compute_dtype="bfloat16",
        remat="full",  # 16 sequences of 1024 tokens per micro-batch; recompute layers in the backward pass
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),  # one device
        data=DataConfig(path="/data/ultrachat_200k/spin_train_50k.jsonl",
                        eval_path="/data/ultrachat_200k/spin_test.jsonl", format="prompt_response",
                        max_prompt_len=512, max_len=1024, buckets=(256, 512, 768, 1024), max_examples=50_000,
                        template_args=("enable_thinking=false",)),
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
