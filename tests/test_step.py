"""The pair train step: sharded == unsharded, accumulated == whole batch, NaN guard, learning, one compile."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spjax import model, sharding, step
from spjax.config import MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig

# fsdp=4 divides the width 64; tensor=8 divides vocab 128 and mlp 96 (4 heads / 2 kv heads do not,
# so those stay replicated on the tensor axis).
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, tie_embeddings=False)
B, L = 8, 32
OBJ = ObjectiveConfig()  # chi2, beta 0.1, c 1
OPT = OptimConfig(lr=1e-3, warmup_frac=0.0, schedule="constant", clip_norm=1.0)
MESHES = {
    "1": None,  # one device
    "data8": MeshConfig(data=8),
    "data2xfsdp4": MeshConfig(data=2, fsdp=4),
    "tensor8": MeshConfig(data=1, tensor=8),
}


def _mesh(name):
    mesh_cfg = MESHES.get(name, name)  # a name of MESHES or a MeshConfig
    if mesh_cfg is None:
        return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    return sharding.make_mesh(mesh_cfg)


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _put_params(params_host, mesh):
    return jax.device_put(params_host, sharding.param_shardings(CFG, mesh))


@pytest.fixture(scope="module")
def params0():
    return _host(model.init_params(CFG, jax.random.key(0)))


@pytest.fixture(scope="module")
def sides(params0):
    """B pairs, right-padded to L, with prompts and responses of varying length; the references are
    the initial policy's own scores plus noise (std 3 nats), so rewards start small but nonzero."""
    rng = np.random.default_rng(0)
    out = {}
    pos = np.arange(L)[None]
    for side in ("real", "gen"):
        length = rng.integers(L // 2, L + 1, B)[:, None]
        prompt = rng.integers(2, 10, B)[:, None]
        out[f"{side}_ids_BxL"] = rng.integers(0, CFG.vocab_size, (B, L)).astype(np.int32)
        out[f"{side}_mask_BxL"] = (pos < length).astype(np.int32)
        out[f"{side}_target_BxL"] = ((pos >= prompt) & (pos < length)).astype(np.int32)
    params = _put_params(params0, _mesh("1"))
    for side in ("real", "gen"):
        lp_B = step.score(CFG, params, out[f"{side}_ids_BxL"], out[f"{side}_mask_BxL"], out[f"{side}_target_BxL"])
        out[f"ref_{side}_B"] = np.asarray(lp_B) + rng.normal(0, 3, B).astype(np.float32)
    out["win_real_B"], out["win_gen_B"] = np.ones(B, np.float32), np.zeros(B, np.float32)
    return out


@pytest.fixture(scope="module")
def batch(sides):
    return step.unpacked_batch(**sides)


def _recording(optimizer):
    """optimizer, preceded by a transformation that keeps the gradient it is given in its state
    (params-shaped, so it is sharded like the params): one compile yields loss, grads and update."""
    record = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (g, g))
    return optax.chain(record, optimizer)


def _grads(state):
    return _host(state.opt_state[0])


_FNS = {}


def _train_fn(name, opt_cfg=OPT, cfg=CFG, obj=OBJ):
    """One jitted step per (mesh, configs), shared across tests so each compiles once."""
    key = (name, opt_cfg, cfg, obj)
    if key not in _FNS:
        mesh = _mesh(name)
        optimizer = _recording(step.make_optimizer(opt_cfg, total_steps=100))
        fn = step.make_train_step(cfg, obj, opt_cfg, optimizer, mesh, step.pair_batch_shapes(B, L))
        _FNS[key] = (fn, optimizer, mesh)
    return _FNS[key]


def _fresh_state(name, params0, opt_cfg=OPT, cfg=CFG, obj=OBJ):
    fn, optimizer, mesh = _train_fn(name, opt_cfg, cfg, obj)
    return fn, step.init_state(cfg, jax.device_put(params0, sharding.param_shardings(cfg, mesh)), optimizer, mesh)


@pytest.fixture(scope="module")
def runs(params0, batch):
    """Per mesh: one AdamW step's metrics, gradient and updated params, and the shardings used."""
    out = {}
    for name in MESHES:
        fn, state = _fresh_state(name, params0)
        state, metrics = fn(state, batch)
        out[name] = dict(metrics=_host(metrics), grads=_grads(state), params=_host(state.params),
                         specs=[x.sharding.spec for x in jax.tree.leaves(state.params)],
                         opt_specs=[x.sharding.spec for x in jax.tree.leaves(state.opt_state[1])])
    return out


