"""Padding-free pairs: useful tokens/s of the pair step (or of reference scoring) with packed rows vs
one sequence per row.

The same global batches of pairs (the round's shuffled order) go through the train step twice:
bucketed (one right-padded sequence per row, each batch at its own length bucket: what a GPU run
does) and packed (spjax.data.packing: sequences back to back in rows of the round's length, one
shape per round: what data.pack=auto picks on CPU and TPU). Useful tokens are the non-padding
tokens; both layouts see the same ones, so the ratio of tokens/s is the ratio of step times.
Every shape is compiled and run once before timing.

  python bench/packing.py --mix demo        # configs/demo.py's data and buckets, SmolLM2-135M shape
  python bench/packing.py --mix longtail    # an UltraChat-like long-tailed length mix up to 512 tokens
  python bench/packing.py --phase score     # scoring.score_examples of both sides, pack=off vs on

--phase score times a round's reference scoring of the same examples (real, then generated side),
run.score_batch_size (default 32) rows a call: one right-padded sequence per row at each call's
bucket, vs packed rows of the longest bucket (as few calls, then as few rows a call, as that allows).

demo: the demo's chatterbot pairs (SmolLM2 chat template, max_len 96, buckets 64/96, 16 pairs a
batch); the second side is another example's answer cut to the demo's 32 sampled tokens (the
opponent's samples have about that length mix). longtail: lognormal prompt (median 48) and response
(median 150) lengths, cut to 512 tokens, 8 pairs a batch, random token ids; the model is the
SmolLM2-135M shape with --layers of its 30 layers (default 4) to keep the CPU run short.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import emit, model_config  # noqa: E402

LONGTAIL_EXAMPLES = 64  # enough for 8 batches of 8 pairs


def demo_mix():
    """(examples, buckets, pairs per batch, pad id) from configs/demo.py's data."""
    import dataclasses

    from configs import demo
    from spjax import hf
    from spjax.data import pad_token_id, prepare
    cfg = demo.get_config()
    tok = hf.load_tokenizer(cfg.model_path)
    data = dataclasses.replace(cfg.data, max_examples=0)
    prepared = prepare(data, tok, os.path.join(os.environ.get("TMPDIR", "/tmp"), "spjax_bench_tfds"))
    train = prepared.train
    new = cfg.sampling.max_new_tokens
    examples = [dataclasses.replace(e, generated_ids=train[(i + 1) % len(train)].real_ids[:new])
                for i, e in enumerate(train)]
    return examples, prepared.buckets, cfg.run.batch_size, pad_token_id(tok)


