"""Host memory of an export: params gathered and tensors written a piece at a time, against the whole model first.

  python bench/export_memory.py --shape smollm2-135m [--lora 16] [--dtype bfloat16] [--shard-mib 64]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/export_memory.py --fsdp 8 [--untie] ...

A random-init model (optionally with rank-r adapters, merged on export) is exported three times in this
process, with the Python allocations traced (numpy's included): 'streamed' is spjax.save_pretrained,
which gathers the params a layer at a time as it makes the (name, tensor) pairs and writes each shard
when it is full; 'gathered first' gathers the whole params tree to the host before the first write (the
export before 2026-12-04's second session); 'all first' also makes every tensor before writing (the
export before the session ahead of it: one dict of the whole model). The params live on the devices;
with one CPU device, reading them to numpy is free (not traced), so the gathered copy shows only where
they are split over devices (--fsdp N: as on a GPU host, where every gathered byte is a copy). Prints
one JSON line (also $OUT/export_memory.json).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import SHAPES, emit, model_config, traced  # noqa: E402
from spjax import hf, sharding  # noqa: E402
from spjax.config import LoraConfig, MeshConfig  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--lora", type=int, default=0, help="adapter rank (0: none)")
    ap.add_argument("--dtype", default=None, help="export dtype (default: the params')")
    ap.add_argument("--shard-mib", type=int, default=64)
    ap.add_argument("--fsdp", type=int, default=1, help="params split over this many devices")
    ap.add_argument("--untie", action="store_true", help="a head of its own (Llama 3 8B's layout), not the embedding")
    a = ap.parse_args(argv)
    cfg = model_config(a.shape, lora=LoraConfig(rank=a.lora) if a.lora else LoraConfig(),
                       **({"tie_embeddings": False} if a.untie else {}))
    if len(jax.devices()) < a.fsdp:
        ap.error(f"--fsdp {a.fsdp}: {len(jax.devices())} devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count)")
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=a.fsdp), devices=jax.devices()[:a.fsdp])
    params = jax.block_until_ready(sharding.init_params(cfg, jax.random.key(0), mesh))
    model_bytes = hf.tensors_bytes(cfg, a.dtype)
    out = tempfile.mkdtemp()
    export = lambda name: traced(lambda: hf.save_pretrained(  # noqa: E731
        cfg, params, os.path.join(out, name), dtype=a.dtype, max_shard_bytes=a.shard_mib << 20))
    pieces, tensors = hf.host_pieces, hf.params_to_tensors
    try:
        streamed = export("a")
        hf.host_pieces = lambda params: iter(list(pieces(params)))  # the whole tree gathered before the first write
        gathered_first = export("b")
        hf.params_to_tensors = lambda *args: iter(list(tensors(*args)))  # and every tensor made before it
        all_first = export("c")
    finally:
        hf.host_pieces, hf.params_to_tensors = pieces, tensors
        shutil.rmtree(out, ignore_errors=True)
    mib = lambda run: round(run[0] / 2**20, 1)  # noqa: E731
    emit(dict(bench="export_memory", shape=a.shape, untied=a.untie, lora=a.lora, dtype=a.dtype or cfg.param_dtype, fsdp=a.fsdp,
              shard_mib=a.shard_mib, model_mib=round(model_bytes / 2**20, 1), streamed_peak_mib=mib(streamed),
              gathered_first_peak_mib=mib(gathered_first), all_first_peak_mib=mib(all_first),
              peak_ratio_vs_gathered=round(streamed[0] / gathered_first[0], 3),
              peak_ratio_vs_all=round(streamed[0] / all_first[0], 3), streamed_s=round(streamed[1], 2),
              gathered_first_s=round(gathered_first[1], 2), all_first_s=round(all_first[1], 2)),
         "export_memory.json")


if __name__ == "__main__":
    main()
