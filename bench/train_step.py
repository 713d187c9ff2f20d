"""Pair train step: pairs/s, tokens/s, model-FLOPs utilisation and peak memory, next to the PyTorch peer.

The same work as ../shared/peers/torch_pair_bench.py (DESIGN.md §4): policy forward+backward on B
real and B generated sequences of P + R tokens, reference log-probs given, AdamW, random init;
B=2, 16+48 for `tiny`, B=8, 256+768 (16 sequences x 1024) otherwise. One run measures spjax, the
peer eager and the peer with --compile (peers first, before JAX takes the accelerator's memory),
prints a table and one JSON line (also $OUT/train_step.json when OUT is set).

  python bench/train_step.py --shape tiny
  python bench/train_step.py --shape smollm2-135m --pairs 2 --prompt-len 32 --response-len 96 --steps 2
  python bench/train_step.py --shape llama3.2-1b            # on a GPU: bf16 compute, fp32 params
  python bench/train_step.py --shape llama3.2-1b --attention xla   # the einsum attention, for comparison
  python bench/train_step.py --shape llama3.2-1b --no-peer --trace /tmp/trace   # + a profile of one step

MFU counts 6 x params + 6 x layers x width x L FLOPs per token (the peer's convention: every
matmul incl. the LM head, attention counted causally: half of PaLM's non-causal 12 x layers x width x L),
against the peak of a large matmul timed in the same run in the compute dtype (not the datasheet peak). Peak memory is the device allocator's high-water mark where it
keeps one (GPU/TPU), else the process's max RSS (CPU; the peers' RSS is measured the same way).
Attention: spjax.model.attention_impl's pick (cuDNN flash attention on a CUDA GPU with bf16, the
XLA einsum path elsewhere); --attention overrides it (the model config's `attention` field). The
DESIGN.md §4 targets (GPU, llama3.2-1b: >= 1.15x compiled tokens/s, MFU >= 70%, <= 0.5x eager peak
memory; CPU, SmolLM2: >= 1x eager tokens/s) are marked as met or not under the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import SHAPES, emit, model_config, peak_memory, peer_script, time_steps  # noqa: E402

# Runs the peer in this child interpreter and appends its own max RSS: CPU peers report no memory.
_PEER_WRAPPER = ("import atexit, resource, runpy, sys; "
                 "atexit.register(lambda: print('PEER_MAX_RSS_KB', "
                 "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_peer(a, compile_: bool) -> dict:
    """The peer's train figures ({'error': ...} when it cannot run)."""
    path = peer_script()
    if not os.path.exists(path):
        return {"error": f"peer script not found at {path} (set SPJAX_PEERS)"}
    args = [path, "--shape", a.shape, "--skip-generate", "--pairs", str(a.pairs), "--prompt-len", str(a.prompt_len),
            "--response-len", str(a.response_len), "--steps", str(a.steps)] + (["--compile"] if compile_ else [])
    try:
        p = subprocess.run([sys.executable, "-c", _PEER_WRAPPER] + args, capture_output=True, text=True,
                           timeout=a.peer_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.peer_timeout}s"}
    train, rss = None, None
    for line in p.stdout.splitlines():
        if line.startswith('{"train"'):
            train = json.loads(line)["train"]
        elif line.startswith("PEER_MAX_RSS_KB"):
            rss = int(line.split()[1]) * 1024
    if p.returncode or not train:
        return {"error": f"rc={p.returncode}: {(p.stderr or p.stdout)[-600:]}"}
    return {"pairs_per_s": train["pairs"] / train["step_s"], "tokens_per_s": train["tokens_per_s"],
            "step_s": train["step_s"], "model_tflops_per_s": train["model_tflops_per_s"],
            "peak_mem_gb": train["peak_mem_gb"] if train["peak_mem_gb"] is not None else rss / 1e9,
            "mem_kind": "device" if train["peak_mem_gb"] is not None else "process max RSS"}


def matmul_peak_flops(dtype, n: int, reps: int, min_s: float = 1.0) -> float:
    """FLOP/s of an n x n x n matmul on the default device: the best of at least `reps` timed runs
    after warm-up, and of as many as fit in `min_s` (a peak read off three 80 ms CPU runs once came
    out at half the machine's figure: one hiccup there halves every MFU of the report)."""
    import jax
    import jax.numpy as jnp
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype))
    mm(a, b).block_until_ready()
    inner = 10 if jax.default_backend() != "cpu" else 1  # amortise dispatch on fast devices
    best, runs, stop = float("inf"), 0, time.perf_counter() + min_s
    while runs < reps or time.perf_counter() < stop:
        t = time.perf_counter()
        for _ in range(inner):
            out = mm(a, b)
        out.block_until_ready()
        best, runs = min(best, (time.perf_counter() - t) / inner), runs + 1
    return 2 * n ** 3 / best


