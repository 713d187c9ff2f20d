"""The gated (SwiGLU) MLP, down(silu(x W_gate) * (x W_up)), with a hand-written backward pass for XLA:CPU.

Autodiff's weight gradients of the gate and up projections come out of JAX's dot_general transpose
rule as d^T x ([F, B*L] by [B*L, D]) followed by a transpose, which XLA:CPU folds into a dot that
wants d = dL/d(gate), dL/d(up) transposed: the SiLU-gradient elementwise pass is then fused with two
[F, B*L] transposes that read four inputs at a stride of F (about a tenth of a SmolLM2-135M train
step). Here they are x^T d, contracted over B, L as an einsum: XLA transposes x ([B*L, D], D < F)
once, shared by both, and the elementwise pass writes d row-major, which the dot reads as it is.

Forward values and what a remat policy sees are unchanged: the forward is the same einsums (the
"dots" policy saves gate and up as before), and the backward recomputes silu from the saved gate.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from spjax.attention import target_platform
from spjax.config import ModelConfig


def fast_path(cfg: ModelConfig) -> bool:
    """Whether Block uses gated_mlp: a plain float SwiGLU base without LoRA (the quantized and adapter paths
    keep spjax.projection.project), traced for CPU. The layout problem is XLA:CPU's: on GPU/TPU this
    would only change a program that was not measured with it (matmul operand order, sharding)."""
    return (cfg.lora.rank == 0 and cfg.base_quant == "none" and not cfg.gemma and not cfg.post_norms
            and target_platform() == "cpu")


@jax.custom_vjp
def gated_mlp(x_BxLxD, w_gate_DxF, w_up_DxF, w_down_FxD):
    """[B, L, D] -> [B, L, D]: down(silu(x W_gate) * (x W_up)), all in x's dtype."""
    return _fwd(x_BxLxD, w_gate_DxF, w_up_DxF, w_down_FxD)[0]


def _fwd(x_BxLxD, w_gate_DxF, w_up_DxF, w_down_FxD):
    gate_BxLxF = jnp.einsum("BLD,DF->BLF", x_BxLxD, w_gate_DxF)
    up_BxLxF = jnp.einsum("BLD,DF->BLF", x_BxLxD, w_up_DxF)
    y_BxLxD = jnp.einsum("BLF,FD->BLD", nn.silu(gate_BxLxF) * up_BxLxF, w_down_FxD)
    return y_BxLxD, (x_BxLxD, gate_BxLxF, up_BxLxF, w_gate_DxF, w_up_DxF, w_down_FxD)


def _bwd(res, dy_BxLxD):
    x_BxLxD, gate_BxLxF, up_BxLxF, w_gate_DxF, w_up_DxF, w_down_FxD = res
    sig_BxLxF = jax.nn.sigmoid(gate_BxLxF)
    silu_BxLxF = gate_BxLxF * sig_BxLxF
    # dW_down = a^T dy (a = silu(gate) * up) written as autodiff does, (dy^T a)^T: XLA then transposes
    # dy ([B*L, D]), the smaller operand, rather than a ([B*L, F]).
    dw_down_FxD = jnp.einsum("BLD,BLF->DF", dy_BxLxD, silu_BxLxF * up_BxLxF).T
    da_BxLxF = jnp.einsum("BLD,FD->BLF", dy_BxLxD, w_down_FxD)
    dup_BxLxF = da_BxLxF * silu_BxLxF
    dgate_BxLxF = da_BxLxF * up_BxLxF * (sig_BxLxF * (1 + gate_BxLxF * (1 - sig_BxLxF)))
    dx_BxLxD = (jnp.einsum("BLF,DF->BLD", dgate_BxLxF, w_gate_DxF)
                + jnp.einsum("BLF,DF->BLD", dup_BxLxF, w_up_DxF))
    # x^T d with x on the left, contracted over B, L (see the module docstring).
    dw_gate_DxF = jnp.einsum("BLD,BLF->DF", x_BxLxD, dgate_BxLxF)
    dw_up_DxF = jnp.einsum("BLD,BLF->DF", x_BxLxD, dup_BxLxF)
    return dx_BxLxD, dw_gate_DxF, dw_up_DxF, dw_down_FxD


gated_mlp.defvjp(_fwd, _bwd)
