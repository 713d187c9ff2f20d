"""chi2 self-play of a mixture of experts: Qwen3-30B-A3B (128 experts, 8 a token; a local HF directory) with
LoRA (r = 16) on its attention over a frozen bf16 base, on a TPU v5p-8 slice (4 chips), answering without
thinking (see configs/single_gpu_qwen3_0.6b.py), on the SPIN UltraChat data (docs/scale_out.md).

  bash launch/tpu_pod.sh --name qwen3moe --zone us-east5-a --accelerator-type v5p-8 \\
      --config configs/lora_qwen3_30b_a3b_v5p.py --workdir gs://BUCKET/qwen3_30b_a3b

which runs, on the slice's host,

  python -m spjax.train --config configs/lora_qwen3_30b_a3b_v5p.py --workdir WORKDIR

The experts and the router stay frozen (lora.targets=...,experts_gate,experts_up,experts_down would adapt
each expert too: README, "Mixtures of experts"); the adapters on q, k, v, o train (the run prints their count). A 30B model reads 3B parameters a token, so a
round's sampling costs about what a dense 3B model's would, with the whole 61 GB of bf16 weights split
over the 4 chips (fsdp) and each chip routing its own rows.
Check memory first (libtpu compiles for the chips; no TPU needed, see docs/scale_out.md):
  python -m spjax.compile_check --config configs/lora_qwen3_30b_a3b_v5p.py
(2026-12-04, through libtpu for v5p-8: train step 20.3 GiB, sampler 20.2 GiB of 95 per chip. A CPU stand-in
cannot estimate a mixture of experts: XLA:CPU expands each grouped matmul over every expert.)
"""
from spjax.config import Config, DataConfig, LoraConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, \
    RunConfig, SamplingConfig

DEVICES = 4  # JAX devices of a v5p-8 slice: 4 chips
TOPOLOGY = "v5p-8"  # what spjax.compile_check compiles for by default

# Qwen3-30B-A3B's config.json (every layer sparse; moe_intermediate_size is each expert's width) and
# generation_config.json's stop ids. The run reads the real files from model_path; this copy serves
# compile_check where the weights are absent.
QWEN3_30B_A3B = ModelConfig(
    vocab_size=151936, hidden_size=2048, intermediate_size=768, num_layers=48, num_heads=32, num_kv_heads=4,
    head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_embeddings=False, qk_norm=True,
    max_position_embeddings=40960, architecture="qwen3_moe", num_experts=128, experts_per_token=8, norm_topk=True,
    bos_token_id=151643, eos_token_ids=(151645, 151643))


def get_config() -> Config:
    return Config(
        model_path="/data/models/Qwen3-30B-A3B",  # HF directory (config.json, safetensors, tokenizer)
        model=QWEN3_30B_A3B,
        param_dtype="bfloat16",  # the frozen base; the adapters train in fp32 regardless
        compute_dtype="bfloat16",
        remat="full",
        lora=LoraConfig(rank=16, alpha=16.0, targets=("q", "k", "v", "o")),
        mesh=MeshConfig(data=1, fsdp=4, tensor=1),  # the base split over the 4 chips: ~15 GiB each
        data=DataConfig(path="/data/ultrachat_200k/spin_train_50k.jsonl",
                        eval_path="/data/ultrachat_200k/spin_test.jsonl", format="prompt_response",
                        max_prompt_len=512, max_len=1024, buckets=(256, 512, 768, 1024), max_examples=50_000,
                        template_args=("enable_thinking=false",)),
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=256, batch_size=128),
        # c = 1 bounds the optimal reward to [-1, 1]: a round moves a log-ratio by at most ~1/(beta c).
        objective=ObjectiveConfig(name="chi2", beta=0.1, c=1.0),
        # An adapter-sized step; a starting point, not a tuned value. 64 pairs a step as 4 micro-batches of
        # 16 (4 pairs, 8 sequences, per chip).
        optim=OptimConfig(name="adamw", lr=5e-5, warmup_frac=0.1, schedule="linear", weight_decay=0.0,
                          clip_norm=1.0, grad_accum=4),
        run=RunConfig(rounds=3, epochs=2, batch_size=64, mix_previous=False, seed=0, checkpoint_every=200,
                      keep_checkpoints=2, log_every=10, eval_examples=256, eval_show=3, eval_max_new_tokens=256,
                      score_batch_size=32),
    )
