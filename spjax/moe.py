"""The mixture-of-experts MLP of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE: a router picks k of E SwiGLU experts for each
token (Qwen2-MoE adds a shared expert every token takes: spjax.model).

Dimension names: T tokens, E experts, k experts a token, A = T * k assignments, D model width, F an
expert's width.

As transformers computes it: router logits x W_r in the compute dtype, a float32 softmax, the k largest
probabilities (renormalized to sum to 1 where cfg.norm_topk), and the token's output their weighted sum of
its experts' down(silu(x W_gate) * (x W_up)) (summed in float32, then cast). The assignments are sorted by
expert, and each expert's run meets its weights in one grouped matmul (jax.lax.ragged_dot): exact (no
capacity, no token dropped), and E / k times fewer FLOPs than every expert on every token. Adapted experts
(lora.targets experts_gate/up/down) add each expert's low-rank term in the same grouping: two more grouped
matmuls through rank r, scale · ((x A_e) B_e), so the experts' weights are never rewritten.

Under a context mesh (a run and compile_check trace under one: jax.sharding.use_abstract_mesh) the
dispatch runs per shard of the batch rows (shard_map), so each data-parallel device sorts its own tokens
rather than all of them; the experts' weights come whole over fsdp, as every FSDP layer's do, and stay
split over tensor along F, where each device's partial outputs are summed. Without a mesh (one device,
a test's forward) it runs over the whole batch.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from spjax.config import ModelConfig

# The grouped matmuls' inputs and outputs, named for a remat policy that keeps them and remakes the rest
# (spjax.model: a quantized base's experts are dequantized again rather than kept in the compute dtype).
ACTIVATIONS = "moe_activations"


def route(x_TxD, router_DxE, k: int, norm: bool):
    """(float32 weights [T, k], expert ids [T, k]) of each token's k chosen experts."""
    logits_TxE = jnp.einsum("TD,DE->TE", x_TxD, router_DxE)
    weight_Txk, expert_Txk = jax.lax.top_k(jax.nn.softmax(logits_TxE.astype(jnp.float32), axis=-1), k)
    if norm:
        weight_Txk = weight_Txk / jnp.sum(weight_Txk, axis=-1, keepdims=True)
    return weight_Txk, expert_Txk


def experts(x_TxD, weight_Txk, expert_Txk, gate_ExDxF, up_ExDxF, down_ExFxD, adapters=(None,) * 3, scale=1.0):
    """float32 [T, D]: each token's weighted sum of its experts' outputs (adapters: (A [E, in, r], B [E, r, out])
    or None for each of gate, up, down; each expert's own low-rank term scale · (x A_e) B_e added)."""
    (T, k), E = expert_Txk.shape, gate_ExDxF.shape[0]
    expert_A = expert_Txk.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)  # assignments grouped by expert, in token order within one
    x_AxD = checkpoint_name(jnp.take(x_TxD, order_A // k, axis=0), ACTIVATIONS)
    sizes_E = jnp.bincount(expert_A, length=E).astype(jnp.int32)

    def grouped(x_AxN, w_ExNxM, adapter):  # each assignment times its expert's weight (and adapter)
        y_AxM = jax.lax.ragged_dot(x_AxN, w_ExNxM, sizes_E)
        if adapter is not None:
            a_ExNxr, b_ExrxM = (w.astype(x_AxN.dtype) for w in adapter)
            xa_Axr = checkpoint_name(jax.lax.ragged_dot(x_AxN, a_ExNxr, sizes_E), ACTIVATIONS)
            y_AxM = y_AxM + jax.lax.ragged_dot(xa_Axr * scale, b_ExrxM, sizes_E)
        return checkpoint_name(y_AxM, ACTIVATIONS)

    gate_AxF = grouped(x_AxD, gate_ExDxF, adapters[0])
    up_AxF = grouped(x_AxD, up_ExDxF, adapters[1])
    y_AxD = grouped(nn.silu(gate_AxF) * up_AxF, down_ExFxD, adapters[2])
    back_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(T * k, dtype=order_A.dtype))  # order's inverse
    y_TxkxD = jnp.take(y_AxD, back_A, axis=0).reshape(T, k, -1)
    return jnp.einsum("TkD,Tk->TD", y_TxkxD.astype(jnp.float32), weight_Txk)


def _local(cfg: ModelConfig, x_BxLxD, router_DxE, gate_ExDxF, up_ExDxF, down_ExFxD, adapters, tensor=None):
    B, L, D = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(B * L, D)
    weight_Txk, expert_Txk = route(x_TxD, router_DxE, cfg.experts_per_token, cfg.norm_topk)
    scale = cfg.lora.scale_of("experts_gate") if cfg.lora.rank else 1.0  # (every expert adapter's rank: expert_rank)
    y_TxD = experts(x_TxD, weight_Txk, expert_Txk, gate_ExDxF, up_ExDxF, down_ExFxD, adapters, scale)
    if tensor:  # each device summed its slice of F (down's adapter too: (x A) B is linear in x A): the whole sum
        y_TxD = jax.lax.psum(y_TxD, tensor)  # (before the cast, as unsplit)
    return y_TxD.astype(x_BxLxD.dtype).reshape(B, L, D)


def mlp(cfg: ModelConfig, x_BxLxD, router_DxE, gate_ExDxF, up_ExDxF, down_ExFxD, adapters=(None,) * 3):
    """[B, L, D] -> [B, L, D]: the mixture of experts, per shard of the rows under a context mesh (adapters:
    as experts')."""
    from spjax import sharding as shd
    mesh = jax.sharding.get_abstract_mesh()
    weights = (router_DxE, gate_ExDxF, up_ExDxF, down_ExFxD, list(adapters))
    if mesh.empty or not set(shd.AXES) <= set(mesh.axis_names):
        return _local(cfg, x_BxLxD, *weights)
    dp, tp, F = mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["tensor"], gate_ExDxF.shape[-1]
    if x_BxLxD.shape[0] % dp:  # (rows that do not split: the whole batch on every device, as XLA places it)
        return _local(cfg, x_BxLxD, *weights)
    tensor = "tensor" if tp > 1 and F % tp == 0 else None
    rows, f_out, f_in = P(shd.BATCH), P(None, None, tensor), P(None, tensor)  # F: gate/up's outputs, down's inputs
    adapter_specs = [None if a is None else s for a, s in zip(adapters, ((P(), f_out), (P(), f_out), (f_in, P())))]
    per_shard = jax.shard_map(functools.partial(_local, cfg, tensor=tensor), mesh=mesh,
                              in_specs=(rows, P(), f_out, f_out, f_in, adapter_specs),
                              out_specs=rows, check_vma=False)
    return per_shard(x_BxLxD, *weights)