def _assert_trees_close(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", [n for n in MESHES if n != "1"])
def test_sharding_invariance(runs, params0, name):
    ref, got = runs["1"], runs[name]
    np.testing.assert_allclose(got["metrics"]["loss"], ref["metrics"]["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["metrics"]["grad_norm"], ref["metrics"]["grad_norm"], rtol=1e-5, atol=1e-5)
    _assert_trees_close(got["grads"], ref["grads"], rtol=1e-5, atol=1e-5)
    # The sharded update equals AdamW applied on one device to that mesh's own gradient. (Not compared
    # across meshes: a first AdamW step is ~lr * sign(g), so an entry whose gradient is near 0 turns
    # reduction-order noise into an lr-sized difference: seen at 1.3e-5 on 1 entry of 8192 after a
    # change that moved the random init by ulps.)
    _assert_trees_close(got["params"], _one_update(params0, got["grads"]), rtol=1e-6, atol=1e-7)
    assert ref["metrics"]["grad_norm"] > 0.1  # a zero gradient would agree trivially


@jax.jit
def _one_update(params, grads):
    optimizer = step.make_optimizer(OPT, total_steps=100)
    return optax.apply_updates(params, optimizer.update(grads, optimizer.init(params), params)[0])


def test_accumulated_fsdp_step_repeats_without_a_collective_deadlock(params0, sides):
    """A fresh state and a grad-accumulated data x fsdp step, 30 times, on 8 devices sharing 2 cores.
    With XLA:CPU's concurrency-optimized scheduler on, devices deadlocked in their collectives'
    rendezvous and XLA aborted the process, in 2 of 2 runs of this test (it also took down
    test_grad_accumulation_matches_full_batch about 1 run in 4); conftest turns it off
    (train.cpu_devices_flags)."""
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in os.environ["XLA_FLAGS"]
    batch = step.unpacked_batch(**sides, grad_accum=4)
    for _ in range(30):
        fn, state = _fresh_state("data2xfsdp4", params0, dataclasses.replace(OPT, grad_accum=4))
        state, m = fn(state, batch)
        assert np.isfinite(float(m["loss"]))


def test_params_and_moments_really_sharded(runs):
    def axes_used(specs):
        return {a for s in specs for d in s for a in ((d,) if isinstance(d, str) else (d or ()))}
    assert "fsdp" in axes_used(runs["data2xfsdp4"]["specs"])
    assert "tensor" in axes_used(runs["tensor8"]["specs"])
    assert "fsdp" in axes_used(runs["data2xfsdp4"]["opt_specs"])  # Adam moments follow their params
    assert "tensor" in axes_used(runs["tensor8"]["opt_specs"])
    assert not axes_used(runs["data8"]["specs"])  # pure data parallelism replicates params


def test_step_moves_params(runs, params0):
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(runs["1"]["params"]), jax.tree.leaves(params0)))
    assert moved > 1e-4  # Adam's first step moves each param with a gradient by about lr


def test_grad_accumulation_matches_full_batch(runs, params0, sides):
    """4 micro-batches of 2 pairs hand the optimizer the whole batch's gradient (to 1e-6), so any
    optimizer's update is the same; checked on the data x fsdp mesh against its own 1-step run.

    The gradient, not Adam's updated params, is compared at 1e-6: Adam's first update is about
    lr * g / (|g| + eps), which blows fp32 summation-order noise in near-zero entries up to ~lr.
    So the step's params are checked against Adam applied here to the gradient it recorded (it gave
    the optimizer that gradient, and nothing else moved the params), and against the 1-step run's where
    that update is well conditioned (|g| > 1e-5); elsewhere they may differ by Adam's bound, 2 lr.
    (Before, all params were compared at 1e-5: one entry of 12,288, its |g| near 0, differed by 1.6e-5
    once the suite compiled XLA:CPU's code at -O0, which sums in another order.)
    The ragged responses make the micro-batches' token counts differ, which the NLL must absorb.
    """
    name = "data2xfsdp4"
    fn, state = _fresh_state(name, params0, dataclasses.replace(OPT, grad_accum=4))
    state, m4 = fn(state, step.unpacked_batch(**sides, grad_accum=4))
    m4, m1 = _host(m4), runs[name]["metrics"]
    for k in ("loss", "pair_loss", "nll", "grad_norm", "margin", "accuracy", "reward_real", "lp_real", "lp_gen"):
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-6, atol=1e-6, err_msg=k)
    grads = _grads(state)
    _assert_trees_close(grads, runs[name]["grads"], rtol=0, atol=1e-6)
    _, optimizer, _ = _train_fn(name, dataclasses.replace(OPT, grad_accum=4))
    p0 = _host(params0)
    update, _ = optimizer.update(grads, optimizer.init(p0), p0)
    _assert_trees_close(_host(state.params), _host(optax.apply_updates(p0, update)), rtol=0, atol=1e-7)
    for (path, got), want, g in zip(jax.tree_util.tree_leaves_with_path(_host(state.params)),
                                    jax.tree.leaves(runs[name]["params"]), jax.tree.leaves(grads)):
        sure = np.abs(g) > 1e-5
        np.testing.assert_allclose(got[sure], want[sure], rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
        assert np.abs(got - want).max() <= 2 * OPT.lr * (1 + 1e-3), jax.tree_util.keystr(path)
    assert int(m4["n_tokens"]) == int(sides["real_mask_BxL"].sum() + sides["gen_mask_BxL"].sum())
    assert len({int(t) for t in sides["real_target_BxL"].reshape(2, 4, L).swapaxes(0, 1).sum((1, 2))}) > 1


def test_nonfinite_skip_and_raise(params0, batch):
    fn, state = _fresh_state("1", params0)
    before = _host(state.params)
    opt_before = _host(state.opt_state[1])
    bad = batch.replace(ref_real_B=batch.ref_real_B.copy())
    bad.ref_real_B[3] = np.nan
    state, metrics = fn(state, bad)
    assert not bool(metrics["finite"]) and int(metrics["skipped"]) == 1 and int(state.skipped) == 1
    assert int(state.step) == 1
    _assert_trees_close(_host(state.params), before, rtol=0, atol=0)
    _assert_trees_close(_host(state.opt_state[1]), opt_before, rtol=0, atol=0)  # Adam count unchanged too
    assert step.check_finite(metrics, OPT) is False  # skip mode: counted, no error
    with pytest.raises(FloatingPointError, match=r"step 0: non-finite loss/grad"):
        step.check_finite(metrics, dataclasses.replace(OPT, nonfinite="raise"))
    # The state is still good: the next finite batch trains normally.
    state, good = fn(state, batch)
    assert bool(good["finite"]) and int(state.skipped) == 1 and step.check_finite(good, OPT)
    # The logged rows: metrics over the finite steps, `skipped` a count (before: the skipped step's NaNs
    # made the round's loss and rewards NaN, and `skipped` averaged a running total: 0.67 for one step).
    import types
    from spjax import metrics as metrics_lib, rounds
    ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(optim=OPT), writer=types.SimpleNamespace(write=lambda *a: None))
    rows = [rounds._log_train(ctx, 0, rounds.RoundState(), [metrics, good], 1.0)[0],
            rounds._log_train(ctx, 0, rounds.RoundState(), [metrics], 1.0)[0]]
    assert rows[0]["skipped"] == 1 and rows[0]["loss"] == pytest.approx(float(good["loss"]))
    assert rows[1]["skipped"] == 1 and np.isnan(rows[1]["loss"])  # no finite step in the interval
    assert "finite" not in rows[0] and rows[0]["accuracy"] == pytest.approx(float(good["accuracy"]))
    summary = metrics_lib.mean_metrics(rows)
    assert summary["skipped"] == 2 and summary["loss"] == pytest.approx(float(good["loss"]))


