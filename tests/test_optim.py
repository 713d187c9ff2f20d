"""spjax.optim's fused optimizer against the optax chain it replaces, and its non-finite skip."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spjax import optim
from spjax.config import OptimConfig


def _tree(key, scale):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"layers": {"w": scale * jax.random.normal(k1, (3, 8, 4)),
                       "attn_norm": scale * jax.random.normal(k2, (3, 8))},
            "embed": scale * jax.random.normal(k3, (16, 8))}


@pytest.mark.parametrize("name,clip", [("adamw", 1.0), ("adamw", 0.0), ("rmsprop", 0.5)])
def test_fused_matches_optax_chain(name, clip):
    cfg = OptimConfig(name=name, lr=1e-2, warmup_frac=0.25, schedule="cosine", weight_decay=0.1, clip_norm=clip)
    ours, ref = optim.make_optimizer(cfg, 8), optim.legacy_optimizer(cfg, 8)
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


@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_bf16_params_keep_their_state_types(name):
    """bf16 params (fp32 gradients, as the step computes them): the moments stay bf16, as created and as
    checkpoints' abstract state says, so the jitted step compiles once (before: fp32 after a step)."""
    opt = optim.make_optimizer(OptimConfig(name=name, lr=1e-2, warmup_frac=0.0), 8)
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(jax.random.key(0), 1.0))
    update = jax.jit(opt.update)
    s0 = s = opt.init(p)
    for i in range(2):
        s = update(_tree(jax.random.key(i + 1), 1.0), s, p)[1]
    assert jax.tree.map(lambda x: x.dtype, s) == jax.tree.map(lambda x: x.dtype, s0)
    assert update._cache_size() == 1


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


def test_checkpoint_of_the_former_optax_state_restores_converted(tmp_path):
    """A run checkpointed before spjax.optim resumes: its optax-chain state is read and converted,
    and the next update equals what the former optimizer would have done."""
    from spjax import checkpoint, model, saving, sharding, step
    from spjax.config import MeshConfig, ModelConfig
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    opt_cfg = OptimConfig(lr=1e-2, warmup_frac=0.5, schedule="linear", weight_decay=0.1)
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    former = optim.legacy_optimizer(opt_cfg, 100)  # in warmup: the lr moves every step
    params = model.init_params(cfg, jax.random.key(0))
    # Jitted: run op by op, the updates below compiled ~390 one-op programs (13 s of this test's 20).
    grads = jax.jit(lambda i: jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape), params))
    former_step = jax.jit(former.update)
    opt_state = jax.jit(former.init)(params)
    for i in range(3):
        u, opt_state = former_step(grads(i), opt_state, params)
        params = optax.apply_updates(params, u)
    saved = step.TrainState(params=params, opt_state=opt_state, step=jnp.int32(3), skipped=jnp.int32(0))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(3, saved, {"round": 0})
    state, meta = saving.restore_latest(ckpt, cfg, opt_cfg, mesh)
    assert meta["round"] == 0 and isinstance(state.opt_state, optim.OptState) and int(state.opt_state.count) == 3
    np.testing.assert_allclose(state.opt_state.lr, opt_state.hyperparams["learning_rate"], rtol=1e-7)
    assert float(state.opt_state.lr) > 0
    u_old = optax.apply_updates(params, former_step(grads(9), opt_state, params)[0])
    new_step = jax.jit(optim.make_optimizer(opt_cfg, 100).update)
    u_new = optax.apply_updates(state.params, new_step(grads(9), state.opt_state, state.params)[0])
    for a, b in zip(jax.tree.leaves(u_new), jax.tree.leaves(u_old)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not any("corrupt" in p.name for p in (tmp_path / "ck").iterdir())  # nothing set aside as unusable
    ckpt.close()
