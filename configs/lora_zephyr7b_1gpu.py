"""SPIN's zephyr-7b self-play with LoRA (r = 16 on q, k, v, o, gate, up, down) over a frozen base:
one 80 GB GPU, or a TPU v5e-8 slice. The variant names the base's storage and the target:

  python -m spjax.compile_check --config configs/lora_zephyr7b_1gpu.py               # bf16 base, one H100
  python -m spjax.compile_check --config configs/lora_zephyr7b_1gpu.py:int8          # int8 base, one H100
  python -m spjax.compile_check --config configs/lora_zephyr7b_1gpu.py:v5e8 --topology v5e-8
  python -m spjax.compile_check --config configs/lora_zephyr7b_1gpu.py:v5e8-int8 --topology v5e-8
  bash launch/gpu_single_host.sh --cuda --config configs/lora_zephyr7b_1gpu.py --workdir runs/lora7b

Everything else is configs/spin_zephyr7b_v5p.py's run (data, 64 pairs a step, SPIN's objective and
RMSprop), with a LoRA-sized learning rate. The optimizer holds the adapters only (~42M params); the
base is read, never written, and exported merged (plus the adapter alone in PEFT's layout).
"""
import dataclasses
import os
from typing import Optional

from spjax.config import Config, LoraConfig, MeshConfig, load_config

DEVICES = 1
TOPOLOGY = "h100"  # what spjax.compile_check compiles for by default; the v5e8 variants want --topology v5e-8

_V5P = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spin_zephyr7b_v5p.py")
VARIANTS = {None: ("none", 1), "int8": ("int8", 1), "v5e8": ("none", 8), "v5e8-int8": ("int8", 8)}


def get_config(variant: Optional[str] = None) -> Config:
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {[v for v in VARIANTS if v]} (or none)")
    quant, chips = VARIANTS[variant]
    cfg = load_config(_V5P)
    return dataclasses.replace(
        cfg,
        param_dtype="bfloat16",  # the frozen base (int8 when quantized); adapters train in fp32 regardless
        compute_dtype="bfloat16",
        remat="full",
        lora=LoraConfig(rank=16, alpha=16.0),
        base_quant=quant,
        mesh=MeshConfig(data=1, fsdp=chips, tensor=1),
        # 64 prompts decode together on the GPU (8 per v5e chip); scoring 16 sequences a batch.
        sampling=dataclasses.replace(cfg.sampling, batch_size=64),
        run=dataclasses.replace(cfg.run, score_batch_size=16),
        # 64 pairs a step as micro-batches of 4 pairs on the GPU (8 sequences at a time, as per v5p
        # chip) and of 8 pairs on v5e-8 (one pair, two sequences, per 16 GB chip).
        optim=dataclasses.replace(cfg.optim, lr=5e-5, grad_accum=16 if chips == 1 else 8),
    )