def run_spjax(a) -> dict:
    import jax
    import numpy as np

    from spjax import sharding, step
    from spjax.config import MeshConfig, ObjectiveConfig, OptimConfig

    from spjax import model

    on_cpu = jax.default_backend() == "cpu"
    compute = a.compute_dtype or ("float32" if on_cpu else "bfloat16")
    remat = a.remat or ("none" if a.shape == "tiny" else "dots")
    cfg = model_config(a.shape, compute_dtype=compute, remat=remat, attention=a.attention)
    B, P, R, L = a.pairs, a.prompt_len, a.response_len, a.prompt_len + a.response_len
    attention = model.attention_impl(cfg, cached=False, right_padded=True, q_len=L)  # what the step traces
    mesh = sharding.make_mesh(MeshConfig())
    opt_cfg = OptimConfig(lr=1e-6, warmup_frac=0.0, schedule="constant", weight_decay=0.01)
    optimizer = step.make_optimizer(opt_cfg, total_steps=1000)
    params = sharding.init_params(cfg, jax.random.key(0), mesh)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    state = step.init_state(cfg, params, optimizer, mesh)
    del params  # the state holds its own copy

    rng = np.random.default_rng(0)
    target = np.zeros((B, L), np.int32)
    target[:, P:] = 1
    batch = step.unpacked_batch(real_ids_BxL=rng.integers(0, cfg.vocab_size, (B, L), dtype=np.int32),
                                gen_ids_BxL=rng.integers(0, cfg.vocab_size, (B, L), dtype=np.int32),
                                real_mask_BxL=np.ones((B, L), np.int32), gen_mask_BxL=np.ones((B, L), np.int32),
                                real_target_BxL=target, gen_target_BxL=target,
                                ref_real_B=rng.normal(size=B).astype(np.float32),
                                ref_gen_B=rng.normal(size=B).astype(np.float32))
    shapes = step.pair_batch_shapes(B, L)
    batch = jax.device_put(batch, step.batch_shardings(mesh, shapes))
    fn = step.make_train_step(cfg, ObjectiveConfig(name="spin"), opt_cfg, optimizer, mesh, shapes)

    # the first call compiles; warm-up is not timed (the peer also runs 3)
    state, metrics, warmup_s, dt = time_steps(fn, state, batch, warmup=3, steps=a.steps)
    peak, mem_kind = peak_memory()
    if a.trace:  # one more step, after the timing and the memory reading
        from bench import trace_summary
        trace_summary.trace_and_report(a.trace, lambda: fn(state, batch), "one pair step", top=a.trace_top)
    peak /= 1e9
    dev = jax.devices()[0]
    del state, metrics, batch

    dtype = jax.numpy.dtype(compute)
    n = a.matmul_size or (2048 if on_cpu else 8192)
    peak_flops = matmul_peak_flops(dtype, n, reps=3) * jax.device_count()
    flops_tok = 6 * n_params + 6 * cfg.num_layers * cfg.hidden_size * L
    tokens = 2 * B * L
    return {"device": f"{jax.device_count()}x {dev.device_kind}", "backend": jax.default_backend(),
            "compute_dtype": compute, "remat": remat, "attention": attention, "params": int(n_params),
            "pairs": B, "seq_len": L,
            "step_s": dt, "compile_and_warmup_s": warmup_s, "pairs_per_s": B / dt, "tokens_per_s": tokens / dt,
            "model_tflops_per_s": flops_tok * tokens / dt / 1e12,
            "matmul_peak_tflops": peak_flops / 1e12, "matmul_size": n,
            "mfu": flops_tok * tokens / dt / peak_flops, "peak_mem_gb": peak, "mem_kind": mem_kind}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--pairs", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--response-len", type=int)
    ap.add_argument("--steps", type=int, help="timed steps after 3 warm-up steps")
    ap.add_argument("--compute-dtype", choices=("float32", "bfloat16"), help="default: fp32 on CPU, else bf16")
    ap.add_argument("--remat", choices=("none", "full", "dots"), help="default: none for tiny, else dots")
    ap.add_argument("--attention", choices=("auto", "xla", "cudnn"),
                    default="auto", help="attention path, the model config's `attention` field "
                                         "(auto: cuDNN on a CUDA GPU with bf16, else XLA)")
    ap.add_argument("--matmul-size", type=int, help="n of the n^3 peak matmul (default 2048 CPU, 8192 else)")
    ap.add_argument("--no-peer", action="store_true", help="measure spjax only")
    ap.add_argument("--trace", metavar="DIR", help="profile one more step into DIR and summarize it")
    ap.add_argument("--trace-top", type=int, default=12, help="kernels listed in the trace summary")
    ap.add_argument("--peer-timeout", type=int, default=1800)
    a = ap.parse_args(argv)
    big = a.shape != "tiny"
    a.pairs = a.pairs or (8 if big else 2)
    a.prompt_len = a.prompt_len or (256 if big else 16)
    a.response_len = a.response_len or (768 if big else 48)
    a.steps = a.steps or (8 if big else 3)

    peers = {}
    if not a.no_peer:  # before JAX starts: on a GPU it would hold the memory the peers need
        for name, comp in (("torch_eager", False), ("torch_compile", True)):
            peers[name] = run_peer(a, comp)
            print(f"{name}: {peers[name]}", file=sys.stderr, flush=True)
    ours = run_spjax(a)

    ratios = {}
    for name, p in peers.items():
        if "error" not in p:
            ratios[f"tokens_per_s_vs_{name}"] = ours["tokens_per_s"] / p["tokens_per_s"]
            ratios[f"peak_mem_vs_{name}"] = ours["peak_mem_gb"] / p["peak_mem_gb"]

    print(f"\npair train step, shape {a.shape}: {a.pairs} pairs x {a.prompt_len}+{a.response_len} tokens "
          f"on {ours['device']} ({ours['compute_dtype']} compute, remat {ours['remat']}, "
          f"{ours['attention']} attention, {ours['params'] / 1e6:.1f}M params)")
    print(f"{'':15s} {'pairs/s':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>7s} {'peak GB':>8s}")
    print(f"{'spjax':15s} {ours['pairs_per_s']:9.3f} {ours['tokens_per_s']:10.1f} "
          f"{ours['model_tflops_per_s']:8.4f} {ours['mfu']:7.2%} {ours['peak_mem_gb']:8.3f}")
    for name, p in peers.items():
        if "error" in p:
            print(f"{name:15s} error: {p['error'][:200]}")
        else:
            p["mfu"] = p["model_tflops_per_s"] / ours["matmul_peak_tflops"]  # same peak, same convention
            print(f"{name:15s} {p['pairs_per_s']:9.3f} {p['tokens_per_s']:10.1f} "
                  f"{p['model_tflops_per_s']:8.4f} {p['mfu']:7.2%} {p['peak_mem_gb']:8.3f}")
    print(f"matmul peak {ours['matmul_peak_tflops']:.4f} TFLOP/s ({ours['compute_dtype']}, n={ours['matmul_size']}); "
          f"memory: {ours['mem_kind']}")
    ratios["mfu_of_matmul_peak"] = ours["mfu"]
    # DESIGN.md §4: on a GPU (set for the 1B shape) >= 1.15x compiled, MFU >= 70%, <= 1/2 eager memory; on a
    # CPU (set for SmolLM2) >= 1x eager, the peak memory there being the process's RSS
    targets = ({"tokens_per_s_vs_torch_eager": (">=", 1.0)} if ours["device"].lower().startswith("cpu") else
               {"tokens_per_s_vs_torch_compile": (">=", 1.15), "mfu_of_matmul_peak": (">=", 0.70),
                "peak_mem_vs_torch_eager": ("<=", 0.5)})
    met = {}
    for k, v in ratios.items():
        note = ""
        if k in targets:
            op, bound = targets[k]
            met[k] = bool(v >= bound if op == ">=" else v <= bound)
            note = f"   target {op} {bound}: {'met' if met[k] else 'NOT met'}"
        print(f"  {k}: {v:.3f}{note}")
    record = {"bench": "train_step", "shape": a.shape, "spjax": ours, **peers, "ratios": ratios, "targets_met": met}
    emit(record, "train_step.json")
    if any("error" in p for p in peers.values()):  # no baseline, no ratio: say so in the exit status
        sys.exit(3)


if __name__ == "__main__":
    main()
