"""Two self-play rounds of a random Llama-3.2-1B-shape model on generated data: the round's time split.

  python -m spjax.train --config configs/bench_1b_round.py --workdir /tmp/round_1b   # on one GPU

Its metrics line for the round carries sample_s / score_s / train_s (DESIGN.md §4: the round
wall-clock split); round 1 includes compilation, round 2 is the steady state. 128 synthetic
prompts, 256 sampled tokens each at batch 64, 16 pair steps of 8 pairs per round; bf16 compute over
fp32 params, dots remat. No export (a 5 GB write says nothing about the round). The byte tokenizer only uses ids < 259 of the 128k vocabulary: the cost is the same.
"""
from spjax.config import (Config, DataConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, RunConfig,
                          SamplingConfig)

DEVICES = 1  # one GPU


def get_config() -> Config:
    return Config(
        tokenizer_path="bytes",
        model=ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                          num_kv_heads=8, tie_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                          max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0),
        compute_dtype="bfloat16",
        remat="dots",
        mesh=MeshConfig(data=-1),
        data=DataConfig(path="synthetic", max_prompt_len=256, max_len=512, buckets=(512,), max_examples=128),
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=256, batch_size=64),
        objective=ObjectiveConfig(name="chi2", beta=0.5, c=1.0),
        optim=OptimConfig(name="adamw", lr=1e-6, warmup_frac=0.0),
        run=RunConfig(rounds=2, epochs=1, batch_size=8, checkpoint_every=1000, log_every=8, eval_examples=16,
                      eval_show=0, eval_max_new_tokens=32, score_batch_size=32, async_checkpoint=True,
                      export=False),
    )
