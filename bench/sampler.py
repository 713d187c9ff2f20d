"""Sampler throughput: spjax's KV-cache sampler against HF generate() in the same run.

New tokens/s of `spjax.sample` (temperature 1, no EOS, so every row makes all its tokens; compile
excluded) beside ../shared/peers/torch_pair_bench.py's generate() figure for the same shape and
sizes, run in a subprocess first (so it has the device to itself), and their ratio. It also splits
the time into prefill and decode, and reports the fraction of the memory-bandwidth roofline: the
bytes a decode step must read (params + the live KV cache), summed over the decode steps, at the
card's peak bandwidth, against the measured decode time (total minus a separately timed prefill).

  python bench/sampler.py --shape tiny                # CPU smoke: 4 x 16 prompt + 16 new
  python bench/sampler.py --shape smollm2-135m        # 64 x 256 + 256 (sizes overridable)
  python bench/sampler.py --shape llama3.2-1b --peers eager,compile   # the DESIGN.md §4 target
  python bench/sampler.py --shape smollm2-135m --batch 16 --prompt-len 128 --new-tokens 128 --segments 0,1
  python bench/sampler.py --shape llama3.2-1b --batch 256 --samples 4   # 64 prompts x 4 samples vs 256 x 1
  python bench/sampler.py --shape llama3.2-1b --chunks 1,8 --trace /tmp/sampler_trace   # A/B, then a trace
  python bench/sampler.py --shape llama3.2-1b --xla '' --xla xla_gpu_enable_triton_gemm=false --hlo /tmp/hlo

--segments is a comma list of decode-loop segment counts, each timed in the same run (0: the
automatic attention windows, 1: every step attends over the whole cache); the first is the
headline figure. --chunks is a comma list of decode steps between two early-exit checks (0: the
automatic choice, 8 on GPUs, 1 elsewhere), crossed with --segments. --trace DIR profiles one more
call of the first variant (jax.profiler) and prints where the time went (bench/trace_summary.py).
--unroll-layers on/off/auto picks the decode step's layer loop (auto: unrolled
over per-layer weight slices on GPUs and for shallow models on CPU, scanned elsewhere). The
DESIGN.md §4 targets (GPU: >= 3.5x the compiled static-cache peer, >= 50% of the HBM roofline) are
marked as met or not; a CPU has none (the peer compiles on CUDA only). --xla (repeatable) adds a
variant compiled with those XLA options (`name=value,...`; '' for XLA's defaults), crossed with the
others; --layer-caches on,off and --decode-kernel on,off (the Triton decode-attention kernel that
attention=auto picks on CUDA GPUs, spjax.decode_attention) are crossed with them too; --hlo DIR writes
each variant's compiled program there (hlo_<n>.txt.gz): which op each kernel of the trace is.

Prints a few readable lines and one JSON line (also $OUT/sampler_bench.json when OUT is set).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spjax import model, sampler  # noqa: E402
from bench import trace_summary  # noqa: E402
from bench.common import SHAPES, best_time, emit, model_config, peer_script  # noqa: E402

PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0}  # HBM peak by device-kind substring (SXM figures)


def run_peer(shape, batch, prompt_len, new, compiled: bool, timeout: int) -> dict:
    """The peer's generate() figures: its last JSON object, or {'error': ...}."""
    cmd = [sys.executable, peer_script(), "--shape", shape, "--skip-train", "--gen-batch", str(batch),
           "--gen-prompt", str(prompt_len), "--gen-new", str(new)] + (["--compile"] if compiled else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    text, found, dec, i = proc.stdout, None, json.JSONDecoder(), 0
    while (i := text.find("{", i)) >= 0:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        found, i = obj, end
    if proc.returncode or not found or "generate" not in found:
        err = (found or {}).get("generate_error") or proc.stderr[-500:]
        return {"error": f"rc={proc.returncode}: {err}"}
    return found


def tokens_crc32(tokens) -> str:
    """A digest of the samples: variants of one program (and runs under other XLA flags, e.g. command
    buffers) draw the same tokens from the same key, so equal digests say the variant changed no sample."""
    return f"{zlib.crc32(np.concatenate([np.asarray(t, np.int32) for t in tokens]).tobytes()):08x}"


def xla_options(text: str) -> dict:
    """'name=value,...' -> {name: value}, values typed as XLA's option parser wants them."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        low = value.strip().lower()
        out[name.strip()] = (low == "true") if low in ("true", "false") else int(low) if low.lstrip("-").isdigit() \
            else value.strip()
    return out


def compare_shared_prefill(cfg, params, prompts, N: int, K: int, repeats: int, decode_kernel: bool = True) -> dict:
    """B/K prompts x K samples (one prefill per prompt, K decode rows each) against B distinct prompts
    x 1 sample: the same decode rows, a K-times smaller prefill. Times the prefill alone and the
    whole sample() call of each, best of `repeats` after a warm-up."""
    B, P = len(prompts), len(prompts[0])
    S = sampler.cache_len(sampler.default_bucket(P), N)
    out = {}
    for name, ps, k in (("distinct", prompts, 1), ("shared", prompts[:B // K], K)):
        prompt_BxP, len_B = jnp.asarray(np.asarray(ps, np.int32)), jnp.full((len(ps),), P, jnp.int32)
        pre = lambda: sampler.prefill(cfg, params, prompt_BxP, len_B, cache_len=S)[0]
        call = lambda: sampler.sample(cfg, params, ps, key=0, max_new_tokens=N, temperature=1.0, num_samples=k,
                                      decode_kernel=decode_kernel).lengths
        jax.block_until_ready((pre(), call()))
        out[name] = {"prompts": len(ps), "samples": k, "prefill_s": best_time(pre, repeats),
                     "call_s": best_time(call, repeats)}
    out["prefill_ratio"] = out["shared"]["prefill_s"] / out["distinct"]["prefill_s"]
    out["call_ratio"] = out["shared"]["call_s"] / out["distinct"]["call_s"]
    for name in ("distinct", "shared"):
        r = out[name]
        print(f"  {r['prompts']:4d} prompts x {r['samples']} samples: prefill {r['prefill_s']:.3f} s, "
              f"whole call {r['call_s']:.3f} s")
    print(f"  shared / distinct: prefill {out['prefill_ratio']:.2f}x (target <= 0.3: "
          f"{'met' if out['prefill_ratio'] <= 0.3 else 'NOT met'}), whole call {out['call_ratio']:.2f}x "
          f"(target <= 1.0: {'met' if out['call_ratio'] <= 1.0 else 'NOT met'})")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the best counts")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="params and compute (default: bfloat16 on GPU/TPU like the peer, float32 on CPU)")
    ap.add_argument("--peers", default="auto",
                    help="comma list of eager,compile, or none (auto: eager on CPU, both on GPU)")
    ap.add_argument("--peer-timeout", type=int, default=1800, help="seconds per peer run")
    ap.add_argument("--peer-repeats", type=int,
                    help="peer runs, each timing one generate() after its warm-up; the best counts, as spjax's "
                         "best of --repeats does (default: --repeats)")
    ap.add_argument("--segments", default="0", help="comma list of decode segment counts (0: automatic)")
    ap.add_argument("--chunks", default="0", help="comma list of decode steps per early-exit check (0: automatic)")
    ap.add_argument("--trace", metavar="DIR", help="profile one more call of the first variant into DIR and summarize")
    ap.add_argument("--trace-top", type=int, default=12, help="kernels listed in the trace summary")
    ap.add_argument("--xla", action="append", metavar="NAME=VALUE,...",
                    help="a variant compiled with these XLA options ('' : defaults); repeat for more")
    ap.add_argument("--layer-caches", default="on", help="comma list of on/off: unrolled layers' KV buffer per layer")
    ap.add_argument("--decode-kernel", default="on",
                    help="comma list of on/off: the Triton decode-attention kernel where attention=auto picks it")
    ap.add_argument("--hlo", metavar="DIR", help="write each variant's compiled program (gzipped HLO text) here")
    ap.add_argument("--unroll-layers", default="auto", choices=("auto", "on", "off"),
                    help="decode over per-layer weight slices (auto: GPUs, shallow CPU models)")
    ap.add_argument("--samples", type=int, default=1,
                    help="K > 1: compare batch/K prompts x K samples with batch distinct prompts (prefill shared)")
    ap.add_argument("--peak-gbps", type=float, help="memory bandwidth peak (default by device: H100 3350, H200 4800)")
    a = ap.parse_args()

    big = a.shape != "tiny"
    B = a.batch or (64 if big else 4)
    P = a.prompt_len or (256 if big else 16)
    N = a.new_tokens or (256 if big else 16)
    if a.samples < 1 or B % a.samples:  # B/K prompts x K samples against B: the same decode rows only then
        ap.error(f"--samples {a.samples}: must divide --batch {B}")
    variants = [(int(s), int(c), x, lc == "on", dk == "on") for s in a.segments.split(",")
                for c in a.chunks.split(",") for x in (a.xla or [""]) for lc in a.layer_caches.split(",")
                for dk in a.decode_kernel.split(",")]
    # The backend asked in a child: jax.devices() here would take 75% of a GPU before the peers run.
    backend = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                             capture_output=True, text=True).stdout.strip() or "cpu"
    on_cpu = backend == "cpu"
    peers = ("eager",) if a.peers == "auto" and on_cpu else ("eager", "compile") if a.peers == "auto" else \
        tuple(p for p in a.peers.split(",") if p and p != "none")
    peers = () if a.samples > 1 else peers
    out = {"bench": "sampler", "shape": a.shape, "jax": jax.__version__, "batch": B, "prompt_len": P, "new_tokens": N,
           "decode_kernel_tuning": os.environ.get("SPJAX_DECODE_KERNEL", "")}  # spjax.decode_attention's override

    # The peer first: it gets the device to itself (JAX would otherwise hold most GPU memory).
    # The peer times one generate() a run, so it runs as often as spjax's calls are timed: the same
    # statistic (the best) on both sides; one peer call against spjax's best of 3 favoured spjax.
    for p in peers:
        runs = [run_peer(a.shape, B, P, N, p == "compile", a.peer_timeout) for _ in range(a.peer_repeats or a.repeats)]
        good = [r for r in runs if "error" not in r]
        if not good:
            out[f"peer_{p}_error"] = runs[0]["error"]
            continue
        rates = [r["generate"]["new_tokens_per_s"] for r in good]
        out[f"peer_{p}_new_tokens_per_s"], out[f"peer_{p}_runs_new_tokens_per_s"] = max(rates), rates
        out[f"peer_{p}_device"] = good[0].get("gpu") or good[0].get("device")

    dev = jax.devices()[0]
    out.update(device=dev.device_kind, platform=dev.platform)
    dtype = a.dtype or ("float32" if on_cpu else "bfloat16")
    cfg = model_config(a.shape, param_dtype=dtype, compute_dtype=dtype)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    prompts = np.random.RandomState(0).randint(0, cfg.vocab_size, (B, P)).tolist()
    key = sampler.round_key(0, 0)
    P_b = sampler.default_bucket(P)  # the shapes sample() uses: bucket P_b, cache S
    S = sampler.cache_len(P_b, N)

    if a.samples > 1:
        print(f"{a.shape} on {dev.device_kind}: {B} decode rows, prompt {P}, {N} new tokens, {dtype}")
        out["shared_prefill"] = compare_shared_prefill(cfg, params, prompts, N, a.samples, a.repeats,
                                                       decode_kernel=variants[0][4])
        emit(out, "sampler_bench.json")
        return
    unroll = {"auto": None, "on": True, "off": False}[a.unroll_layers]
    out["unroll_layers"] = sampler.make_plan(prompt_len=P_b, max_new_tokens=N, batch_size=B,
                                             unroll_layers=unroll).unrolled(cfg)
    runs = {}
    for seg, chunk, xla, own, dk in variants:
        def run():
            res = sampler.sample(cfg, params, prompts, key=key, max_new_tokens=N, temperature=1.0,
                                 decode_segments=seg, unroll_layers=unroll, decode_chunk=chunk,
                                 xla_options=xla_options(xla), layer_caches=own, decode_kernel=dk)
            assert res.lengths.min() == N  # no EOS: every row made all N tokens
            return res

        t = time.perf_counter()
        res = run()  # compile + first run
        first_s = time.perf_counter() - t
        total_s = best_time(lambda: run().lengths, a.repeats)
        plan = sampler.make_plan(prompt_len=P_b, max_new_tokens=N, batch_size=B, decode_segments=seg,
                                 decode_chunk=chunk, unroll_layers=unroll, xla_options=xla_options(xla),
                                 layer_caches=own, decode_kernel=dk)
        if a.hlo:
            os.makedirs(a.hlo, exist_ok=True)
            with gzip.open(os.path.join(a.hlo, f"hlo_{len(runs)}.txt.gz"), "wt") as f:
                f.write(f"# {seg=} {chunk=} xla={xla!r}\n" + sampler.lower(cfg, plan, params).compile().as_text())
        name = (f"segments={seg},chunk={chunk}" + (f",xla={xla}" if xla else "") + ("" if own else ",stacked cache")
                + ("" if dk else ",no decode kernel"))
        runs[name] = {"windows": [list(w) for w in plan.windows(cfg)], "chunk": plan.chunk(), "s": total_s,
                      "first_call_s": first_s, "new_tokens_per_s": B * N / total_s,
                      "tokens_crc32": tokens_crc32(res.tokens)}
        if a.trace and len(runs) == 1:
            trace_summary.trace_and_report(
                a.trace, run, f"one call ({seg=}, {chunk=}, {xla=}, layer_caches={own}, decode_kernel={dk})",
                top=a.trace_top)
    out["variants"] = runs
    head = next(iter(runs.values()))
    out["tokens_crc32"] = head_crc = head["tokens_crc32"]
    out["same_samples"] = all(r["tokens_crc32"] == head_crc for r in runs.values())
    out["spjax_first_call_s"], out["spjax_s"] = head["first_call_s"], head["s"]
    out["spjax_new_tokens_per_s"] = head["new_tokens_per_s"]
    for p in peers:
        if f"peer_{p}_new_tokens_per_s" in out:
            out[f"ratio_vs_peer_{p}"] = out["spjax_new_tokens_per_s"] / out[f"peer_{p}_new_tokens_per_s"]

    # Prefill alone, to split the time.
    prompt_BxP, len_B = jnp.asarray(np.asarray(prompts, np.int32)), jnp.full((B,), P, jnp.int32)
    pre = lambda: sampler.prefill(cfg, params, prompt_BxP, len_B, cache_len=S)[0]
    jax.block_until_ready(pre())
    prefill_s = best_time(pre, a.repeats)
    decode_s = max(head["s"] - prefill_s, 1e-9)
    out["prefill_s"], out["decode_s"] = prefill_s, decode_s
    out["decode_new_tokens_per_s"] = B * (N - 1) / decode_s  # the prefill makes the first token

    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kv_bytes_per_slot = 2 * cfg.num_layers * B * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    steps = N - 1
    live_slots = sum(P_b + t for t in range(1, N))  # step t reads the prompt and t generated tokens
    window_slots = sum(W * (last - first + 1) for (first, (last, W)) in zip(
        [1] + [w[0] + 1 for w in head["windows"][:-1]], head["windows"]))  # what the windows read
    bytes_read = steps * param_bytes + live_slots * kv_bytes_per_slot
    out["param_gb"] = param_bytes / 1e9
    out["decode_gb_read"] = bytes_read / 1e9
    out["decode_gb_read_windowed"] = (steps * param_bytes + window_slots * kv_bytes_per_slot) / 1e9
    out["decode_gbps"] = bytes_read / decode_s / 1e9
    peak = a.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in dev.device_kind), None)
    if a.peak_gbps or (peak and not on_cpu):
        out["peak_gbps"] = peak
        out["roofline_frac"] = out["decode_gbps"] / peak

    # DESIGN.md §4 (GPU): >= 3.5x the compiled static-cache generate, >= 50% of the HBM roofline. On a CPU the
    # peer's "compile" is its eager generate (it compiles on CUDA only): no target there.
    targets = {"compile": 3.5} if not on_cpu else {}
    out["targets_met"] = {p: out[f"ratio_vs_peer_{p}"] >= targets[p] for p in peers
                          if f"ratio_vs_peer_{p}" in out and p in targets}
    if "roofline_frac" in out and not on_cpu:
        out["targets_met"]["roofline"] = out["roofline_frac"] >= 0.5

    print(f"{a.shape} on {dev.device_kind}: batch {B}, prompt {P}, {N} new tokens, {dtype}, "
          f"decode layers {'unrolled' if out['unroll_layers'] else 'scanned'}")
    for name, r in runs.items():
        print(f"  spjax   {r['new_tokens_per_s']:10.1f} new tok/s  ({r['s']:.3f} s, first call "
              f"{r['first_call_s']:.1f} s; {name}: windows {[w[1] for w in r['windows']]} of {S} slots, "
              f"{r['chunk']} steps a check)")
    print(f"  samples {'identical across variants' if out['same_samples'] else 'DIFFER between variants'} "
          f"(crc32 {head_crc})")
    print(f"  split   prefill {prefill_s:.3f} s, decode {decode_s:.3f} s "
          f"({out['decode_new_tokens_per_s']:.1f} new tok/s while decoding)")
    for p in peers:
        if f"peer_{p}_new_tokens_per_s" in out:
            mark = (f"   (target >= {targets[p]}x: {'met' if out['targets_met'][p] else 'NOT met'})"
                    if p in targets else "")
            print(f"  HF {p:7s}{out[f'peer_{p}_new_tokens_per_s']:10.1f} new tok/s  -> spjax is "
                  f"{out[f'ratio_vs_peer_{p}']:.2f}x{mark}")
        else:
            print(f"  HF {p}: {out[f'peer_{p}_error']}")
    print(f"  decode reads {out['decode_gb_read']:.1f} GB (params + live KV; the windows read "
          f"{out['decode_gb_read_windowed']:.1f} GB) at {out['decode_gbps']:.1f} GB/s"
          + (f" = {out['roofline_frac']:.1%} of {peak:.0f} GB/s" if "roofline_frac" in out else "")
          + (f" (target >= 50%: {'met' if out['targets_met']['roofline'] else 'NOT met'})"
             if "roofline" in out["targets_met"] else ""))
    emit(out, "sampler_bench.json")
    if any(f"peer_{p}_error" in out for p in peers):  # no baseline, no ratio: say so in the exit status
        sys.exit(3)


if __name__ == "__main__":
    main()
