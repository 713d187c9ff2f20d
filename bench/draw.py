"""The sampler's categorical draw: the two-stage draw (spjax.drawing._categorical) against
one Gumbel number per vocabulary entry (vmap(jax.random.categorical)), in the same run.

Both draw one token per row from softmax(logits) [B, V] with a per-row key, as every decode step
does at temperature > 0; the two-stage draw takes V/256 + 256 random numbers a row instead of V.
Times are the best of --repeats jitted calls after a warm-up, on the default device.

  python bench/draw.py                                  # SmolLM2's and Llama-3's vocabularies, 64 rows
  python bench/draw.py --rows 256 --vocab 151936        # Qwen2's vocabulary, 4 samples x 64 prompts

Prints one line per shape and one JSON line (also $OUT/draw_bench.json when OUT is set).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spjax import sampler  # noqa: E402
from bench.common import best_time, emit  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", default="49152,128256", help="comma list of vocabulary sizes")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    dev = jax.devices()[0]
    out = {"bench": "draw", "device": dev.device_kind, "platform": dev.platform, "rows": a.rows, "shapes": {}}
    two_stage = jax.jit(sampler._categorical)
    per_entry = jax.jit(jax.vmap(jax.random.categorical))
    for V in (int(v) for v in a.vocab.split(",")):
        logits_BxV = jax.random.normal(jax.random.key(1), (a.rows, V)) * 3
        keys_B = jax.random.split(jax.random.key(0), a.rows)
        r = {}
        for name, fn in (("per_entry_ms", per_entry), ("two_stage_ms", two_stage)):
            call = lambda: fn(keys_B, logits_BxV)
            jax.block_until_ready(call())  # compile
            r[name] = 1e3 * best_time(call, a.repeats)
        r["speedup"] = r["per_entry_ms"] / r["two_stage_ms"]
        out["shapes"][f"{a.rows}x{V}"] = r
        print(f"{a.rows} rows x {V} vocab on {dev.device_kind}: one Gumbel per entry {r['per_entry_ms']:.3f} ms, "
              f"two-stage {r['two_stage_ms']:.3f} ms ({r['speedup']:.1f}x)")
    emit(out, "draw_bench.json")


if __name__ == "__main__":
    main()
