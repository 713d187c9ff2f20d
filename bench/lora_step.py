"""Pair train step, LoRA vs full fine-tuning: tokens/s, XLA's per-program memory and the process's peak.

  python bench/lora_step.py --shape llama3.2-1b                    # full, lora r=16, lora r=16 + int8 base
  python bench/lora_step.py --shape tiny --modes full,lora
  python bench/lora_step.py --shape llama3.2-1b --compile-only   # memory only, where a run would not fit

Each mode runs in its own child process (so max RSS is per mode), on the same random-init model,
batch and AdamW settings as bench/train_step.py: B pairs of P + R tokens, all projections adapted
(rank 16, alpha 16) in the LoRA modes. Memory is reported three ways: the step program's bytes from
XLA's memory_analysis (arguments + outputs - aliased + temporaries, what compile_check calls the
peak), the train state's bytes (params and optimizer state), and the device allocator's high-water
mark where there is one, else the process's max RSS (CPU). Ratios are against `full`, in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import SHAPES, emit, model_config, peak_memory, time_steps  # noqa: E402

MODES = {"full": dict(), "lora": dict(lora_rank=16), "lora-int8": dict(lora_rank=16, base_quant="int8"),
         "lora-int4": dict(lora_rank=16, base_quant="int4")}


def _nbytes(tree) -> int:
    import jax
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))


def run_mode(a, mode: str) -> dict:
    import jax
    import numpy as np

    from spjax import lora, sharding, step
    from spjax.config import LoraConfig, MeshConfig, ObjectiveConfig, OptimConfig

    m = MODES[mode]
    on_cpu = jax.default_backend() == "cpu"
    compute = a.compute_dtype or ("float32" if on_cpu else "bfloat16")
    cfg = model_config(a.shape, param_dtype=a.param_dtype, compute_dtype=compute, remat=a.remat,
                       lora=LoraConfig(rank=m.get("lora_rank", 0), alpha=16.0),
                       base_quant=m.get("base_quant", "none"))
    B, P, R = a.pairs, a.prompt_len, a.response_len
    L = P + R
    mesh = sharding.make_mesh(MeshConfig())
    opt_cfg = OptimConfig(lr=1e-5, warmup_frac=0.0, schedule="constant", weight_decay=0.01)
    optimizer = step.make_optimizer(opt_cfg, total_steps=1000)
    shapes = step.pair_batch_shapes(B, L)
    fn = step.make_train_step(cfg, ObjectiveConfig(name="spin"), opt_cfg, optimizer, mesh, shapes)
    if a.compile_only:  # memory from the compiler alone: nothing is allocated (as spjax.compile_check)
        abstract = step.abstract_state(cfg, optimizer, mesh)
        batch_sh = step.batch_shardings(mesh, shapes)
        batch = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes, batch_sh)
        mem = fn.lower(abstract, batch).compile().memory_analysis()
        train = lora.split(cfg, abstract.params)[0]
        return {"mode": mode, "params": lora.count(abstract.params), "trainable": lora.count(train),
                "program_gb": (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                               + mem.temp_size_in_bytes) / 1e9,
                "params_gb": _nbytes(abstract.params) / 1e9, "opt_state_gb": _nbytes(abstract.opt_state) / 1e9,
                "error": "compile only (--compile-only): no timed run"}
    params = sharding.init_params(cfg, jax.random.key(0), mesh)
    n_params, n_train = lora.count(params), lora.count(lora.split(cfg, params)[0])
    state = step.init_state(cfg, params, optimizer, mesh)
    del params
    rng = np.random.default_rng(0)
    target = np.zeros((B, L), np.int32)
    target[:, P:] = 1
    fields = dict(real_ids_BxL=rng.integers(0, cfg.vocab_size, (B, L), dtype=np.int32),
                  gen_ids_BxL=rng.integers(0, cfg.vocab_size, (B, L), dtype=np.int32),
                  real_mask_BxL=np.ones((B, L), np.int32), gen_mask_BxL=np.ones((B, L), np.int32),
                  real_target_BxL=target, gen_target_BxL=target,
                  ref_real_B=rng.normal(size=B).astype(np.float32), ref_gen_B=rng.normal(size=B).astype(np.float32),
                  win_real_B=np.ones(B, np.float32), win_gen_B=np.zeros(B, np.float32))
    batch = step.unpacked_batch(**fields)
    batch = jax.device_put(batch, step.batch_shardings(mesh, shapes))
    t = time.perf_counter()
    mem = fn.lower(state, batch).compile().memory_analysis()
    compile_s = time.perf_counter() - t
    program = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    state_bytes = {"params": _nbytes(state.params), "opt_state": _nbytes(state.opt_state)}
    base = {"mode": mode, "params": n_params, "trainable": n_train, "program_gb": program / 1e9,
            "params_gb": state_bytes["params"] / 1e9, "opt_state_gb": state_bytes["opt_state"] / 1e9}
    need = program - sum(state_bytes.values())  # beyond the state, already allocated
    if on_cpu and need > 0.8 * _available_bytes():  # a shared CPU host: do not run it out of memory
        return {**base, "error": f"skipped the timed run: needs ~{need / 1e9:.1f} GB more, "
                                 f"{_available_bytes() / 1e9:.1f} GB available"}
    # compile (cached from the lowering above) and warm up; not timed
    state, metrics, warmup_s, dt = time_steps(fn, state, batch, warmup=2, steps=a.steps)
    warmup_s += compile_s
    peak, kind = peak_memory()
    dev = jax.devices()[0]
    return {"mode": mode, "device": f"{jax.device_count()}x {dev.device_kind}", "compute_dtype": compute,
            "param_dtype": a.param_dtype, "params": n_params, "trainable": n_train, "pairs": B, "seq_len": L,
            "step_s": dt, "tokens_per_s": 2 * B * L / dt, "compile_and_warmup_s": warmup_s,
            "program_gb": program / 1e9, "params_gb": state_bytes["params"] / 1e9,
            "opt_state_gb": state_bytes["opt_state"] / 1e9, "peak_gb": peak / 1e9, "mem_kind": kind}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--modes", default="full,lora,lora-int8", help=f"comma-separated, among {sorted(MODES)}")
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after 2 warm-up steps")
    ap.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--compute-dtype", choices=("float32", "bfloat16"), help="default: fp32 on CPU, else bf16")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    ap.add_argument("--compile-only", action="store_true",
                    help="report XLA's program memory only (no allocation, no timing): shapes too big to run here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(run_mode(a, a.child)), flush=True)
        return
    rows = {}
    base_args = ["--shape", a.shape, "--pairs", str(a.pairs), "--prompt-len", str(a.prompt_len),
                 "--response-len", str(a.response_len), "--steps", str(a.steps), "--param-dtype", a.param_dtype,
                 "--remat", a.remat] + (["--compute-dtype", a.compute_dtype] if a.compute_dtype else []) \
        + (["--compile-only"] if a.compile_only else [])
    for mode in a.modes.split(","):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *base_args, "--child", mode],
                           capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        rows[mode] = json.loads(line[7:]) if line else {"error": f"rc={p.returncode}: {p.stderr[-800:]}"}
        print(f"{mode}: {rows[mode]}", file=sys.stderr, flush=True)
    ok = {k: v for k, v in rows.items() if "error" not in v}
    any_row = next(iter(ok.values()), {"device": "(compile only)", "compute_dtype": a.compute_dtype or "default"})
    print(f"\npair train step, shape {a.shape}: {a.pairs} pairs x {a.prompt_len}+{a.response_len} tokens on "
          f"{any_row.get('device')} ({any_row.get('compute_dtype')} compute, {a.param_dtype} params, remat {a.remat})")
    print(f"{'mode':10s} {'trainable':>13s} {'tokens/s':>9s} {'program GB':>10s} {'params GB':>9s} "
          f"{'opt GB':>7s} {'peak GB':>8s}")
    for mode, r in rows.items():
        if "program_gb" not in r:
            print(f"{mode:10s} error: {r['error'][:300]}")
            continue
        tok = f"{r['tokens_per_s']:9.1f}" if "tokens_per_s" in r else f"{'-':>9s}"
        peak = f"{r['peak_gb']:8.3f}" if "peak_gb" in r else f"{'-':>8s}"
        print(f"{mode:10s} {r['trainable']:13,d} {tok} {r['program_gb']:10.3f} {r['params_gb']:9.3f} "
              f"{r['opt_state_gb']:7.3f} {peak}" + (f"   ({r['error']})" if "error" in r else ""))
    ratios, full = {}, rows.get("full", {})
    for mode, r in rows.items():
        for k in ("tokens_per_s", "program_gb", "peak_gb"):
            if mode != "full" and k in r and k in full:
                ratios[f"{mode}/full {k}"] = r[k] / full[k]
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    emit({"bench": "lora_step", "shape": a.shape, **rows, "ratios": ratios}, "lora_step.json")


if __name__ == "__main__":
    main()