def longtail_mix(n: int, vocab: int, max_len: int = 512, seed: int = 0):
    from spjax.data.batching import default_buckets
    from spjax.data.tokens import TokenizedExample
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = int(np.clip(rng.lognormal(np.log(48), 0.9), 4, max_len // 2))
        r, g = (int(np.clip(x, 2, max_len - p)) for x in rng.lognormal(np.log(150), 0.8, 2))
        ids = lambda k: rng.integers(3, vocab, k).astype(np.int32)
        out.append(TokenizedExample(id=i, prompt_ids=ids(p), real_ids=ids(r), generated_ids=ids(g)))
    return out, default_buckets(max_len), 8, 0


def run(examples, buckets, B, pad_id, cfg, n_batches: int, packed: bool) -> dict:
    import jax

    from spjax import sharding, step
    from spjax.config import MeshConfig, ObjectiveConfig, OptimConfig
    from spjax.data import batching, packing
    mesh = sharding.make_mesh(MeshConfig())
    opt_cfg = OptimConfig(lr=1e-6, warmup_frac=0.0, schedule="constant")
    optimizer = step.make_optimizer(opt_cfg, 1000)
    state = step.init_state(cfg, sharding.init_params(cfg, jax.random.key(0), mesh), optimizer, mesh)
    ids = [i for i, _ in batching.global_batches(len(examples), B, seed=0, epochs=1)][:n_batches]
    shape_of = packing.shape_rule(examples, ids, buckets=buckets, grad_accum=1,
                                  data_parallel=sharding.data_parallel_size(mesh), packed=packed)
    fn = step.make_train_step(cfg, ObjectiveConfig(name="chi2"), opt_cfg, optimizer, mesh,
                              step.pair_batch_shapes(B, buckets[0], packed=packed))
    rng = np.random.default_rng(0)
    refs = [rng.normal(-30, 5, len(examples)).astype(np.float32) for _ in range(2)]
    batches = []
    for ids_G in ids:
        rows, length = shape_of(ids_G)
        host = packing.pair_rows(examples, ids_G, rows=rows, row_len=length, grad_accum=1, packed=packed,
                                 pad_id=pad_id)
        e = host["example_id_B"]
        b = step.PairBatch(host["tokens_RxL"], host["segments_RxL"], host["positions_RxL"], host["targets_RxL"],
                           host["seqs_RxL"], refs[0][e], refs[1][e], np.ones(B, np.float32), np.zeros(B, np.float32),
                           packed=packed)
        batches.append(jax.device_put(b, step.batch_shardings(mesh, b)))
    t = time.perf_counter()
    for shape in sorted({b.tokens_RxL.shape for b in batches}):  # compile and run each shape once
        state, m = fn(state, next(b for b in batches if b.tokens_RxL.shape == shape))
    jax.block_until_ready(m)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for b in batches:
        state, m = fn(state, b)
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t
    useful = sum(int((b.segments_RxL > 0).sum()) for b in batches)
    slots = sum(b.tokens_RxL.size for b in batches)
    return {"layout": "packed" if packed else "bucketed", "batches": len(batches), "seconds": dt,
            "compile_and_warmup_s": warm, "useful_tokens": useful, "row_tokens": slots,
            "fill": useful / slots, "useful_tokens_per_s": useful / dt,
            "shapes": sorted({tuple(b.tokens_RxL.shape) for b in batches})}


def run_score(examples, buckets, pad_id, cfg, pack: str, batch: int) -> dict:
    """Seconds of scoring.score_examples over both sides of `examples` (each shape compiled and run
    once before timing, by an untimed pass)."""
    from types import SimpleNamespace

    import jax

    from spjax import scoring, sharding
    from spjax.config import Config, DataConfig, MeshConfig, RunConfig
    mesh = sharding.make_mesh(MeshConfig())
    params = sharding.init_params(cfg, jax.random.key(0), mesh)
    # the model's dtypes and remat at the top level too: Config refuses a model.* field that differs from them
    top = dict(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, remat=cfg.remat, attention=cfg.attention)
    ctx = SimpleNamespace(cfg=Config(model=cfg, **top, data=DataConfig(pack=pack), run=RunConfig(score_batch_size=batch)),
                          mesh=mesh, model_cfg=cfg, buckets=buckets, pad_id=pad_id)
    sides = ("real_ids", "generated_ids")
    t = time.perf_counter()
    for which in sides:
        scoring.score_examples(ctx, params, examples, which)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    lp = [scoring.score_examples(ctx, params, examples, which) for which in sides]
    dt = time.perf_counter() - t
    useful = sum(len(e.prompt_ids) + len(getattr(e, w)) for e in examples for w in sides)
    return {"layout": "packed" if pack == "on" else "bucketed", "seconds": dt, "compile_and_warmup_s": warm,
            "useful_tokens": useful, "useful_tokens_per_s": useful / dt, "logprobs": lp}


def score_main(a, cfg, layers, examples, buckets, pad):
    res = {pack: run_score(examples, buckets, pad, cfg, pack, a.score_batch) for pack in ("off", "on")}
    gap = max(float(np.max(np.abs(x - y))) for x, y in zip(res["on"].pop("logprobs"), res["off"].pop("logprobs")))
    ratio = res["on"]["useful_tokens_per_s"] / res["off"]["useful_tokens_per_s"]
    print(f"\nreference scoring, {a.mix} mix: {len(examples)} examples x 2 sides, {a.score_batch} rows a call, "
          f"SmolLM2-135M shape with {layers} layers, fp32 on {__import__('jax').devices()[0].platform}")
    for r in res.values():
        print(f"{r['layout']:10s} {r['useful_tokens_per_s']:13.1f} useful tok/s {r['seconds']:8.2f} s")
    print(f"packed / bucketed: {ratio:.2f}x   largest log-prob difference {gap:.2e}")
    emit({"bench": "packing_score", "mix": a.mix, "layers": layers, "examples": len(examples),
          "bucketed": res["off"], "packed": res["on"], "ratio": ratio, "max_abs_diff": gap},
         f"packing_score_{a.mix}.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mix", choices=("demo", "longtail"), default="demo")
    ap.add_argument("--batches", type=int, default=4, help="global batches timed per layout")
    ap.add_argument("--layers", type=int, help="layers of the SmolLM2-135M shape (default: 30 demo, 4 longtail)")
    ap.add_argument("--phase", choices=("step", "score"), default="step")
    ap.add_argument("--score-batch", type=int, default=32, help="--phase score: rows a call (run.score_batch_size)")
    ap.add_argument("--score-examples", type=int, default=128, help="--phase score: examples scored (both sides)")
    a = ap.parse_args(argv)
    layers = a.layers or (30 if a.mix == "demo" else 4)
    cfg = model_config("smollm2-135m", compute_dtype="float32", remat="dots", num_layers=layers)
    if a.mix == "demo":
        examples, buckets, B, pad = demo_mix()
    else:
        examples, buckets, B, pad = longtail_mix(LONGTAIL_EXAMPLES, cfg.vocab_size)
    if a.phase == "score":
        return score_main(a, cfg, layers, examples[:a.score_examples], buckets, pad)
    res = {packed: run(examples, buckets, B, pad, cfg, a.batches, packed) for packed in (False, True)}
    ratio = res[True]["useful_tokens_per_s"] / res[False]["useful_tokens_per_s"]
    print(f"\npair step, {a.mix} mix: {a.batches} batches of {B} pairs, SmolLM2-135M shape with {layers} layers, "
          f"fp32 on {__import__('jax').devices()[0].platform}")
    print(f"{'':10s} {'useful tok/s':>13s} {'fill':>6s} {'seconds':>8s}  shapes")
    for r in res.values():
        print(f"{r['layout']:10s} {r['useful_tokens_per_s']:13.1f} {r['fill']:6.1%} {r['seconds']:8.2f}  {r['shapes']}")
    print(f"packed / bucketed useful tokens/s: {ratio:.2f}x   target >= 1.5: {'met' if ratio >= 1.5 else 'NOT met'}")
    emit({"bench": "packing", "mix": a.mix, "layers": layers, "pairs": B, "bucketed": res[False],
          "packed": res[True], "ratio": ratio}, f"packing_{a.mix}.json")

if __name__ == "__main__":
    main()
