"""On a GPU, before timing anything: do the GPU-only paths compute what the CPU-tested paths compute?

The CPU suite checks the XLA attention path, the unrolled decode and the head VJP against references;
cuDNN flash attention only runs on a CUDA GPU. This script compares, on the GPU, for a small random
model with fp32 params:
  1. token log-probs and their gradient with bf16 compute through cuDNN attention and through the XLA
     einsum path, each against an fp32-compute XLA reference (relative L2 error; cuDNN should be no
     worse than the einsum path at the same precision), on a right-padded batch;
  2. greedy sampling (fp32) with the decode layers unrolled over windows, checking for the end once
     per chunk of steps (the GPU defaults), vs one scanned loop over the whole cache checking every
     step: identical tokens, also where rows stop at an EOS inside a chunk.
Prints one line per check and exits 1 if a check fails (the caller then times with --attention xla).

  python bench/gpu_check.py
"""
from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spjax import logprobs, model, sampler  # noqa: E402
from spjax.config import ModelConfig  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def logprobs_and_grad(cfg, params, ids_BxL, mask_BxL, attention: str):
    cfg = dataclasses.replace(cfg, attention=attention)  # the attention path is part of the config

    def f(p):
        lp_BxL = logprobs.token_logprobs(cfg, p, ids_BxL, mask_BxL, mask_BxL, chunk=128)
        return jnp.sum(lp_BxL * jnp.arange(1, lp_BxL.shape[0] + 1)[:, None]), lp_BxL

    (_, lp_BxL), g = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return np.asarray(lp_BxL), np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(g)])


def main() -> int:
    if jax.default_backend() != "gpu":  # cuDNN cannot run, and the decode checks would compare the CPU's one-step chunks with themselves
        print(f"gpu_check: needs a CUDA GPU; JAX's backend here is {jax.default_backend()}: nothing checked")
        return 2
    ok = True
    base = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8,
                num_kv_heads=2, tie_embeddings=True, rope_theta=10000.0, max_position_embeddings=1024)
    cfg32 = ModelConfig(**base)
    cfg16 = ModelConfig(**base, compute_dtype="bfloat16")
    params = jax.jit(model.init_params, static_argnums=0)(cfg32, jax.random.key(0))
    rng = np.random.default_rng(0)
    B, L = 4, 384
    ids_BxL = jnp.asarray(rng.integers(0, cfg32.vocab_size, (B, L)), jnp.int32)
    lengths = np.array([L, 300, 129, 17])
    mask_BxL = jnp.asarray(np.arange(L)[None] < lengths[:, None], jnp.int32)  # right-padded

    picked = model.attention_impl(cfg16, cached=False, right_padded=True, q_len=L)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; auto attention for bf16: {picked}")
    ref_lp, ref_g = logprobs_and_grad(cfg32, params, ids_BxL, mask_BxL, "xla")
    xla_lp, xla_g = logprobs_and_grad(cfg16, params, ids_BxL, mask_BxL, "xla")
    e_xla = (rel(xla_lp, ref_lp), rel(xla_g, ref_g))
    try:
        cud_lp, cud_g = logprobs_and_grad(cfg16, params, ids_BxL, mask_BxL, "cudnn")
        e_cud = (rel(cud_lp, ref_lp), rel(cud_g, ref_g))
        good = all(np.isfinite(e_cud)) and e_cud[0] <= 2 * e_xla[0] + 1e-3 and e_cud[1] <= 2 * e_xla[1] + 1e-3
        print(f"[{'ok' if good else 'FAIL'}] bf16 log-probs / grads vs fp32: cuDNN {e_cud[0]:.2e} / {e_cud[1]:.2e}, "
              f"XLA einsum {e_xla[0]:.2e} / {e_xla[1]:.2e}")
        ok &= good
    except Exception as e:  # noqa: BLE001 - report and let the caller fall back to the XLA path
        print(f"[FAIL] cuDNN attention did not run: {type(e).__name__}: {str(e)[:300]}")
        ok = False

    prompts = rng.integers(3, cfg32.vocab_size, (8, 40)).tolist()
    prompts = [p[: 40 - 4 * i] for i, p in enumerate(prompts)]  # ragged, left-padded inside
    kw = dict(key=sampler.round_key(0, 0), max_new_tokens=70, temperature=0.0)
    a = sampler.sample(cfg32, params, prompts, decode_segments=0, unroll_layers=True, **kw)
    b = sampler.sample(cfg32, params, prompts, decode_segments=1, unroll_layers=False, decode_chunk=1, **kw)
    same = a.tokens == b.tokens
    equal = sum(x == y for ra, rb in zip(a.tokens, b.tokens) for x, y in zip(ra, rb))
    print(f"[{'ok' if same else 'FAIL'}] greedy fp32: unrolled windowed decode in chunks of "
          f"{sampler.make_plan(prompt_len=64, max_new_tokens=70, batch_size=8).chunk()} steps == one scanned "
          f"loop checking every step ({equal} of {sum(len(r) for r in a.tokens)} tokens equal)")
    ok &= same
    # Rows that stop inside a chunk (sampled, so rows differ): each row's token 5 is an EOS id.
    kw["temperature"] = 1.0
    eos = sorted({row[5] for row in sampler.sample(cfg32, params, prompts, decode_chunk=1, **kw).tokens})
    c = sampler.sample(cfg32, params, prompts, eos_ids=eos, **kw)
    d = sampler.sample(cfg32, params, prompts, eos_ids=eos, decode_chunk=1, **kw)
    same = c.tokens == d.tokens and c.lengths.tolist() == d.lengths.tolist() and c.steps == d.steps <= 6
    print(f"[{'ok' if same else 'FAIL'}] sampled with EOS: chunked decode == checking every step "
          f"(longest sample {c.steps} / {d.steps} tokens)")
    ok &= same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
