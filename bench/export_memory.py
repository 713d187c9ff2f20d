"""Host memory of an export: tensors written a shard at a time, against all of them made first.

  python bench/export_memory.py --shape smollm2-135m [--lora 16] [--dtype bfloat16] [--shard-mib 64]

A random-init model (optionally with rank-r adapters, merged on export) is exported twice in this
process, with the Python allocations traced (numpy's included): 'streamed' is spjax.save_pretrained,
which takes the (name, tensor) pairs as they are made and writes each shard when it is full; 'all
first' makes every tensor before writing (what the export did before, one dict of the whole model).
The params themselves live on the device (for the CPU backend: memory XLA holds, not traced), so both
figures are what the export adds. Prints one JSON line (also $OUT/export_memory.json).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import tracemalloc

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import SHAPES, emit, model_config  # noqa: E402
from spjax import hf, sharding  # noqa: E402
from spjax.config import LoraConfig, MeshConfig  # noqa: E402


def _traced(fn):
    """(peak traced bytes, seconds) of one call."""
    tracemalloc.start()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--lora", type=int, default=0, help="adapter rank (0: none)")
    ap.add_argument("--dtype", default=None, help="export dtype (default: the params')")
    ap.add_argument("--shard-mib", type=int, default=64)
    a = ap.parse_args(argv)
    cfg = model_config(a.shape, lora=LoraConfig(rank=a.lora) if a.lora else LoraConfig())
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    params = jax.block_until_ready(sharding.init_params(cfg, jax.random.key(0), mesh))
    model_bytes = hf.tensors_bytes(cfg, a.dtype)
    out = tempfile.mkdtemp()
    try:
        streamed = _traced(lambda: hf.save_pretrained(cfg, params, os.path.join(out, "a"), dtype=a.dtype,
                                                      max_shard_bytes=a.shard_mib << 20))
        real = hf.params_to_tensors
        hf.params_to_tensors = lambda *args: list(real(*args))  # the whole model made before the first write
        try:
            all_first = _traced(lambda: hf.save_pretrained(cfg, params, os.path.join(out, "b"), dtype=a.dtype,
                                                           max_shard_bytes=a.shard_mib << 20))
        finally:
            hf.params_to_tensors = real
    finally:
        shutil.rmtree(out, ignore_errors=True)
    emit(dict(bench="export_memory", shape=a.shape, lora=a.lora, dtype=a.dtype or cfg.param_dtype,
              shard_mib=a.shard_mib, model_mib=round(model_bytes / 2**20, 1),
              streamed_peak_mib=round(streamed[0] / 2**20, 1), all_first_peak_mib=round(all_first[0] / 2**20, 1),
              peak_ratio=round(streamed[0] / all_first[0], 3), streamed_s=round(streamed[1], 2),
              all_first_s=round(all_first[1], 2)), "export_memory.json")


if __name__ == "__main__":
    main()
