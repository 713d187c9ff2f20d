"""The attention kernels behind spjax.model.attention_impl's choice.

  attend_xla     masked softmax as two einsums: every backend, every case (cache, any padding)
  attend_fused   jax.nn.dot_product_attention: cuDNN flash attention on CUDA GPUs
  attend_splash  Pallas splash attention: TPU flash attention (Pallas interpret mode elsewhere)

Dimension names as in spjax.model: B batch, L query length, S key length, H query heads, K kv heads,
G = H // K, Dh head dim.

The einsum path materialises B x H x L x S scores, and every layer's backward keeps them: on the 7B
SPIN config at 4096 tokens that alone overflows a v5p chip (docs/scale_out.md). Splash streams keys in
tiles with an online softmax and skips tiles the causal or sliding-window mask hides, so memory is
linear in L and the masked half of the work is never done.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from spjax.config import ModelConfig

_NEG = -1e30  # finite, so a fully masked (padding) query row gives uniform weights, not NaN


def attend_xla(q_BxLxHxDh, k_BxKxSxDh, v_BxKxSxDh, mask_BxLxS, *, scale: Optional[float] = None,
               softcap: float = 0.0):
    """Masked softmax attention as two einsums; scores and softmax in fp32, output in q's dtype.

    Grouped-query heads share their kv head through the G axis, so K/V are never repeated. Scores are
    q.k times scale (default Dh ** -0.5), then softcap * tanh(scores / softcap) where softcap is set (Gemma 2).
    """
    B, L, H, Dh = q_BxLxHxDh.shape
    K = k_BxKxSxDh.shape[1]
    cdt = q_BxLxHxDh.dtype
    q_BxLxKxGxDh = q_BxLxHxDh.reshape(B, L, K, H // K, Dh)
    scores = jnp.einsum("BLKGk,BKSk->BKGLS", q_BxLxKxGxDh, k_BxKxSxDh.astype(cdt),
                        preferred_element_type=jnp.float32) * (Dh ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask_BxLxS[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(cdt)
    attn_BxLxKxGxDh = jnp.einsum("BKGLS,BKSk->BLKGk", probs, v_BxKxSxDh.astype(cdt))
    return attn_BxLxKxGxDh.reshape(B, L, H, Dh)


def attend_fused(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, *, window: Optional[int], implementation: str,
                 scale: Optional[float] = None):
    """Causal self-attention through jax.nn.dot_product_attention (no cache, right-padded rows).

    implementation='cudnn' is the GPU path; 'xla' runs the same call on any backend, which is how the
    tests check on CPU that this call means the same as attend_xla on every real (unpadded) query.
    Queries past a row's length attend to what precedes them, pads included: callers ignore them.
    """
    local = None if window is None else (window - 1, 0)  # keys with q_pos - k_pos < window
    return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, is_causal=True,
                                        local_window_size=local,
                                        scale=q_BxLxHxDh.shape[-1] ** -0.5 if scale is None else scale,
                                        implementation=implementation)


# ---------------------------------------------------------------------------------------------
# Splash attention (jax.experimental.pallas.ops.tpu.splash_attention)

_LANES = 128  # TPU vector lanes: splash tiles are multiples of this, so L is padded up to one
_TILES = (512, 256, 128)  # the largest that divides the padded length; 512 fills a v5p MXU pass well


def target_platform() -> str:
    """The platform programs are traced for: the context mesh's devices, else the default backend.

    compile_check traces under a mesh of compile-only TPU devices on a CPU host, so the kernel choice
    follows the devices the program is built for, not the machine that builds it.
    """
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def splash_placeable() -> bool:
    """Whether a splash call can be placed: a Mosaic kernel cannot be split by XLA's partitioner, so
    over several devices it needs the context mesh (jax.sharding.use_abstract_mesh / jax.set_mesh)
    to run per shard under shard_map."""
    return not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1


def segment_ids(kv_mask_BxS, segment_ids_BxS=None):
    """int32 [B, S] segment ids for splash: the given ids (positive) on valid tokens, 0 on padding.

    Attention stays within a segment, so no real token sees a pad. A pad query sees pads only, at least
    itself (causal keeps the diagonal), so no softmax row is empty; its output is unspecified.
    """
    ids_BxS = jnp.ones(kv_mask_BxS.shape, jnp.int32) if segment_ids_BxS is None else segment_ids_BxS
    return jnp.where(kv_mask_BxS.astype(bool), ids_BxS.astype(jnp.int32), 0)


def _kernel(num_heads: int, length: int, window: Optional[int], interpret: bool, softcap: float):
    """A splash kernel over [H, length, Dh] queries and [K, length, Dh] keys/values (GQA: query head h
    reads kv head h // (H // K) inside the kernel, nothing is repeated)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    t = next(t for t in _TILES if length % t == 0)
    sizes = sa.BlockSizes(block_q=t, block_kv=t, block_kv_compute=t, block_q_dkv=t, block_kv_dkv=t,
                          block_kv_dkv_compute=t, block_q_dq=t, block_kv_dq=t)
    shape = (length, length)
    # LocalMask((w - 1, 0)) keeps keys with 0 <= q - k < w: causal plus Mistral's window, as attend_xla.
    one = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), 0)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * num_heads), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, interpret=interpret, attn_logits_soft_cap=softcap or None)