def test_logged_speed_waits_for_the_device(monkeypatch):
    """Steps are dispatched asynchronously: an interval's time must end after its metrics reach the host
    (when the device has run them), and the next interval start there. Before, the clock was read
    before the copy, so tokens_per_s timed only the dispatch (about 400x too high on CPU)."""
    import types
    from spjax import metrics as metrics_lib, rounds
    events, clock = [], iter(range(10, 100))
    monkeypatch.setattr(rounds.time, "perf_counter", lambda: events.append("clock") or next(clock))
    monkeypatch.setattr(rounds.shd, "to_host", lambda x: events.append("copy") or np.asarray(x))
    ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(optim=OPT), writer=types.SimpleNamespace(write=lambda *a: None))
    m = {"loss": 1.0, "finite": True, "n_tokens": 300, "step": 0, "skipped": 0}
    row, end = rounds._log_train(ctx, 0, rounds.RoundState(), [m, m], t0=4)
    assert events[-1] == "clock" and "copy" not in events[events.index("clock"):]
    assert (row["tokens"], row["seconds"], row["tokens_per_s"], end) == (600, 6, 100, 10)
    row2, _ = rounds._log_train(ctx, 0, rounds.RoundState(), [m], t0=end)
    # a round's rate: all tokens over all time (900 / 7), not the mean of the rates (100 and 300)
    summary = metrics_lib.mean_metrics([row, row2])
    assert (summary["tokens"], summary["tokens_per_s"]) == (900, pytest.approx(900 / 7)) and "seconds" not in summary
    assert "n_tokens" not in row  # `tokens` counts them


