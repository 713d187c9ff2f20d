"""chi2 self-play of a mixture of experts with QLoRA on one GPU: Mixtral-8x7B-Instruct-v0.1 (46.7B parameters,
8 experts, 2 a token; a local HF directory) stored int4, LoRA (r = 16) on its attention, on the SPIN
UltraChat data (the 7B configs' files; see docs/scale_out.md).

  bash launch/gpu_single_host.sh --cuda --config configs/qlora_mixtral_8x7b_1gpu.py --workdir runs/mixtral

The base is quantized as it is read, each expert on its own (int4 in groups of 64 inputs; the router stays
bf16), and never written: the adapters on q, k, v, o train, the experts and router stay frozen (adapting the
experts too, as the QLoRA paper adapts every linear layer: lora.targets=q,k,v,o,experts_gate,experts_up,experts_down,
240M adapter params; one v5p chip compiles its train step at 54.5 GiB, the CPU stand-in for an H100 at 75.2 of 76,
too close to call until it is compiled on a GPU). The sampler decodes the policy as it is, the int4
experts dequantized a layer at a time each step; the export writes the dequantized base plus the merged
adapters in bf16 (a 93 GB Mixtral), and the adapter alone in PEFT's layout.
Check memory first: python -m spjax.compile_check --config configs/qlora_mixtral_8x7b_1gpu.py
(2026-12-04: 46.7B params, 13.6M trainable; the int4 base 24.9 GiB. The CPU compiler standing in for an
H100: train step 52.0 GiB, sampler 48.0 GiB of 76, an overestimate, since XLA:CPU expands each grouped
matmul over every expert. One v5p chip through libtpu, `--topology v5:1x1x1`, where the grouped matmul is
native: train step 37.5 GiB, sampler 37.4 GiB. Not yet compiled on a GPU.)
"""
from spjax.config import Config, DataConfig, LoraConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, \
    RunConfig, SamplingConfig

DEVICES = 1
TOPOLOGY = "h100"  # one 80 GB GPU; compile_check --topology h200 etc. for others

# Mixtral-8x7B-Instruct-v0.1's config.json (no sliding window) and its stop id. The run reads the real
# files from model_path; this copy serves compile_check where the weights are absent.
MIXTRAL_8X7B = ModelConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    rope_theta=1e6, rms_norm_eps=1e-5, tie_embeddings=False, sliding_window=None, max_position_embeddings=32768,
    architecture="mixtral", num_experts=8, experts_per_token=2, bos_token_id=1, eos_token_ids=(2,))

def get_config() -> Config:
    return Config(
        model_path="/data/models/Mixtral-8x7B-Instruct-v0.1",  # HF directory (config.json, safetensors, tokenizer)
        model=MIXTRAL_8X7B,
        param_dtype="bfloat16",  # the router, norms and embeddings; the adapters train in fp32 regardless
        compute_dtype="bfloat16",
        remat="full",
        lora=LoraConfig(rank=16, alpha=16.0, targets=("q", "k", "v", "o")),
        base_quant="int4",
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),  # one device
        data=DataConfig(path="/data/ultrachat_200k/spin_train_50k.jsonl",
                        eval_path="/data/ultrachat_200k/spin_test.jsonl", format="prompt_response",
                        max_prompt_len=512, max_len=1024, buckets=(256, 512, 768, 1024), max_examples=50_000),
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=256, batch_size=32),
        # c = 1 bounds the optimal reward to [-1, 1]: a round moves a log-ratio by at most ~1/(beta c).
        objective=ObjectiveConfig(name="chi2", beta=0.1, c=1.0),
        # A LoRA-sized step (lora_zephyr7b_1gpu's); a starting point, not a tuned value.
        optim=OptimConfig(name="adamw", lr=5e-5, warmup_frac=0.1, schedule="linear", weight_decay=0.0,
                          clip_norm=1.0, grad_accum=16),  # 16 micro-batches of 4 pairs
        run=RunConfig(rounds=3, epochs=2, batch_size=64, mix_previous=False, seed=0, checkpoint_every=200,
                      keep_checkpoints=2, log_every=10, eval_examples=256, eval_show=3, eval_max_new_tokens=256,
                      score_batch_size=8),
    )