def _specs(mesh, q_shape, kv_shape):
    """shard_map specs: rows over the data axes, heads over tensor where both H and K split evenly."""
    from spjax import sharding as shd
    if not set(shd.AXES) <= set(mesh.axis_names):  # a foreign mesh: whole arrays on every device
        return P(), P(), P()
    q_spec = shd.logical_to_spec(P("batch", "length", "heads", "head_dim"), q_shape, mesh)
    kv_spec = shd.logical_to_spec(P("batch", "length", "kv_heads", "head_dim"), kv_shape, mesh)
    if q_spec[2] != kv_spec[2]:  # a shard's query heads must find their kv heads in the same shard
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    return q_spec, kv_spec, P(q_spec[0], None)


def attend_splash(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL, *, window: Optional[int] = None,
                  interpret: Optional[bool] = None, scale: Optional[float] = None, softcap: float = 0.0):
    """Causal self-attention within segments (keys with q - k < window when given), by splash attention.

    Queries and keys share slots 0..L-1; the window counts slots, which equals attend_xla's count of
    positions wherever positions go up by one within a segment (default positions, left-padded
    prompts, packed pairs). segment_ids_BxL: `segment_ids`' output (0 marks padding). Outputs at
    padding are unspecified. interpret (default: unless tracing for TPU) runs the kernel in Pallas'
    interpreter, which is how CPU tests check it against attend_xla.
    """
    B, L, H, Dh = q_BxLxHxDh.shape
    if interpret is None:
        interpret = target_platform() != "tpu"
    pad = -L % _LANES
    if pad:  # padding slots join segment 0: hidden from every real token
        q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                              for x in (q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh))
        segment_ids_BxL = jnp.pad(segment_ids_BxL, ((0, 0), (0, pad)))
    Lp = L + pad
    window = None if window is None or window >= Lp else window  # a window that never binds: plain causal
    q_BxLxHxDh = q_BxLxHxDh * jnp.asarray(Dh ** -0.5 if scale is None else scale, q_BxLxHxDh.dtype)  # (not the kernel)

    def per_shard(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, seg_BxL):
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
        kernel = _kernel(q_BxLxHxDh.shape[2], Lp, window, interpret, softcap)

        def one_row(q_LxHxDh, k_LxKxDh, v_LxKxDh, seg_L):  # the kernel takes one sequence, heads first
            out_HxLxDh = kernel(q_LxHxDh.transpose(1, 0, 2), k_LxKxDh.transpose(1, 0, 2),
                                v_LxKxDh.transpose(1, 0, 2), segment_ids=SegmentIds(q=seg_L, kv=seg_L))
            return out_HxLxDh.transpose(1, 0, 2)

        return jax.vmap(one_row)(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, seg_BxL)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # run per shard: XLA cannot partition the kernel itself
        q_spec, kv_spec, seg_spec = _specs(mesh, q_BxLxHxDh.shape, k_BxLxKxDh.shape)
        per_shard = jax.shard_map(per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                                  out_specs=q_spec, check_vma=False)
    out_BxLxHxDh = per_shard(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL)
    return out_BxLxHxDh[:, :L]


