"""SPIN reproduction (Chen et al. 2024): zephyr-7b-sft-full self-plays on a 50k-prompt UltraChat-200k
subset, on a TPU v5p-32 slice (16 chips, 4 hosts).

  bash launch/tpu_pod.sh --name spin7b --zone us-east5-a --accelerator-type v5p-32 \\
      --config configs/spin_zephyr7b_v5p.py --workdir gs://BUCKET/spin_zephyr7b

which runs, on every host of the slice,

  python -m spjax.train --config configs/spin_zephyr7b_v5p.py --workdir WORKDIR

The paper's schedule (peak lr 5e-7 in iterations 0-1, 1e-7 in 2-3, beta 5.0 in iteration 3) is three
runs on one workdir, each resuming where the last stopped:

  python -m spjax.train --config configs/spin_zephyr7b_v5p.py --workdir W run.rounds=2
  python -m spjax.train --config configs/spin_zephyr7b_v5p.py:iter2 --workdir W --resume
  python -m spjax.train --config configs/spin_zephyr7b_v5p.py:iter3 --workdir W --resume

Without a stage it runs all four iterations at SPIN's public config.yaml settings (5e-7, beta 0.1).
Paths are local (weights: a HF directory; data: see docs/scale_out.md for making the 50k subset);
override them with `model_path=... data.path=... data.eval_path=...`.
Check memory first: python -m spjax.compile_check --config configs/spin_zephyr7b_v5p.py
"""
from typing import Optional

from spjax.config import Config, DataConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, RunConfig, \
    SamplingConfig

DEVICES = 16  # JAX devices of a v5p-32 slice: 16 chips (a v5p name counts TensorCores, two per chip)
TOPOLOGY = "v5p-32"  # what spjax.compile_check compiles for by default

# zephyr-7b-sft-full's config.json (Mistral-7B-v0.1's shape). The run reads the real file from
# model_path; this copy lets compile_check work where the weights are not.
ZEPHYR_7B = ModelConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096, max_position_embeddings=32768,
    architecture="mistral", bos_token_id=1, eos_token_ids=(2,))

# (rounds, peak lr, beta) of each stage; rounds counts iterations from 0, so iter2 stops after round 2.
STAGES = {None: (4, 5e-7, 0.1), "iter2": (3, 1e-7, 0.1), "iter3": (4, 1e-7, 5.0)}


def get_config(stage: Optional[str] = None) -> Config:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {[s for s in STAGES if s]} (or none)")
    rounds, lr, beta = STAGES[stage]
    return Config(
        model_path="/data/models/zephyr-7b-sft-full",  # HF directory (config.json, safetensors, tokenizer)
        model=ZEPHYR_7B,
        param_dtype="float32",  # fp32 master params and optimizer state
        compute_dtype="bfloat16",  # matmuls and activations (SPIN trained in bf16)
        remat="full",  # recompute each layer in the backward pass (SPIN: gradient checkpointing)
        mesh=MeshConfig(data=1, fsdp=16, tensor=1),  # FSDP over all 16 chips: ~1.4 GiB of params per chip
        data=DataConfig(
            # SPIN's format: the first user turn and the first assistant reply of 50k random
            # UltraChat-200k train_sft dialogues; held out: its test_sft split, same conversion.
            path="/data/ultrachat_200k/spin_train_50k.jsonl",
            eval_path="/data/ultrachat_200k/spin_test.jsonl",
            format="prompt_response",
            max_prompt_len=512,  # SPIN's max_prompt_length (tokens; longer prompts keep their end)
            max_len=1024,  # SPIN's max_length for prompt + response
            buckets=(256, 512, 768, 1024),  # static padded lengths: four compiled step shapes
            max_examples=50_000),
        # SPIN samples at temperature 1 with no truncation, up to 256 new tokens. 512 prompts decode
        # together (32 per chip); the samples do not depend on the batch (per-example keys).
        sampling=SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=256, batch_size=512),
        objective=ObjectiveConfig(name="spin", beta=beta),
        # PyTorch RMSprop as HF Trainer builds it for SPIN (alpha 0.99, eps 1e-8, no momentum, no weight
        # decay); linear decay after a 10% linear warmup, gradients clipped at global norm 1 (HF default).
        optim=OptimConfig(name="rmsprop", lr=lr, warmup_frac=0.1, schedule="linear", weight_decay=0.0,
                          b2=0.99, eps=1e-8, clip_norm=1.0, grad_accum=1),
        run=RunConfig(
            rounds=rounds,  # SPIN iterations 0..3
            epochs=2,  # passes over each round's pairs (the released iter0/iter1 models: 2 epochs)
            batch_size=64,  # pairs per optimizer step, global (SPIN: 8 per GPU x 8 GPUs)
            mix_previous=True,  # SPIN trains iteration t on D_{t-1} and D_t
            seed=42,  # SPIN's seed
            checkpoint_every=200,  # optimizer steps between mid-round checkpoints (a round: 1.6k steps, 3.1k mixed)
            keep_checkpoints=2,
            log_every=10,
            eval_examples=512,  # held-out prompts scored and greedily answered after each round
            eval_show=3,
            eval_max_new_tokens=256,
            score_batch_size=128),  # sequences per reference-scoring batch (8 per chip)
    )
