"""SPPO with a reward model as the judge, LoRA on one GPU: Gemma-2-9B-it (a local HF directory) samples
K = 5 answers per UltraChat prompt each round, a reward model (any local *ForSequenceClassification
directory spjax reads: Llama, Mistral, Qwen2, Phi-3, Gemma 2) ranks them, and SPPO trains on each
prompt's best against its worst, with their soft win rates (the SPPO paper's Gemma-2-9B setting, with
a reward model where it used PairRM).

  bash launch/gpu_single_host.sh --cuda --config configs/sppo_gemma2_9b_1gpu.py --workdir runs/sppo_gemma2

Gemma 2 alternates a 4096-token window (even layers) with full attention (odd layers) and soft-caps the
attention scores (50) and the final logits (30): spjax reads all of it from DIR/config.json (the
`model` below only gives compile_check the shapes where the weights are absent). With the soft cap
the attention runs on XLA's einsum path on a GPU (cuDNN's call has no cap); sequences stay within the
window here, so no layer masks anything the full ones would not.
Check memory first: python -m spjax.compile_check --config configs/sppo_gemma2_9b_1gpu.py
(CPU compiler standing in for an H100, 2026-12-04, with the int8 base below and JUDGE_MODEL's 8B reward
model (13.98 GiB, on the device for the judge phases only): 56.6 GiB peak, the judge's batch (train step
25.1, sampler 29.2; 39.1 and 43.2 while the reward model stayed on the device). The judge's 32.9 GiB of
temporaries are mostly the CPU compiler's fp32 copy of the reward model's bf16 weights (28.3 GiB at
judge.batch_size=4): a GPU needs far less. With `base_quant=none`, a bf16 base, 103.9 GiB (117.9 before),
"does not fit": the sampler decodes a merged bf16 copy beside the policy, and the CPU compiler
over-counts bf16 programs, see docs/lora.md. Not yet compiled on a GPU.)
"""
from spjax.config import Config, DataConfig, JudgeConfig, LoraConfig, MeshConfig, ModelConfig, ObjectiveConfig, \
    OptimConfig, RunConfig, SamplingConfig

DEVICES = 1
TOPOLOGY = "h100"  # one 80 GB GPU; compile_check --topology h200 etc. for others

# Gemma-2-9B-it's shapes (config.json)
GEMMA2_9B = ModelConfig(
    vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_layers=42, num_heads=16, num_kv_heads=8,
    head_dim=256, rope_theta=10000.0, rms_norm_eps=1e-6, tie_embeddings=True, sliding_window=4096,
    layer_types=("sliding_attention", "full_attention") * 21, query_scale=256.0, attn_softcap=50.0,
    final_softcap=30.0, max_position_embeddings=8192, architecture="gemma2", bos_token_id=2,
    eos_token_ids=(1, 107), pad_token_id=0)

# The reward model's shape, for compile_check where /data/models/reward_model is absent (a run reads its
# config.json): here a Llama-3.1-8B classifier's, e.g. Skywork-Reward-Llama-3.1-8B. The run holds it in
# the compute dtype beside the policy from start to end.
JUDGE_MODEL = ModelConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    rope_theta=500000.0, rope_type="llama3", rope_factor=8.0, rope_original_max_position=8192,
    rms_norm_eps=1e-5, max_position_embeddings=131072, architecture="llama")


def get_config() -> Config:
    return Config(
        model_path="/data/models/gemma-2-9b-it",  # HF directory (config.json, safetensors, tokenizer)
        model=GEMMA2_9B,
        param_dtype="bfloat16",  # adapters train in fp32 regardless
        compute_dtype="bfloat16",
        remat="full",
        lora=LoraConfig(rank=16, alpha=16.0),
        base_quant="int8",  # the frozen base stored int8: see the memory figures above
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),  # one device
        data=DataConfig(path="/data/ultrachat_200k/spin_train_50k.jsonl",
                        eval_path="/data/ultrachat_200k/spin_test.jsonl", format="prompt_response",
                        max_prompt_len=512, max_len=1024, buckets=(256, 512, 768, 1024), max_examples=20_000),
        # 8 prompts x 5 samples decode together: 40 rows x 1024 slots of 42 layers x 8 kv heads x 256
        # (bf16 K and V: 14 GiB) beside the weights.
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=512, batch_size=8, num_samples=5),
        judge=JudgeConfig(name="reward_model:/data/models/reward_model", pairs="best_worst", batch_size=16),
        objective=ObjectiveConfig(name="sppo", beta=0.1),
        # A LoRA-sized step (lora_zephyr7b_1gpu's); a starting point, not a tuned value.
        optim=OptimConfig(name="adamw", lr=5e-5, warmup_frac=0.1, schedule="linear", weight_decay=0.0,
                          clip_norm=1.0, grad_accum=8),  # 8 micro-batches of 4 pairs
        run=RunConfig(rounds=3, epochs=1, batch_size=32, mix_previous=False, seed=0, checkpoint_every=200,
                      keep_checkpoints=2, log_every=10, eval_examples=256, eval_show=3, eval_max_new_tokens=512,
                      score_batch_size=8),
    )
