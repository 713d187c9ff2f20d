"""Host memory and time of a checkpoint import (spjax.load_pretrained) of a random-init model saved as safetensors.

  python bench/load_memory.py --shape llama3.2-1b [--dtype bfloat16] [--file-dtype bfloat16] [--quant int8]

The model is saved in --file-dtype (default --dtype), then loaded twice with the Python allocations traced (numpy's included); the
second load's figures are printed (the file pages then cached, as on a host that read them before). With
--quant the projections are quantized as read (LoRA r 16 over an int8/int4 base). The params live on the one
CPU device. For a before/after figure run this file from a checkout of each commit in one session (it
imports the spjax beside it). Prints one JSON line (also $OUT/load_memory.json), with the largest stacked
leaf's and the whole model's sizes for scale.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import SHAPES, emit, model_config, traced  # noqa: E402
from spjax import hf, model  # noqa: E402
from spjax.config import LoraConfig  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", help="the params' dtype")
    ap.add_argument("--file-dtype", default=None, help="the checkpoint's dtype (default: --dtype)")
    ap.add_argument("--quant", default="none", choices=("none", "int8", "int4"))
    a = ap.parse_args(argv)
    cfg = model_config(a.shape, param_dtype=a.dtype)
    out = tempfile.mkdtemp()
    try:
        hf.save_pretrained(cfg, model.init_params(cfg, jax.random.key(0)), out, dtype=a.file_dtype or a.dtype)
        lora = dict(lora=LoraConfig(rank=16), base_quant=a.quant) if a.quant != "none" else {}
        load = lambda: hf.load_pretrained(out, param_dtype=a.dtype, **lora)[1]  # noqa: E731
        traced(load)
        peak, seconds = traced(load)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    sizes = [int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(model.param_shapes(cfg))]
    mib = lambda b: round(b / 2**20, 1)  # noqa: E731
    emit(dict(bench="load_memory", shape=a.shape, dtype=a.dtype, file_dtype=a.file_dtype or a.dtype, quant=a.quant, model_mib=mib(sum(sizes)),
              largest_leaf_mib=mib(max(sizes)), peak_mib=mib(peak), seconds=round(seconds, 2)), "load_memory.json")


if __name__ == "__main__":
    main()
