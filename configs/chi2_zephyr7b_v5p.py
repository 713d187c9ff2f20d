"""The chi2 self-play objective on configs/spin_zephyr7b_v5p.py's run (zephyr-7b-sft-full, 50k UltraChat
prompts, TPU v5p-32): only the objective differs, so the two runs compare objectives one to one.

  bash launch/tpu_pod.sh --name chi2-7b --zone us-east5-a --accelerator-type v5p-32 \\
      --config configs/chi2_zephyr7b_v5p.py --workdir gs://BUCKET/chi2_zephyr7b

which runs `python -m spjax.train --config configs/chi2_zephyr7b_v5p.py --workdir WORKDIR` on every
host. The stages of the SPIN config (`:iter2`, `:iter3`) apply its learning rates; beta and c stay.
Check memory first: python -m spjax.compile_check --config configs/chi2_zephyr7b_v5p.py
"""
import dataclasses
import os
from typing import Optional

from spjax.config import Config, ObjectiveConfig, load_config

DEVICES = 16  # v5p-32: 16 chips
TOPOLOGY = "v5p-32"

_SPIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spin_zephyr7b_v5p.py")


def get_config(stage: Optional[str] = None) -> Config:
    spin = load_config(f"{_SPIN}:{stage}" if stage else _SPIN)
    # beta as SPIN's; c = 1 bounds the optimal reward to [-1, 1], so a round moves a sequence
    # log-ratio by at most about 1/(beta c) = 10 nats. SPIN's iteration-3 beta of 5 is not carried over.
    return dataclasses.replace(spin, objective=ObjectiveConfig(name="chi2", beta=0.1, c=1.0))
