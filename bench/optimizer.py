"""The optimizer update alone: spjax.optim's fused transform against the optax chain it replaced.

Both take a model's params, fp32 gradients and AdamW state (global-norm clipping at 1, weight
decay 0.01, a schedule read from the state) and drop a non-finite step: the chain, as spjax did
before, by selecting between the new and the old params and state afterwards; the fused transform
inside its one elementwise pass. Params and state are donated, as in the train step. Prints ms per
update (best and median of --reps after a warm-up) and the ratio.

  python bench/optimizer.py --shape smollm2-135m
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import SHAPES, emit, model_config  # noqa: E402


def chain_with_select(cfg, total: int):
    """The pre-fusion optimizer: optax's clip + adamw under inject_hyperparams, skip by select."""
    import optax

    from spjax import optim
    opt = optax.inject_hyperparams(lambda learning_rate: optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=optim.decay_mask)))(learning_rate=optim.make_schedule(cfg, total))
    return opt, True


def time_update(opt, select: bool, params, grads, reps: int) -> tuple:
    import jax
    import jax.numpy as jnp
    import optax

    def update(p, s, g):
        finite = jnp.isfinite(optax.tree.norm(g))
        if select:
            u, ns = opt.update(g, s, p)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            return keep(optax.apply_updates(p, u), p), keep(ns, s)
        u, ns = opt.update(g, s, p, finite=finite)
        return optax.apply_updates(p, u), ns

    fn = jax.jit(update, donate_argnums=(0, 1))
    p = jax.tree.map(jnp.copy, params)
    s = opt.init(p)
    p, s = fn(p, s, grads)
    jax.block_until_ready(p)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        p, s = fn(p, s, grads)
        jax.block_until_ready(p)
        times.append(time.perf_counter() - t)
    return min(times), float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from spjax import model, optim
    from spjax.config import OptimConfig
    cfg = OptimConfig(lr=1e-5, warmup_frac=0.1, schedule="linear", weight_decay=0.01, clip_norm=1.0)
    shapes = model.param_shapes(model_config(a.shape))
    keys = iter(jax.random.split(jax.random.key(0), 2 * len(jax.tree.leaves(shapes))))
    params = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, jnp.float32), shapes)
    grads = jax.tree.map(lambda s: 0.01 * jax.random.normal(next(keys), s.shape, jnp.float32), shapes)
    n = sum(x.size for x in jax.tree.leaves(params))
    res = {"chain_select": time_update(*chain_with_select(cfg, 1000), params, grads, a.reps),
           "fused": time_update(optim.make_optimizer(cfg, 1000), False, params, grads, a.reps)}
    print(f"AdamW update of {n / 1e6:.1f}M fp32 params on {jax.devices()[0].platform} (clip, decay, skip):")
    for k, (best, med) in res.items():
        print(f"  {k:13s} {1e3 * best:8.1f} ms best, {1e3 * med:8.1f} ms median")
    ratio = res["chain_select"][1] / res["fused"][1]
    print(f"  fused is {ratio:.2f}x faster (medians)")
    emit({"bench": "optimizer", "shape": a.shape, "params": int(n),
          **{f"{k}_ms": 1e3 * v[1] for k, v in res.items()}, "speedup": ratio}, "optimizer.json")


if __name__ == "__main__":
    main()
