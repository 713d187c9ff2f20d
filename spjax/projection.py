"""A decoder's projections: a param born with logical axis names, and einsum(x, W) over a base that may be
quantized, plus the LoRA term where the config targets that projection.

spjax.model builds every layer's weights through `project`; spjax.tensor_names draws a fresh adapter's A
with `lora_a_init`, PEFT's initialisation.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spjax import quant
from spjax.quant import QMAX


def param(module, name, shape, axes, init, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


NORMAL = nn.initializers.normal(0.02)


def lora_a_init(key, shape, dtype=jnp.float32, lead: int = 0):
    """PEFT's default for A (kaiming-uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)) over [*lead, *in, r] (lead: a
    mixture's expert axis, each expert's A its own Linear's in PEFT)."""
    bound = 1.0 / np.sqrt(np.prod(shape[lead:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def lora_delta(a, b, scale: float, batch: int):
    """scale · A B of adapters a [*batch, *in, r] and b [*batch, r, *out] (numpy or jax), as [*batch, in, out]
    (batch: the leading axes that pair each A with its own B: layers, experts); the caller reshapes it."""
    r, lead = a.shape[-1], a.shape[:batch]
    return (a.reshape(*lead, -1, r) @ b.reshape(*lead, r, -1)) * scale


def expert_adapters(module, name: str, shape, axes):
    """(A [E, in, r], B [E, r, out]) of expert weight `name` [E, in, out] where cfg.lora targets it, else None:
    fp32, as project's, each expert's A drawn with its own fan-in."""
    lora = module.cfg.lora
    if not (lora.rank and name in lora.targets):
        return None
    (E, n_in, n_out), r = shape, lora.rank_of(name)
    a = param(module, name + "_lora_a", (E, n_in, r), (axes[0], axes[1], "lora"),
              lambda key, shape, dtype: lora_a_init(key, shape, dtype, lead=1), jnp.float32)
    b = param(module, name + "_lora_b", (E, r, n_out), (axes[0], "lora", axes[2]), nn.initializers.zeros,
              jnp.float32)
    return a, b


def _quant_init(kind):
    # A random quantized base (tests, benches): uniform integers whose dequantized std is 0.02.
    def init(key, shape, dtype):
        if kind == "int4":
            return jax.random.randint(key, shape, 0, 256, jnp.int32).astype(dtype)  # two nibbles a byte
        return jax.random.randint(key, shape, -QMAX[kind], QMAX[kind] + 1, jnp.int32).astype(dtype)
    return init


def weight(module, name: str, shape, axes, n_in: int, lead: int = 0):
    """(stored leaves, read) of a base weight [*lead, *in, *out]: `read(*stored)` is it in the compute dtype,
    dequantized where cfg.base_quant asks (lead: axes before the inputs, each quantized on its own: a mixture
    of experts' expert axis)."""
    cfg = module.cfg
    pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
    kind = cfg.base_quant
    if kind == "none":
        return (param(module, name, shape, axes, NORMAL, pdt),), lambda w: w.astype(cdt)
    stored = (param(module, name, quant.stored_shape(kind, shape, n_in, lead), axes, _quant_init(kind),
                    quant.storage_dtype(kind)),
              param(module, name + "_scale", tuple(shape[:lead]) + quant.scale_shape(kind, shape[lead:], n_in),
                    tuple(axes[:lead]) + ("quant_groups",) + tuple(axes[lead + n_in:]),
                    nn.initializers.constant(0.02 * np.sqrt(3) / QMAX[kind]), jnp.float32))
    return stored, lambda q, scale: quant.dequantize(q, scale, kind, n_in, lead, dtype=cdt)


def project(module, name: str, eq: str, x, shape, axes):
    """einsum(eq, x, W) for projection `name` with W [*in, *out]: the base weight dequantized when
    cfg.base_quant asks, plus the LoRA term (alpha / r) (x A) B when cfg.lora targets it.

    The adapter is applied on the fly (two thin matmuls through rank r), so the base is never
    rewritten and its gradient is never formed: the train step differentiates the adapters only.
    """
    cfg = module.cfg
    cdt = jnp.dtype(cfg.compute_dtype)
    x_spec, w_spec = eq.split("->")[0].split(",")
    n_in = sum(c in x_spec for c in w_spec)
    stored, read = weight(module, name, shape, axes, n_in)
    base = lambda x, *stored: jnp.einsum(eq, x, read(*stored))  # noqa: E731
    lora = cfg.lora
    if lora.rank:
        # A frozen base: the backward pass recomputes the cast/dequantized weight from the stored
        # leaf instead of keeping a compute-dtype copy of every layer's weight as a residual (for an
        # int8 base that copy would be larger than the base itself).
        base = jax.checkpoint(base)
    y = base(x, *stored)
    if lora.rank and name in lora.targets:
        r, w_in, w_out = lora.rank, w_spec[:n_in], w_spec[n_in:]
        batch = "".join(c for c in x_spec if c not in w_in)
        # Adapters stay fp32 whatever the base's dtype: they are small, and they are what trains.
        a = param(module, name + "_lora_a", tuple(shape[:n_in]) + (r,), tuple(axes[:n_in]) + ("lora",),
                   lora_a_init, jnp.float32)
        b = param(module, name + "_lora_b", (r,) + tuple(shape[n_in:]), ("lora",) + tuple(axes[n_in:]),
                   nn.initializers.zeros, jnp.float32)
        xa = jnp.einsum(f"{x_spec},{w_in}r->{batch}r", x, a.astype(cdt))
        y = y + jnp.einsum(f"{batch}r,r{w_out}->{eq.split('->')[1]}", xa * (lora.alpha / r), b.astype(cdt))
    return y
