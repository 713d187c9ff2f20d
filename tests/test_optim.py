"""spjax.optim's fused optimizer against the optax chain it replaces, and its non-finite skip."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spjax import optim
from spjax.config import OptimConfig


def _reference(cfg: OptimConfig, total: int):
    """The optax chain spjax used before the fused transform (same maths, separate passes)."""
    sched = optim.make_schedule(cfg, total)
    mask = optim.decay_mask if cfg.weight_decay else None

    def chain(learning_rate):
        parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
        if cfg.name == "adamw":
            parts.append(optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, mask=mask))
        else:
            parts += [optax.scale_by_rms(decay=cfg.b2, eps=cfg.eps, eps_in_sqrt=False),
                      optax.add_decayed_weights(cfg.weight_decay, mask), optax.scale_by_learning_rate(learning_rate)]
        return optax.chain(*parts)

    return optax.inject_hyperparams(chain)(learning_rate=sched)


def _tree(key, scale):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"layers": {"w": scale * jax.random.normal(k1, (3, 8, 4)),
                       "attn_norm": scale * jax.random.normal(k2, (3, 8))},
            "embed": scale * jax.random.normal(k3, (16, 8))}


@pytest.mark.parametrize("name,clip", [("adamw", 1.0), ("adamw", 0.0), ("rmsprop", 0.5)])
def test_fused_matches_optax_chain(name, clip):
    cfg = OptimConfig(name=name, lr=1e-2, warmup_frac=0.25, schedule="cosine", weight_decay=0.1, clip_norm=clip)
    ours, ref = optim.make_optimizer(cfg, 8), _reference(cfg, 8)
    p_ours = p_ref = _tree(jax.random.key(0), 1.0)
    s_ours, s_ref = ours.init(p_ours), ref.init(p_ref)
    for i in range(5):  # gradient norms around 4: clipping is active when clip > 0
        g = _tree(jax.random.key(i + 1), 0.5 + 0.1 * i)
        u, s_ours = ours.update(g, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_ref = ref.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert float(optim.learning_rate(s_ours)) == pytest.approx(float(s_ref.hyperparams["learning_rate"]), rel=1e-6)
    assert float(jnp.abs(p_ours["layers"]["w"] - _tree(jax.random.key(0), 1.0)["layers"]["w"]).max()) > 1e-3


def test_nonfinite_step_is_dropped():
    cfg = OptimConfig(lr=1e-2, warmup_frac=0.0, schedule="constant", weight_decay=0.1)
    opt = optim.make_optimizer(cfg, 8)
    p = _tree(jax.random.key(0), 1.0)
    s = opt.update(_tree(jax.random.key(1), 1.0), opt.init(p), p)[1]  # one real step first: moments non-zero
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), _tree(jax.random.key(2), 1.0))
    for grads, finite in ((bad, True), (_tree(jax.random.key(2), 1.0), False)):  # a NaN gradient; a NaN loss
        u, s2 = opt.update(grads, s, p, finite=jnp.asarray(finite))
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
        for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s)):
            np.testing.assert_array_equal(a, b)
    assert int(s.count) == 1
