"""SPIN reproduction (Chen et al. 2024) on one host with 8 H100s (80 GB): configs/spin_zephyr7b_v5p.py's
run with the mesh and batch shapes of 8 GPUs.

  bash launch/gpu_single_host.sh --cuda --config configs/spin_zephyr7b_8xh100.py --workdir runs/spin_zephyr7b

The paper's per-iteration schedule, as in the v5p config:

  bash launch/gpu_single_host.sh --config configs/spin_zephyr7b_8xh100.py --workdir W -- run.rounds=2
  bash launch/gpu_single_host.sh --skip-setup --resume --config configs/spin_zephyr7b_8xh100.py:iter2 --workdir W
  bash launch/gpu_single_host.sh --skip-setup --resume --config configs/spin_zephyr7b_8xh100.py:iter3 --workdir W

Several such hosts: launch/slurm_multinode.sbatch with mesh.fsdp = 8 x nodes.
Check memory first: python -m spjax.compile_check --config configs/spin_zephyr7b_8xh100.py
"""
import dataclasses
import os
from typing import Optional

from spjax.config import Config, MeshConfig, load_config

DEVICES = 8  # one host, 8 GPUs
TOPOLOGY = "8xh100"  # what spjax.compile_check compiles for by default

_V5P = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spin_zephyr7b_v5p.py")


def get_config(stage: Optional[str] = None) -> Config:
    cfg = load_config(f"{_V5P}:{stage}" if stage else _V5P)
    return dataclasses.replace(
        cfg,
        mesh=MeshConfig(data=1, fsdp=8, tensor=1),  # FSDP over the 8 GPUs (NVLink): ~3.4 GiB of params each
        # 256 prompts decode together (32 per GPU, as on v5p); reference scoring 64 sequences a batch.
        sampling=dataclasses.replace(cfg.sampling, batch_size=256),
        run=dataclasses.replace(cfg.run, score_batch_size=64),
        # Two micro-batches of 32 pairs: 8 sequences per GPU at a time, as on a v5p chip; one batch of 64
        # needs ~70 GiB per GPU by compile_check's CPU estimate, too close to the 76 GiB XLA may use.
        optim=dataclasses.replace(cfg.optim, grad_accum=2),
    )
