"""LoRA sampling: merge the adapter into the base once per round, or apply it on the fly each step?

  python bench/lora_sample.py --shape smollm2-135m --batch 8 --prompt-len 64 --new-tokens 64

Times spjax.sample (temperature 1, no EOS, compile excluded: each variant runs once untimed) on a
random-init model with rank-16 adapters on every projection (random B, so the adapter counts), for
each base storage: 'on the fly' samples from the policy's params as they are (projection.project adds
(x A) B per projection per step, and dequantizes an int8/int4 base per step); 'merged' first runs
lora.merge (W + (alpha / r) A B, dequantized, in the compute dtype; its time is reported and
counted once per round) and samples from the plain model. Prints one JSON line
(also $OUT/lora_sample.json).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import SHAPES, emit, model_config  # noqa: E402
from spjax import lora, model, sampler  # noqa: E402
from spjax.config import LoraConfig  # noqa: E402


def _timed_sample(cfg, params, prompts, a):
    kw = dict(key=0, max_new_tokens=a.new_tokens, temperature=1.0, batch_size=a.batch)
    sampler.sample(cfg, params, prompts, **kw)  # compile
    t = time.perf_counter()
    out = sampler.sample(cfg, params, prompts, **kw)
    return time.perf_counter() - t, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quants", default="none,int8", help="base storages to measure (none, int8, int4)")
    ap.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = {}
    for quant in a.quants.split(","):
        cfg = model_config(a.shape, compute_dtype=a.compute_dtype, lora=LoraConfig(rank=16, alpha=16.0),
                           base_quant=quant)
        params = model.init_params(cfg, jax.random.key(0))
        layers = {k: (rng.normal(0, 0.02, v.shape).astype(np.float32) if k.endswith("_lora_b") else v)
                  for k, v in params["layers"].items()}
        params = {**params, "layers": jax.device_put(layers)}
        prompts = [list(rng.integers(3, cfg.vocab_size, a.prompt_len)) for _ in range(a.batch)]
        fly_s, fly = _timed_sample(cfg, params, prompts, a)
        merge = jax.jit(lambda p, cfg=cfg: lora.merge(cfg, p)[1])
        jax.block_until_ready(merge(params))  # compile
        t = time.perf_counter()
        merged = jax.block_until_ready(merge(params))
        merge_s = time.perf_counter() - t
        merged_s, out = _timed_sample(lora.merge(cfg, params)[0], merged, prompts, a)
        new = a.batch * a.new_tokens
        same = float(np.mean([x == y for x, y in zip(fly.tokens, out.tokens)]))
        rows[quant] = {"on_the_fly_tok_s": new / fly_s, "merged_tok_s": new / merged_s,
                       "merged_incl_merge_tok_s": new / (merged_s + merge_s), "merge_s": merge_s,
                       "merged_over_on_the_fly": fly_s / merged_s, "same_samples": same}
        print(f"base {quant}: on the fly {new / fly_s:.1f} new tok/s; merged {new / merged_s:.1f} "
              f"({new / (merged_s + merge_s):.1f} counting the {merge_s * 1e3:.0f} ms merge); "
              f"speed-up {fly_s / merged_s:.2f}x; identical samples {same:.0%}", flush=True)
    emit({"bench": "lora_sample", "shape": a.shape, "device": str(jax.devices()[0].device_kind),
          "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, **rows}, "lora_sample.json")


if __name__ == "__main__":
    main()
