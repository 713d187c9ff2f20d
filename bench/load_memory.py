"""Host memory and time of a checkpoint import (spjax.load_pretrained) of a random-init model saved as safetensors.

  python bench/load_memory.py --shape llama3.2-1b [--dtype bfloat16] [--file-dtype bfloat16] [--quant int8] [--hosts 2]

The model is saved in --file-dtype (default --dtype), then loaded twice with the Python allocations traced (numpy's included); the
second load's figures are printed (the file pages then cached, as on a host that read them before). With
--quant the projections are quantized as read (LoRA r 16 over an int8/int4 base). The params live on the one
CPU device; with --hosts N, on N local processes (jax.distributed, 4 CPU devices each) over one fsdp mesh,
each process's figures in "hosts" (what one host of a pod holds while its part of the model is placed).
For a before/after figure run this file from a checkout of each commit in one session (it imports the spjax
beside it). Prints one JSON line (also $OUT/load_memory.json), with the largest stacked leaf's and the whole
model's sizes for scale.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import SHAPES, emit, model_config, traced  # noqa: E402
from spjax import hf, model, sharding as shd  # noqa: E402
from spjax.config import LoraConfig, MeshConfig  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", help="the params' dtype")
    ap.add_argument("--file-dtype", default=None, help="the checkpoint's dtype (default: --dtype)")
    ap.add_argument("--quant", default="none", choices=("none", "int8", "int4"))
    ap.add_argument("--hosts", type=int, default=1, help="processes loading it together over one fsdp mesh")
    ap.add_argument("--load", default=None, help=argparse.SUPPRESS)  # (a --hosts process: the checkpoint's dir)
    a = ap.parse_args(argv)
    lora = dict(lora=LoraConfig(rank=16), base_quant=a.quant) if a.quant != "none" else {}
    if a.load:  # one of --hosts' processes: its own figures, one JSON line
        shd.init_distributed()
        mesh = shd.make_mesh(MeshConfig(data=1, fsdp=-1))
        load = lambda: hf.load_pretrained(a.load, mesh=mesh, param_dtype=a.dtype, **lora)[1]  # noqa: E731
        traced(load)
        peak, seconds = traced(load)
        print(json.dumps(dict(process=jax.process_index(), peak_mib=mib(peak), seconds=round(seconds, 2))))
        return
    cfg = model_config(a.shape, param_dtype=a.dtype)
    out = tempfile.mkdtemp()
    try:
        hf.save_pretrained(cfg, model.init_params(cfg, jax.random.key(0)), out, dtype=a.file_dtype or a.dtype)
        if a.hosts > 1:
            hosts = _hosts(a, out)
            peak, seconds = max(h["peak_mib"] for h in hosts), max(h["seconds"] for h in hosts)
        else:
            load = lambda: hf.load_pretrained(out, param_dtype=a.dtype, **lora)[1]  # noqa: E731
            traced(load)
            peak, seconds = traced(load)
            peak, hosts = mib(peak), None
    finally:
        shutil.rmtree(out, ignore_errors=True)
    sizes = [int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(model.param_shapes(cfg))]
    emit(dict(bench="load_memory", shape=a.shape, dtype=a.dtype, file_dtype=a.file_dtype or a.dtype, quant=a.quant,
              model_mib=mib(sum(sizes)), largest_leaf_mib=mib(max(sizes)), peak_mib=peak, seconds=round(seconds, 2),
              **({"hosts": hosts} if hosts else {})), "load_memory.json")


def mib(b):
    return round(b / 2**20, 1)


def _hosts(a, path) -> list:
    """--hosts' processes loading `path` together: each one's JSON line."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, os.path.abspath(__file__), "--load", path, "--dtype", a.dtype, "--quant", a.quant]
    env = lambda i: dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",  # noqa: E731
                         SPJAX_COORDINATOR=f"localhost:{port}", SPJAX_NUM_PROCESSES=str(a.hosts),
                         SPJAX_PROCESS_ID=str(i))
    procs = [subprocess.Popen(cmd, env=env(i), stdout=subprocess.PIPE, text=True) for i in range(a.hosts)]
    try:
        outs = [p.communicate(timeout=3600)[0] for p in procs]
    finally:  # one failing leaves the others waiting in a collective
        for p in procs:
            p.kill()
    if any(p.returncode for p in procs):
        sys.exit(f"load_memory: a --hosts process failed (exit codes {[p.returncode for p in procs]})")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


if __name__ == "__main__":
    main()
