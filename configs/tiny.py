"""A random tiny model on generated data: a full 2-round self-play run in well under a minute on CPU.

  python -m spjax.train --config configs/tiny.py --workdir runs/tiny

Tests run it (and kill it) to check that resumed runs equal uninterrupted ones; log_every is not a
multiple of checkpoint_every, so a resume must find the metric lines up to its checkpoint logged.
"""
from spjax.config import (Config, DataConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig, RunConfig,
                          SamplingConfig)


def get_config() -> Config:
    return Config(
        tokenizer_path="bytes",  # spjax's built-in byte-level ChatML tokenizer (259 ids)
        model=ModelConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0),
        mesh=MeshConfig(data=-1),
        data=DataConfig(path="synthetic", max_prompt_len=48, max_len=96, buckets=(96,), max_examples=64),
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=24, batch_size=32),
        objective=ObjectiveConfig(name="chi2", beta=0.1, c=1.0),
        optim=OptimConfig(name="adamw", lr=1e-3, warmup_frac=0.1, clip_norm=1.0),
        run=RunConfig(rounds=2, epochs=1, batch_size=16, checkpoint_every=2, log_every=3, eval_examples=16,
                      eval_show=2, eval_max_new_tokens=16, score_batch_size=32, async_checkpoint=False),
    )