def test_training_reduces_chi2_loss_and_compiles_once(params0, batch):
    fn, state = _fresh_state("1", params0)
    losses = []
    for _ in range(6):
        state, metrics = fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1 * abs(losses[0]), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # Every call above (and the other tests' calls on this mesh) hit one executable.
    assert fn._cache_size() == 1


def test_bf16_compute_close_to_fp32(params0, batch):
    """bf16 compute, fp32 master params: finite, and as close to the fp32 step as bf16 can be.

    Tolerances are bf16's own: the logits accumulate in fp32 and the log-probs are summed in fp32,
    so each sequence log-prob may be off by one bf16 unit roundoff (2^-8, relative) at most; loss and
    grad norm also pass through bf16 activations in the backward pass: one bf16 epsilon (2^-7).
    Seen on CPU: 2e-5 (lp), 1.6e-3 (loss), 2e-4 (grad norm).
    """
    cfg16 = dataclasses.replace(CFG, compute_dtype="bfloat16")
    got = {}
    for cfg in (CFG, cfg16):
        fn, state = _fresh_state("1", params0, cfg=cfg)
        state, metrics = fn(state, batch)
        got[cfg.compute_dtype] = (_host(metrics), _host(state.params))
    m32, m16 = got["float32"][0], got["bfloat16"][0]
    assert all(np.isfinite(v).all() for v in m16.values())
    assert all(np.isfinite(x).all() and x.dtype == np.float32 for x in jax.tree.leaves(got["bfloat16"][1]))
    for k in ("lp_real", "lp_gen"):
        np.testing.assert_allclose(m16[k], m32[k], rtol=2.0 ** -8, err_msg=k)
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(m16[k], m32[k], rtol=2.0 ** -7, err_msg=k)
    assert m16["loss"] != m32["loss"]  # the bf16 path really ran


def test_eval_step_matches_train_metrics(runs, params0, batch):
    mesh = _mesh("data2xfsdp4")
    ev = step.make_eval_step(CFG, OBJ, mesh, step.pair_batch_shapes(B, L))
    metrics = ev(_put_params(params0, mesh), batch)
    for k in ("loss", "pair_loss", "margin", "accuracy"):
        np.testing.assert_allclose(metrics[k], runs["1"]["metrics"][k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_schedule_and_optimizers():
    sched = step.make_schedule(OptimConfig(lr=1.0, warmup_frac=0.1, schedule="linear"), 100)
    np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(55), sched(100)], [0, .5, 1, .5, 0], atol=1e-6)
    cos = step.make_schedule(OptimConfig(lr=1.0, warmup_frac=0.1, schedule="cosine"), 100)
    np.testing.assert_allclose([cos(10), cos(55), cos(100)], [1, .5, 0], atol=1e-6)
    const = step.make_schedule(OptimConfig(lr=1.0, warmup_frac=0.0, schedule="constant"), 100)
    np.testing.assert_allclose([const(0), const(99)], [1, 1])
    mesh = _mesh("data2xfsdp4")
    for name in ("adamw", "rmsprop"):
        opt_cfg = OptimConfig(name=name, lr=0.1, weight_decay=0.1, warmup_frac=0.0, schedule="constant")
        opt = step.make_optimizer(opt_cfg, 10)
        params = {"w": jnp.ones((4, 2)), "attn_norm": jnp.ones((4,))}
        upd, _ = opt.update({"w": jnp.ones((4, 2)), "attn_norm": jnp.zeros((4,))}, opt.init(params), params)
        assert np.all(np.asarray(upd["attn_norm"]) == 0)  # norms: no gradient and no weight decay
        assert np.all(np.asarray(upd["w"]) < 0)
        # Moments shard like their params, also through weight decay's mask.
        sh = step.state_shardings(CFG, mesh, opt)
        assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(sh.opt_state))
    with pytest.raises(ValueError, match="optim.name"):
        step.make_optimizer(OptimConfig(name="sgd"), 10)