# ---------------------------------------------------------------------------------------------
# Which kernel serves a call (spjax.model asks per attention call, at trace time)


def _gpu_is_cuda() -> bool:
    if jax.default_backend() != "gpu":
        return False
    try:
        return "rocm" not in jax.devices()[0].client.platform_version.lower()
    except Exception:  # noqa: BLE001 - an unknown client: assume CUDA, the usual GPU
        return True


def attention_impl(cfg: ModelConfig, *, cached: bool, right_padded: bool, q_len: int,
                   default_positions: bool = True, prefill: bool = False, segmented: bool = False,
                   layer_slots: int = 0) -> str:
    """'splash', 'cudnn', 'triton' or 'xla' for one attention call, decided at trace time from the target
    and shapes.

    cuDNN's flash kernel (never materialises the [L, S] scores: memory linear in L, and it skips
    the masked half) runs on CUDA GPUs for a bf16/fp16 forward without a cache over a right-padded
    batch (valid tokens first: causality alone then hides every pad key from every real query),
    head_dim a multiple of 8 up to 128, and a sliding window only where positions are the default
    0..L-1, and no soft cap on the scores (Gemma 2). Everything else (CPU, fp32, cached decode, left
    padding) takes the XLA path.
    cfg.attention (part of the jit cache key, validated by ModelConfig) overrides the backend check:
    auto decides as above; xla forces the einsum path everywhere; cudnn asks for cuDNN wherever the
    call qualifies (jax raises where cuDNN cannot run); xla_fused runs the cuDNN path's
    jax.nn.dot_product_attention call with implementation='xla' (a CPU check of it).
    Splash (spjax.attention; auto on TPU targets, splash forces it, in Pallas' interpreter off TPU)
    serves any padding and segments (packed rows), without a cache or in a prefill (`prefill`: cache
    index 0, attending exactly its own L slots); its window counts slots, so a binding window needs
    positions that go up by one within a segment: default, a prefill's, or promised by `segmented`.
    The Triton decode kernel (spjax.decode_attention; auto on CUDA GPUs in bf16/fp16, triton forces it,
    in Pallas' interpreter off GPU) serves one token a row over each layer's own KV buffer, attending all
    of its slots (`layer_slots`: that buffer's S, 0 otherwise), without a soft cap or a window that binds.
    """
    mode = cfg.attention
    if cached and q_len == 1 and layer_slots and mode in ("auto", "triton"):
        from spjax import decode_attention
        window_binds = any(cfg.windowed) and cfg.sliding_window is not None and cfg.sliding_window < layer_slots
        if (not cfg.attn_softcap and not window_binds and decode_attention.supported(cfg.head_dim, layer_slots)
                and (mode == "triton" or (cfg.compute_dtype in ("bfloat16", "float16") and target_platform() == "gpu"
                                          and splash_placeable() and _gpu_is_cuda()))):
            return "triton"
    window_ok = cfg.sliding_window is None or cfg.sliding_window >= q_len or default_positions
    if mode == "splash" or (mode == "auto" and target_platform() == "tpu" and splash_placeable()):
        if (not cached or prefill) and (window_ok or prefill or segmented):
            return "splash"
    fused_ok = not cached and right_padded and not segmented and window_ok and not cfg.attn_softcap
    if mode == "xla_fused":
        return "xla_fused" if fused_ok else "xla"
    cudnn_ok = (fused_ok and cfg.compute_dtype in ("bfloat16", "float16")
                and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128)
    if mode == "xla" or not cudnn_ok:
        return "xla"
    return "cudnn" if mode == "cudnn" or _gpu_is_cuda() else "xla"
