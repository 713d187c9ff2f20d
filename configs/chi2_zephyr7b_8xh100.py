"""The chi2 self-play objective on configs/spin_zephyr7b_8xh100.py's run (zephyr-7b-sft-full, 50k
UltraChat prompts, one host with 8 H100s): only the objective differs.

  bash launch/gpu_single_host.sh --cuda --config configs/chi2_zephyr7b_8xh100.py --workdir runs/chi2_zephyr7b

Check memory first: python -m spjax.compile_check --config configs/chi2_zephyr7b_8xh100.py
"""
import dataclasses
import os
from typing import Optional

from spjax.config import Config, ObjectiveConfig, load_config

DEVICES = 8
TOPOLOGY = "8xh100"

_SPIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spin_zephyr7b_8xh100.py")


def get_config(stage: Optional[str] = None) -> Config:
    spin = load_config(f"{_SPIN}:{stage}" if stage else _SPIN)
    # as in chi2_zephyr7b_v5p.py: SPIN's beta, c = 1 (rewards bounded to [-1, 1])
    return dataclasses.replace(spin, objective=ObjectiveConfig(name="chi2", beta=0.1, c=1.0))
