"""chi2 self-play with LoRA on one GPU: Ministral-3-8B-Instruct-2512 (a local HF directory of the multimodal
Mistral3ForConditionalGeneration around a `ministral3` language model) on the SPIN UltraChat data (the 7B
configs' files; see docs/scale_out.md).

  bash launch/gpu_single_host.sh --cuda --config configs/single_gpu_ministral3_8b.py --workdir runs/ministral3_8b

The instruct release stores the language model's projections in FP8 (weight_scale_inv beside each): spjax
reads them dequantized into the bf16 frozen base, trains r = 16 adapters on every projection, leaves the
Pixtral vision tower unread, and exports the whole multimodal model again, unquantized (a vision tower in FP8
too would be refused at export: then name the bf16 release as model_path). Ministral 3 is Mistral with YaRN
whose rotated queries grow by 1 + 0.1 log(1 + floor(position / 16384)): 1 within 16k tokens. The 3B and 14B
sizes: `model_path=DIR` (the run reads DIR/config.json; the `model` shape below only serves compile_check).
Where DIR holds only Mistral's tekken.json, `tokenizer_path` names a directory with its tokenizer.json.
Check memory first: python -m spjax.compile_check --config configs/single_gpu_ministral3_8b.py
(2026-12-04: the sampler's peak, a merged bf16 copy of the policy beside it, is 66.7 GiB on the CPU stand-in for
an H100, 36.3 on a v5p chip through libtpu; the CPU compiler's f32 copies of bf16 weights make it the larger.
Sampling 64 prompts at once and 8 micro-batches put the stand-in at 74.0 GiB, 97%. `base_quant=int8`: 33.8.)
"""
from spjax.config import Config, DataConfig, LoraConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, \
    RunConfig, SamplingConfig

DEVICES = 1
TOPOLOGY = "h100"  # one 80 GB GPU

# Ministral 3 8B's language model: Ministral3Config's defaults (its text_config), YaRN x16 over 16384 positions
MINISTRAL3_8B = ModelConfig(
    vocab_size=131072, hidden_size=4096, intermediate_size=14336, num_layers=34, num_heads=32, num_kv_heads=8,
    head_dim=128, rope_theta=1e6, rope_type="yarn", rope_factor=16.0, rope_original_max_position=16384,
    rope_attention_factor=1.0, query_scale_beta=0.1, rms_norm_eps=1e-5, tie_embeddings=False,
    max_position_embeddings=262144, architecture="ministral3", bos_token_id=1, eos_token_ids=(2,), pad_token_id=11)


def get_config() -> Config:
    return Config(
        model_path="/data/models/Ministral-3-8B-Instruct-2512",  # HF directory (config.json, safetensors, tokenizer)
        model=MINISTRAL3_8B,
        param_dtype="bfloat16",  # the frozen base; adapters train in fp32 regardless
        compute_dtype="bfloat16",
        remat="full",
        lora=LoraConfig(rank=16, alpha=16.0),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),  # one device
        data=DataConfig(path="/data/ultrachat_200k/spin_train_50k.jsonl",
                        eval_path="/data/ultrachat_200k/spin_test.jsonl", format="prompt_response",
                        max_prompt_len=512, max_len=1024, buckets=(256, 512, 768, 1024), max_examples=50_000),
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=256, batch_size=32),
        objective=ObjectiveConfig(name="chi2", beta=0.1, c=1.0),  # rewards bounded to [-1/c, 1/c]
        # A LoRA-sized step (lora_zephyr7b_1gpu's); a starting point, not a tuned value.
        optim=OptimConfig(name="adamw", lr=5e-5, warmup_frac=0.1, schedule="linear", weight_decay=0.0,
                          clip_norm=1.0, grad_accum=16),  # 16 micro-batches of 4 pairs
        run=RunConfig(rounds=3, epochs=2, batch_size=64, mix_previous=False, seed=0, checkpoint_every=200,
                      keep_checkpoints=2, log_every=10, eval_examples=256, eval_show=3, eval_max_new_tokens=256,
                      score_batch_size=16),
    )
