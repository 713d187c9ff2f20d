"""chi2 self-play with LoRA on one GPU: Gemma-3-4B-it (a local HF directory of the multimodal
Gemma3ForConditionalGeneration) on the SPIN UltraChat data (the 7B configs' files; see docs/scale_out.md).

  bash launch/gpu_single_host.sh --cuda --config configs/single_gpu_gemma3_4b.py --workdir runs/gemma3_4b

spjax trains its language model (spjax.hf_wrapped): it reads DIR/config.json's text_config and the
language model's tensors, leaves the SigLIP vision tower and the projector unread, and exports the whole
multimodal model again, the vision tensors copied byte for byte from DIR, so the result still answers
image prompts. gemma-3-12b-it and gemma-3-27b-it are the same class: `model_path=DIR` (the `model` below
only gives compile_check the 4B's shapes where the weights are absent). Five layers in six attend within
a 1024-token window and rotate by their own theta; the full ones rotate by linearly scaled rope (x8).
Check memory first: python -m spjax.compile_check --config configs/single_gpu_gemma3_4b.py
(CPU compiler standing in for an H100, 2026-12-04: the 3.9B-param language model in bf16 (7.34 GiB), LoRA
r=16 on every projection (29.8M trainable): 48.8 GiB peak, the sampler's (train step 35.0). The vision
tower is never on the device. Not yet compiled on a GPU.)
"""
from spjax.config import Config, DataConfig, LoraConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, \
    RunConfig, SamplingConfig

DEVICES = 1
TOPOLOGY = "h100"  # one 80 GB GPU; compile_check --topology h200 etc. for others

# Gemma-3-4B-it's language model (config.json's text_config with Gemma3TextConfig's defaults)
GEMMA3_4B = ModelConfig(
    vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8, num_kv_heads=4,
    head_dim=256, rope_theta=1e6, rope_type="linear", rope_factor=8.0, rope_original_max_position=131072,
    rope_local_theta=10000.0, rms_norm_eps=1e-6,
    tie_embeddings=True, qk_norm=True, sliding_window=1024,
    layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)),
    query_scale=256.0, max_position_embeddings=131072, architecture="gemma3", bos_token_id=2, eos_token_ids=(1, 106),
    pad_token_id=0)


def get_config() -> Config:
    return Config(
        model_path="/data/models/gemma-3-4b-it",  # HF directory (config.json, safetensors, tokenizer)
        model=GEMMA3_4B,
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
