"""Decoding on an fsdp mesh: weights gathered once per batch against the training layout, in one run.

On an fsdp mesh the params are split along the model width; decoding from that layout moves
weights (or activations) between devices on every step. `sampling.weights` (spjax.sampler.
gather_weights) instead gathers them once per batch into a copy each device keeps. This bench times
`spjax.sample` both ways on one mesh (every device of the host as fsdp), counts the collectives that
move arrays inside the compiled program's loops (run on every decode step; the early-exit check's
scalar is left out) and checks both give the same samples.

  python bench/fsdp_decode.py --shape tiny                    # CPU: 8 fake devices (set here)
  python bench/fsdp_decode.py --shape smollm2-135m --batch 32 --new-tokens 64
  python bench/fsdp_decode.py --shape llama3.2-1b --dtype bfloat16 --batch 64 --new-tokens 256   # a GPU host

Prints a line per layout, the ratio, and one JSON line (also $OUT/fsdp_decode_bench.json when OUT is set).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spjax.train import cpu_devices_flags  # noqa: E402 (imports no jax backend yet)

# Without accelerators, 8 CPU devices stand in (the flag only shapes the host platform: a GPU host uses its GPUs).
os.environ["XLA_FLAGS"] = cpu_devices_flags(
    (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())

import jax  # noqa: E402
import numpy as np  # noqa: E402

from spjax import compile_check, sampler, sharding as shd  # noqa: E402
from spjax.config import MeshConfig  # noqa: E402
from bench.common import SHAPES, best_time, emit, model_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=16, help="prompts per batch (a multiple of the device count)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up; the best counts")
    a = ap.parse_args()
    n = jax.device_count()
    cfg = model_config(a.shape, compute_dtype=a.dtype)
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=n))
    params = shd.init_params(cfg, jax.random.key(0), mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, a.prompt_len).tolist() for _ in range(a.batch)]
    P = sampler.default_bucket(a.prompt_len)
    out = dict(bench="fsdp_decode", shape=a.shape, devices=n, device_kind=jax.devices()[0].device_kind,
               batch=a.batch, prompt_len=a.prompt_len, new_tokens=a.new_tokens, dtype=a.dtype)
    print(f"{a.shape} on {n} x {out['device_kind']}, mesh fsdp={n}: {a.batch} x ({a.prompt_len} + {a.new_tokens}) "
          f"tokens, {a.dtype}")
    tokens = {}
    for weights in ("sharded", "gathered"):
        plan = sampler.make_plan(prompt_len=P, max_new_tokens=a.new_tokens, batch_size=a.batch, mesh=mesh,
                                 gather_weights=weights == "gathered")
        found = compile_check.moving_arrays(
            compile_check.loop_collectives(sampler.lower(cfg, plan, params).compile().as_text()))
        run = lambda: sampler.sample(cfg, params, prompts, key=0, max_new_tokens=a.new_tokens, mesh=mesh,
                                     weights=weights)
        tokens[weights] = run().tokens  # compile + warm-up
        s = best_time(lambda: run().lengths, a.repeats)
        kinds = sorted({k for k, _ in found})
        out[weights] = dict(s=s, new_tokens_per_s=a.batch * a.new_tokens / s, loop_collectives=len(found), kinds=kinds)
        print(f"  {weights:8s} {out[weights]['new_tokens_per_s']:10,.0f} new tok/s   {len(found)} collectives "
              f"moving arrays in the loops {kinds}")
    out["same_samples"] = tokens["sharded"] == tokens["gathered"]
    out["gathered_vs_sharded"] = out["gathered"]["new_tokens_per_s"] / out["sharded"]["new_tokens_per_s"]
    print(f"  gathered / sharded: {out['gathered_vs_sharded']:.2f}x; same samples: {out['same_samples']}")
    emit(out, "fsdp_decode_bench.json")


if __name__ == "__main__":
    main()
