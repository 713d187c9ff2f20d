"""chi2 self-play with QLoRA on one GPU: Mistral-Small-3.1-24B-Instruct (a local HF directory of the
multimodal Mistral3ForConditionalGeneration; 3.2 is the same shape, `model_path=DIR`, with `tokenizer_path`
naming a directory with its tokenizer.json where DIR holds only Mistral's tekken.json) on the SPIN
UltraChat data (the 7B configs' files; see docs/scale_out.md).

  bash launch/gpu_single_host.sh --cuda --config configs/single_gpu_mistral_small_24b.py --workdir runs/mistral_small

spjax trains its Mistral language model (spjax.hf_wrapped): it reads DIR/config.json's text_config and
the language model's tensors (from the HF-format model-*.safetensors the index names; the
consolidated.safetensors beside them is the same weights in Mistral's own format, not read), leaves the
Pixtral vision tower unread, and exports the whole multimodal model again, the vision tensors copied
byte for byte from DIR. The frozen base is stored int8 (base_quant): the sampler then decodes the policy
as it is, int8 read per step with the adapters on the fly, with no merged bf16 copy beside it.
Check memory first: python -m spjax.compile_check --config configs/single_gpu_mistral_small_24b.py
(CPU compiler standing in for an H100, 2026-12-04: the 23.7B-param language model, int8 (23.56 GiB), LoRA
r=16 on every projection (92.4M trainable): 45.0 GiB peak, the train step's (sampler 39.1). Not yet
compiled on a GPU.)
"""
from spjax.config import Config, DataConfig, LoraConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, \
    RunConfig, SamplingConfig

DEVICES = 1
TOPOLOGY = "h100"  # one 80 GB GPU; compile_check --topology h200 etc. for others

# Mistral-Small-3.1/3.2-24B's language model (config.json's text_config)
MISTRAL_SMALL_24B = ModelConfig(
    vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_layers=40, num_heads=32, num_kv_heads=8,
    head_dim=128, rope_theta=1e9, rope_original_max_position=131072, rms_norm_eps=1e-5, tie_embeddings=False,
    sliding_window=None,
    max_position_embeddings=131072, architecture="mistral", bos_token_id=1, eos_token_ids=(2,))


def get_config() -> Config:
    return Config(
        model_path="/data/models/Mistral-Small-3.1-24B-Instruct-2503",  # HF directory (config.json, safetensors, tokenizer)
        model=MISTRAL_SMALL_24B,
        param_dtype="bfloat16",  # the frozen base before quantization; adapters train in fp32 regardless
        compute_dtype="bfloat16",
        remat="full",
        lora=LoraConfig(rank=16, alpha=16.0),
        base_quant="int8",
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
