"""The sampler's one-token attention step, fused with writing that token's key and value: a Pallas
(Triton) kernel for CUDA GPUs, run by Pallas' interpreter elsewhere (how the CPU tests check it).

Why a kernel: on an H200 (1B shape, batch 64, a KV buffer per layer) each layer's decode attention took
five to six XLA kernels: two cache updates, the scores' batched matmul, a masked softmax, the
probabilities' matmul, each over all S slots of the buffer, live or not (docs/perf.md). This is one launch
a layer, and it reads only the slots below the new token's: the live prefix, about 3/4 of the buffer
on average over a 256 + 256 run.

One program per (row, kv head): its G query heads (padded to Gq, a power of two >= 16, for the
tensor-core dot) walk the slots [0, slot) in blocks of T with an online softmax (flash decoding), then
add the new token, whose key and value come in as inputs (registers, not a re-read of the buffer).
The same program writes them into the buffer at `slot`: the buffers are aliased in and out, so XLA
updates them in place, and no program reads a slot another one writes.

Dimension names as in spjax.model: B batch, K kv heads, G = H // K, S slots, Dh head dim; T slots a block.
The environment variable SPJAX_DECODE_KERNEL="block=128,warps=8,stages=3,splits=4" (any of them) overrides
the tuning, read when a program is traced: for benchmarks (bench/sampler.py), one setting per process.
splits > 1 (not the default; untried on a GPU as yet) gives each (row, kv head) that many programs, each
over its share of the slots, as flash decoding does, and combines their partial sums after the kernel.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from spjax import attention

_NEG = -1e30  # finite: a block with no live slot keeps its running max finite
_BLOCKS = (64, 32, 16)  # slots a block: the largest that divides S (Triton's dot takes 16 at least)


def _tuning(slots: int) -> dict:
    """Slots a block (the largest of _BLOCKS dividing S), warps, pipeline stages and programs a (row, kv head)
    (each its share of the slots: flash decoding's splits, combined by XLA after the kernel), unless overridden."""
    tune = dict(block=next(t for t in _BLOCKS if slots % t == 0), warps=4, stages=3, splits=1)
    for item in filter(None, os.environ.get("SPJAX_DECODE_KERNEL", "").split(",")):
        name, _, value = item.partition("=")
        if name not in tune or not value.isdigit():
            raise ValueError(f"SPJAX_DECODE_KERNEL: {item!r} is not one of block=, warps=, stages=, splits= with a "
                             f"number")
        tune[name] = int(value)
    if tune["splits"] < 1 or slots % (tune["block"] * tune["splits"]):
        raise ValueError(f"SPJAX_DECODE_KERNEL: {tune['splits']} splits of blocks of {tune['block']} do not divide "
                         f"the {slots} slots")
    return tune


def supported(head_dim: int, slots: int) -> bool:
    """Whether the kernel takes these shapes: Triton's blocks are powers of two, its dot's sides >= 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and slots % _BLOCKS[-1] == 0


def _kernel(slot_ref, q_ref, k_new_ref, v_new_ref, mask_ref, k_ref, v_ref, *out_refs, groups: int, scale: float,
            block: int, splits: int):
    """One (row, kv head)'s attention over its share of the slots below `slot` (all of them unless split),
    plus the new token (in the last split). Unsplit it stores the output; split, its unnormalised sum,
    running max and softmax denominator for the combine."""
    k_out_ref, v_out_ref = out_refs[-2:]
    j = pl.program_id(2) if splits > 1 else 0
    slot = slot_ref[()]
    Gq = out_refs[0].shape[0]
    rows_Gq = jnp.arange(Gq) < groups  # padding rows: loaded as 0, never stored
    q_GqxDh = plgpu.load(q_ref.at[pl.ds(0, Gq), :], mask=rows_Gq[:, None], other=0)
    k_new_Dh, v_new_Dh = k_new_ref[...], v_new_ref[...]
    exact = False if q_GqxDh.dtype == jnp.float32 else None  # fp32 in, fp32 products (not TF32); fp32 out always
    # The new token's key and value go to its slot (this program's row and kv head only; the first split).
    first_1xDh = jnp.full((1, k_new_Dh.shape[0]), j == 0) if splits > 1 else None
    plgpu.store(k_out_ref.at[pl.ds(slot, 1), :], k_new_Dh[None, :], mask=first_1xDh)
    plgpu.store(v_out_ref.at[pl.ds(slot, 1), :], v_new_Dh[None, :], mask=first_1xDh)

    def attend(i, carry):  # slots [i * T, (i + 1) * T), those below `slot` and valid in the mask
        acc_GqxDh, max_Gq, sum_Gq = carry
        at = pl.ds(i * block, block)
        live_T = (mask_ref[at] != 0) & (i * block + jnp.arange(block) < slot)
        # Masked loads: a dead slot is neither read (bandwidth) nor able to poison the sums (stale NaN).
        k_TxDh = plgpu.load(k_ref.at[at, :], mask=live_T[:, None], other=0)
        s_GqxT = jnp.where(live_T[None, :], plgpu.dot(q_GqxDh, k_TxDh, trans_b=True, allow_tf32=exact) * scale, _NEG)
        new_max_Gq = jnp.maximum(max_Gq, jnp.max(s_GqxT, axis=1))
        p_GqxT = jnp.where(live_T[None, :], jnp.exp(s_GqxT - new_max_Gq[:, None]), 0.0)
        fix_Gq = jnp.exp(max_Gq - new_max_Gq)
        v_TxDh = plgpu.load(v_ref.at[at, :], mask=live_T[:, None], other=0)
        acc_GqxDh = acc_GqxDh * fix_Gq[:, None] + plgpu.dot(p_GqxT.astype(v_TxDh.dtype), v_TxDh, allow_tf32=exact)
        return acc_GqxDh, new_max_Gq, sum_Gq * fix_Gq + jnp.sum(p_GqxT, axis=1)

    Dh = q_GqxDh.shape[1]
    init = (jnp.zeros((Gq, Dh), jnp.float32), jnp.full((Gq,), _NEG, jnp.float32), jnp.zeros((Gq,), jnp.float32))
    lo, hi = 0, pl.cdiv(slot, block)
    if splits > 1:  # this split's share of the blocks
        per_split = k_ref.shape[0] // (block * splits)
        lo, hi = j * per_split, jnp.minimum(j * per_split + per_split, hi)
    acc_GqxDh, max_Gq, sum_Gq = jax.lax.fori_loop(lo, hi, attend, init)
    # The new token, from its inputs (in the last split).
    s_Gq = jnp.sum(q_GqxDh.astype(jnp.float32) * k_new_Dh.astype(jnp.float32)[None, :], axis=1) * scale
    live = mask_ref[pl.ds(slot, 1)] != 0  # [1]
    if splits > 1:
        live &= j == splits - 1
    new_max_Gq = jnp.maximum(max_Gq, jnp.where(live, s_Gq, _NEG))
    p_Gq = jnp.where(live, jnp.exp(s_Gq - new_max_Gq), 0.0)
    fix_Gq = jnp.exp(max_Gq - new_max_Gq)
    acc_GqxDh = acc_GqxDh * fix_Gq[:, None] + p_Gq[:, None] * v_new_Dh.astype(jnp.float32)[None, :]
    sum_Gq = sum_Gq * fix_Gq + p_Gq
    if splits > 1:  # the combine normalises
        acc_ref, max_ref, sum_ref = out_refs[:3]
        plgpu.store(acc_ref.at[pl.ds(0, Gq), :], acc_GqxDh, mask=rows_Gq[:, None])
        plgpu.store(max_ref.at[pl.ds(0, Gq)], new_max_Gq, mask=rows_Gq)
        plgpu.store(sum_ref.at[pl.ds(0, Gq)], sum_Gq, mask=rows_Gq)
        return
    out_GqxDh = acc_GqxDh / jnp.where(sum_Gq > 0, sum_Gq, 1.0)[:, None]  # no live slot at all: zeros
    plgpu.store(out_refs[0].at[pl.ds(0, Gq), :], out_GqxDh.astype(out_refs[0].dtype), mask=rows_Gq[:, None])


def attend_decode(q_BxHxDh, k_new_BxKxDh, v_new_BxKxDh, mask_BxS, k_BxKxSxDh, v_BxKxSxDh, slot, *, scale: float,
                  interpret: bool | None = None):
    """One new token per row at `slot` (a traced int32 scalar): (attention [B, H, Dh], k and v buffers
    with the new key and value written at `slot`).

    The token attends to the slots s <= slot with mask_BxS[b, s] set (the new token's own slot included,
    as model.Block's causal mask over the buffer). Scores are q.k times scale in fp32, probabilities cast
    to the values' dtype for their matmul, the output in q's dtype. A row with no attended slot gets zeros
    (attend_xla gives it a uniform average; the sampler never asks for one). interpret: default off a GPU.
    Under a context mesh the kernel runs per shard (rows over the data axes, kv heads over tensor).
    """
    B, H, Dh = q_BxHxDh.shape
    _, K, S, _ = k_BxKxSxDh.shape
    if not supported(Dh, S):
        raise ValueError(f"decode attention kernel: head_dim {Dh} and {S} slots are not supported")
    if interpret is None:
        interpret = attention.target_platform() != "gpu"
    run = functools.partial(_call, scale=scale, interpret=interpret)
    args = (jnp.broadcast_to(jnp.asarray(slot, jnp.int32), (B,)), q_BxHxDh, k_new_BxKxDh.astype(k_BxKxSxDh.dtype),
            v_new_BxKxDh.astype(v_BxKxSxDh.dtype), mask_BxS.astype(jnp.int32), k_BxKxSxDh, v_BxKxSxDh)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # XLA cannot split a kernel: run it on each device's rows and heads
        q_spec, kv_spec, mask_spec = attention._specs(mesh, (B, 1, H, Dh), (B, 1, K, Dh))
        q_spec, new_spec = P(q_spec[0], q_spec[2], None), P(kv_spec[0], kv_spec[2], None)
        cache_spec = P(kv_spec[0], kv_spec[2], None, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(P(mask_spec[0]), q_spec, new_spec, new_spec, mask_spec,
                                                      cache_spec, cache_spec),
                            out_specs=(q_spec, cache_spec, cache_spec), check_vma=False)
    return run(*args)


def _call(slot_B, q_BxHxDh, k_new_BxKxDh, v_new_BxKxDh, mask_BxS, k_BxKxSxDh, v_BxKxSxDh, *, scale, interpret):
    B, H, Dh = q_BxHxDh.shape
    _, K, S, _ = k_BxKxSxDh.shape
    G = H // K
    Gq = max(16, 1 << (G - 1).bit_length())
    tune = _tuning(S)
    n = tune["splits"]
    row = lambda *tail: (lambda b, h, *j: (b, h) + (0,) * len(tail))  # noqa: E731: block index of (row, kv head)
    kv_spec = pl.BlockSpec((None, None, S, Dh), row(0, 0))
    if n == 1:
        out_specs = [pl.BlockSpec((None, None, Gq, Dh), row(0, 0))]
        out_shape = [jax.ShapeDtypeStruct((B, K, G, Dh), q_BxHxDh.dtype)]
    else:  # each split's unnormalised sum, max and denominator, rows past G never stored
        out_specs = [pl.BlockSpec((None, None, None, Gq, Dh), lambda b, h, j: (b, h, j, 0, 0)),
                     pl.BlockSpec((None, None, None, Gq), lambda b, h, j: (b, h, j, 0)),
                     pl.BlockSpec((None, None, None, Gq), lambda b, h, j: (b, h, j, 0))]
        out_shape = [jax.ShapeDtypeStruct((B, K, n, G, Dh), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, n, G), jnp.float32), jax.ShapeDtypeStruct((B, K, n, G), jnp.float32)]
    *parts, k_BxKxSxDh, v_BxKxSxDh = pl.pallas_call(
        functools.partial(_kernel, groups=G, scale=scale, block=tune["block"], splits=n),
        grid=(B, K) if n == 1 else (B, K, n),
        in_specs=[pl.BlockSpec((None,), lambda b, h, *j: (b,)),
                  pl.BlockSpec((None, None, Gq, Dh), row(0, 0)),  # rows past G: masked loads
                  pl.BlockSpec((None, None, Dh), row(0)), pl.BlockSpec((None, None, Dh), row(0)),
                  pl.BlockSpec((None, S), lambda b, h, *j: (b, 0)), kv_spec, kv_spec],
        out_specs=out_specs + [kv_spec, kv_spec],
        out_shape=out_shape + [jax.ShapeDtypeStruct(k_BxKxSxDh.shape, k_BxKxSxDh.dtype),
                               jax.ShapeDtypeStruct(v_BxKxSxDh.shape, v_BxKxSxDh.dtype)],
        input_output_aliases={5: len(out_shape), 6: len(out_shape) + 1},  # the buffers, updated in place
        compiler_params=plgpu.CompilerParams(num_warps=tune["warps"], num_stages=tune["stages"]),
        interpret=interpret,
        name="spjax_decode_attention",
    )(slot_B, q_BxHxDh.reshape(B, K, G, Dh), k_new_BxKxDh, v_new_BxKxDh, mask_BxS, k_BxKxSxDh, v_BxKxSxDh)
    if n == 1:
        return parts[0].reshape(B, H, Dh), k_BxKxSxDh, v_BxKxSxDh
    acc_BxKxnxGxDh, max_BxKxnxG, sum_BxKxnxG = parts
    top_BxKx1xG = jnp.max(max_BxKxnxG, axis=2, keepdims=True)
    w_BxKxnxG = jnp.exp(max_BxKxnxG - top_BxKx1xG)  # each split's scale to the common max
    total_BxKxG = jnp.sum(w_BxKxnxG * sum_BxKxnxG, axis=2)
    out_BxKxGxDh = jnp.sum(w_BxKxnxG[..., None] * acc_BxKxnxGxDh, axis=2) / jnp.where(
        total_BxKxG > 0, total_BxKxG, 1.0)[..., None]
    return out_BxKxGxDh.astype(q_BxHxDh.dtype).reshape(B, H, Dh), k_BxKxSxDh, v_BxKxSxDh
