"""chi2 self-play on one GPU: SmolLM3-3B (a local HF directory), the next size up from the SmolLM2 demo, on
the SPIN UltraChat data (the 7B configs' files; see docs/scale_out.md), answering without thinking.

  bash launch/gpu_single_host.sh --cuda --config configs/single_gpu_smollm3_3b.py --workdir runs/smollm3_3b

or, with jax's CUDA wheels already installed,

  python -m spjax.train --config configs/single_gpu_smollm3_3b.py --workdir runs/smollm3_3b

SmolLM3 is Llama with every fourth layer rotating neither q nor k (NoPE: `no_rope_layers` in its config.json,
`ModelConfig.nope_layers` here). Its chat template reasons first unless told not to: `enable_thinking=false`
makes real and sampled responses plain answers (as configs/single_gpu_qwen3_0.6b.py explains); drop it
(`data.template_args=`) to play in thinking mode with a max_new_tokens that fits the reasoning. The run reads
DIR/config.json; the `model` shape below serves compile_check where the weights are absent.

Every weight trains (fp32 master params, AdamW moments, an fp32 gradient and its micro-batch sum: ~57 GiB
before activations), which wants a 141 GB card: compile_check puts the step at 71 GiB on the CPU stand-in and
81 GiB for a 95 GiB TPU v5p chip. On an 80 GB card train adapters instead (42 GiB on the stand-in):
  lora.rank=16 lora.alpha=16 param_dtype=bfloat16 optim.lr=5e-5 optim.grad_accum=4
Check memory first: python -m spjax.compile_check --config configs/single_gpu_smollm3_3b.py [--topology h100 ...]
"""
from spjax.config import Config, DataConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, RunConfig, \
    SamplingConfig

DEVICES = 1
TOPOLOGY = "h200"  # one 141 GB GPU (an 80 GB one: the LoRA overrides in the docstring)

# SmolLM3-3B's config.json: 36 layers, NoPE on layers 3, 7, ..., 35, tied embeddings, no windows
SMOLLM3_3B = ModelConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=4,
    rope_theta=5_000_000.0, rms_norm_eps=1e-6, tie_embeddings=True, max_position_embeddings=65536,
    architecture="smollm3", nope_layers=tuple(range(3, 36, 4)), pad_token_id=128004, eos_token_ids=(128012,))


def get_config() -> Config:
    return Config(
        model_path="/data/models/SmolLM3-3B",  # HF directory (config.json, safetensors, tokenizer)
        model=SMOLLM3_3B,
        param_dtype="float32",  # fp32 master params and AdamW moments
        compute_dtype="bfloat16",
        remat="full",  # recompute layers in the backward pass
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),  # one device
        data=DataConfig(path="/data/ultrachat_200k/spin_train_50k.jsonl",
                        eval_path="/data/ultrachat_200k/spin_test.jsonl", format="prompt_response",
                        max_prompt_len=512, max_len=1024, buckets=(256, 512, 768, 1024), max_examples=50_000,
                        template_args=("enable_thinking=false",)),
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=256, batch_size=128),
        objective=ObjectiveConfig(name="chi2", beta=0.1, c=1.0),  # rewards bounded to [-1/c, 1/c]
        # Between SPIN's 7B 5e-7 and the 1B config's 2e-6; a starting point, not a tuned value.
        optim=OptimConfig(name="adamw", lr=1e-6, warmup_frac=0.1, schedule="linear", weight_decay=0.0,
                          clip_norm=1.0, grad_accum=8),  # 8 micro-batches of 8 pairs
        run=RunConfig(rounds=3, epochs=2, batch_size=64, mix_previous=False, seed=0, checkpoint_every=200,
                      keep_checkpoints=2, log_every=10, eval_examples=256, eval_show=3, eval_max_new_tokens=256,
                      score_batch_size=64),
    )
