"""The objective table: hand-computed values, gradient signs, chi2's bound, and the tabular theory toy."""
import functools
import os
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spjax.config import ObjectiveConfig
from spjax.objectives import OBJECTIVES, nll_term, objective_loss, pair_loss

# Two pairs with beta = 0.5, c = 2 (bound 1/c = 0.5):
#   pair 0: r = 0.5*(-10 - -11) = 0.5,    r' = 0.5*(-11 - -10) = -0.5,  margin 1
#   pair 1: r = 0.5*(-12 - -11.5) = -0.25, r' = 0.5*(-9 - -10) = 0.5,   margin -0.75
LP_REAL, LP_GEN = [-10.0, -12.0], [-11.0, -9.0]
REF_REAL, REF_GEN = [-11.0, -11.5], [-10.0, -10.0]
BETA, C = 0.5, 2.0


def _log1pexp(x):
    return math.log(1.0 + math.exp(x))


EXPECTED = {
    # -(r - r') + (c/2)(r^2 + r'^2): pair 0: -1 + 1*(0.25 + 0.25); pair 1: 0.75 + (0.0625 + 0.25)
    "chi2": [-0.5, 1.0625],
    # -log sigmoid(m) = log(1 + exp(-m))
    "spin": [_log1pexp(-1.0), _log1pexp(0.75)],
    # max(0, 1 - m)
    "hinge": [0.0, 1.75],
    # (m/beta - 1/(2 beta))^2: (2 - 1)^2, (-1.5 - 1)^2
    "ipo": [1.0, 6.25],
    # -log sigmoid(r) - log sigmoid(-r') = log(1 + exp(-r)) + log(1 + exp(r'))
    "nce": [_log1pexp(-0.5) + _log1pexp(-0.5), _log1pexp(0.25) + _log1pexp(0.5)],
    # hard-label SPPO (P_w = 1, P_l = 0): (((r - 1/2)/beta)^2 + ((r' + 1/2)/beta)^2) / 2:
    # pair 0: (0 + 0) / 2; pair 1: ((-0.75/0.5)^2 + (1/0.5)^2) / 2 = (2.25 + 4) / 2
    "sppo": [0.0, 3.125],
    # INPO is IPO's loss against its mixed reference (objectives.mixed_reference; test_judges checks the mix)
    "inpo": [1.0, 6.25],
}


def _arrays(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_hand_computed_values(name):
    losses_B, aux = pair_loss(name, *_arrays(LP_REAL, LP_GEN, REF_REAL, REF_GEN), beta=BETA, c=C)
    np.testing.assert_allclose(np.asarray(losses_B), EXPECTED[name], rtol=1e-6, atol=1e-7)
    assert float(aux["loss"]) == pytest.approx(sum(EXPECTED[name]) / 2, rel=1e-6)
    assert float(aux["reward_real"]) == pytest.approx((0.5 - 0.25) / 2)
    assert float(aux["reward_gen"]) == pytest.approx(0.0, abs=1e-7)
    assert float(aux["margin"]) == pytest.approx((1.0 - 0.75) / 2)
    assert float(aux["accuracy"]) == 0.5  # pair 0 right, pair 1 wrong
    assert float(aux["frac_at_bound"]) == 0.75  # |r| = 0.5, 0.25, 0.5, 0.5 against 1/c = 0.5
    assert float(aux["lp_real"]) == -11.0 and float(aux["lp_gen"]) == -10.0


def test_objectives_table_and_unknown_name():
    assert set(OBJECTIVES) == {"chi2", "spin", "hinge", "ipo", "nce", "sppo", "inpo"} and OBJECTIVES[0] == "chi2"
    with pytest.raises(ValueError, match="chi2.*spin.*hinge.*ipo.*nce"):
        pair_loss("dpo", *_arrays([0.0], [0.0], [0.0], [0.0]), beta=0.1)


def test_ties_count_half():
    zeros = jnp.zeros(4)
    _, aux = pair_loss("chi2", zeros, zeros, zeros, zeros, beta=0.1)
    assert float(aux["accuracy"]) == 0.5 and float(aux["frac_at_bound"]) == 0.0


def test_a_policy_equal_to_its_reference_up_to_fp32_noise_reads_one_half():
    """The reference's log-probs come from another program than the policy's (relative differences
    ~1e-6 at a round's first step): those margins are ties; 0.01 nats a side (r - r' = 0.002) is not."""
    rng = np.random.default_rng(0)
    ref_real, ref_gen = (jnp.asarray(rng.uniform(-300, -20, 64), jnp.float32) for _ in range(2))
    noisy = lambda x: x * (1 + jnp.asarray(rng.normal(0, 1e-6, 64), jnp.float32))
    _, aux = pair_loss("chi2", noisy(ref_real), noisy(ref_gen), ref_real, ref_gen, beta=0.1)
    assert float(aux["accuracy"]) == 0.5
    _, aux = pair_loss("chi2", ref_real + 1e-2, ref_gen - 1e-2, ref_real, ref_gen, beta=0.1)
    assert float(aux["accuracy"]) == 1.0


def test_nll_and_objective_loss():
    lp_real, lp_gen, ref_real, ref_gen = _arrays(LP_REAL, LP_GEN, REF_REAL, REF_GEN)
    n_tok = jnp.array([4, 6])
    assert float(nll_term(lp_real, n_tok)) == pytest.approx(22.0 / 10.0)
    # Under grad accumulation a micro-batch gets its share of the batch's count, which may be < 1
    # (1 real token over 4 micro-batches): before, clamped to 1, the NLL came out 4x too small.
    assert float(nll_term(jnp.asarray([-2.0]), jnp.asarray([0.25]))) == pytest.approx(8.0)
    assert float(nll_term(jnp.zeros(2), jnp.zeros(2))) == 0.0  # empty responses: 0, not NaN
    cfg = ObjectiveConfig(name="spin", beta=BETA, c=C, nll_weight=0.5)
    loss, aux = objective_loss(cfg, lp_real, lp_gen, ref_real, ref_gen, n_tok)
    spin_mean = sum(EXPECTED["spin"]) / 2
    assert float(loss) == pytest.approx(spin_mean + 0.5 * 2.2, rel=1e-6)
    assert float(aux["nll"]) == pytest.approx(2.2) and float(aux["loss"]) == pytest.approx(spin_mean)
    with pytest.raises(ValueError, match="n_tokens"):
        objective_loss(cfg, lp_real, lp_gen, ref_real, ref_gen)
    loss0, aux0 = objective_loss(ObjectiveConfig(beta=BETA, c=C), lp_real, lp_gen, ref_real, ref_gen)
    assert float(loss0) == pytest.approx((-0.5 + 1.0625) / 2) and "nll" not in aux0
    # Under jit and grad: d/d lp_real of mean(-log sigmoid(m)) = -sigmoid(-m) * beta / B, and the
    # NLL term adds -w / N_total. Margins m are 1 and -0.75.
    g = jax.jit(jax.grad(lambda lp: objective_loss(cfg, lp, lp_gen, ref_real, ref_gen, n_tok)[0]))(lp_real)
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))
    expected = [-sig(-1.0) * BETA / 2 - 0.05, -sig(0.75) * BETA / 2 - 0.05]
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-6)


def _grads(name, lp_real, lp_gen, ref_real, ref_gen, beta=0.1, c=1.0):
    f = lambda a, b: jnp.sum(pair_loss(name, a, b, ref_real, ref_gen, beta=beta, c=c)[0])
    return jax.jit(jax.grad(f, argnums=(0, 1)))(lp_real, lp_gen)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_gradient_signs(name):
    # Inside the region every objective is meant to act on (|r|, |r'| small, margin below all the
    # targets: hinge 1, ipo 1/2, chi2 bound 1/c = 1), descent raises lp on real and lowers it on
    # generated responses. Row 0 is the start of every round: policy == reference.
    lp_real = jnp.array([-20.0, -20.0, -20.0, -20.0])
    lp_gen = jnp.array([-30.0, -30.0, -30.0, -30.0])
    ref_real = lp_real - jnp.array([0.0, 2.0, -3.0, 1.0])  # r  = 0, 0.2, -0.3, 0.1
    ref_gen = lp_gen - jnp.array([0.0, -1.0, 2.0, 3.0])  # r' = 0, -0.1, 0.2, 0.3
    g_real, g_gen = _grads(name, lp_real, lp_gen, ref_real, ref_gen)
    assert np.all(np.asarray(g_real) < 0), g_real
    assert np.all(np.asarray(g_gen) > 0), g_gen


def test_chi2_gradient_vanishes_at_the_bound():
    # d/dr [-(r - r') + c/2 (r^2 + r'^2)] = c r - 1: zero at r = 1/c, and d/dr' = c r' + 1: zero at
    # r' = -1/c. Past the bound the gradient pushes back: the reward is held inside [-1/c, 1/c].
    beta, c = 0.5, 2.0
    ref = jnp.zeros(3)
    # lp - ref = (1/c)/beta * (0.9, 1, 1.1), i.e. r = 0.45, 0.5, 0.55 and r' = -0.45, -0.5, -0.55.
    scale = jnp.array([0.9, 1.0, 1.1]) / (c * beta)
    g_real, g_gen = _grads("chi2", scale, -scale, ref, ref, beta=beta, c=c)
    g_real, g_gen = np.asarray(g_real), np.asarray(g_gen)
    assert g_real[0] < 0 and abs(g_real[1]) < 1e-7 and g_real[2] > 0
    assert g_gen[0] > 0 and abs(g_gen[1]) < 1e-7 and g_gen[2] < 0
    # beta * (c r - 1) = 0.5 * (2 * 0.45 - 1) = -0.05
    assert g_real[0] == pytest.approx(-0.05, rel=1e-5) and g_gen[2] == pytest.approx(-0.05, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The theory toy: a tabular softmax policy over K outcomes, exact expectations, several rounds.
#
# Round t freezes pi_t (opponent == reference); the policy starts from pi_t and minimises
# E_{y~p_data, y'~pi_t}[loss(r(y), r'(y'))] with r = beta log(pi / pi_t), summed exactly over all
# K x K pairs (for chi2, which is separable, this equals E_P[.] + E_Q[.]).
#
# What theory predicts for chi2, so the assertions below are not tuned to the run:
# * The unconstrained reward optimum is r* = (p - q) / (c (p + q)), q = pi_t, which is 0 at q = p.
# * The policy's reward is normalised (sum_k q_k exp(r_k / beta) = 1), so its stationary point is
#   r = r* + pi_{t+1} G / (c (p + q)) with G = c (E_P[r] + E_Q[r]) (KKT of the softmax). The second
#   term is the only way past 1/c; it is small unless one outcome gains most of the mass.
# * Near p, q = p(1 + e) maps to pi_{t+1} = p(1 + e (1 - 1/(2 beta c)) + O(e^2)): TV contracts by
#   |1 - 1/(2 beta c)| per round, so rounds converge only when beta c > 1/4. beta = c = 1 halves
#   TV each round. (SPIN's logistic optimum is pi_{t+1} ∝ q (p/q)^(1/beta): factor |1 - 1/beta|.)

K = 8
P_DATA = np.array([0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02], np.float32)
TOY_BETA, TOY_C = 1.0, 1.0
ROUNDS = 7
INNER_STEPS = 1000
GRAD_TOL = 1e-5  # the inner loop must end at a float32 stationary point
# Slack on the learned rewards: float32 error of the converged inner problem. The stationarity
# residual measured against the KKT identity above is ~5e-6 in float32, so 1e-4 covers it 20x over.
SLACK = 1e-4


def _expected_pair_loss(name, theta_K, logq_K, beta, c):
    logpi_K = jax.nn.log_softmax(theta_K)
    w_KK = jnp.asarray(P_DATA)[:, None] * jnp.exp(logq_K)[None, :]  # (real y, generated y')
    losses, _ = pair_loss(name, jnp.repeat(logpi_K, K), jnp.tile(logpi_K, K),
                          jnp.repeat(logq_K, K), jnp.tile(logq_K, K), beta=beta, c=c)
    return jnp.sum(w_KK.reshape(-1) * losses)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _one_round(name, theta_t, beta, c):
    """Plain gradient descent from pi_t; returns theta_{t+1} and the final gradient norm."""
    logq_K = jax.nn.log_softmax(theta_t)
    grad = jax.grad(_expected_pair_loss, argnums=1)
    # The loss curvature in theta is at most ~beta^2 c (p_k + q_k) <= 2 beta^2 c; a step of
    # 0.5 / (beta^2 c) stays below the 2/curvature stability limit, and 1000 steps converge even
    # the flattest direction (p_k + q_k ~ 0.04).
    lr = 0.5 / (beta * beta * max(c, 1.0))
    theta, _ = jax.lax.scan(lambda th, _: (th - lr * grad(name, th, logq_K, beta, c), None),
                            theta_t, None, length=INNER_STEPS)
    return theta, jnp.linalg.norm(grad(name, theta, logq_K, beta, c))


def _run_toy(name, pi0_K, beta=TOY_BETA, c=TOY_C, rounds=ROUNDS):
    """Per round: TV(pi_{t+1}, p), rewards r = beta log(pi_{t+1}/pi_t), pi_t, pi_{t+1}, grad norm."""
    theta = jnp.log(jnp.asarray(pi0_K, jnp.float32))
    out = []
    for _ in range(rounds):
        new, gnorm = _one_round(name, theta, beta, c)
        q, pi = np.asarray(jax.nn.softmax(theta)), np.asarray(jax.nn.softmax(new))
        r = beta * np.asarray(jax.nn.log_softmax(new) - jax.nn.log_softmax(theta))
        out.append(dict(tv=0.5 * np.abs(pi - P_DATA).sum(), r=r, q=q, pi=pi, gnorm=float(gnorm)))
        theta = new
    return out


def _kkt_excess(row, c):
    """The normalisation term pi_{t+1} G / (c (p + q)) and r* = (p - q) / (c (p + q))."""
    p, q, pi, r = P_DATA, row["q"], row["pi"], row["r"]
    g = c * np.sum((p + q) * r)
    return (p - q) / (c * (p + q)), pi * g / (c * (p + q))


def _fmt(rows):
    return ("TV " + " ".join(f"{x['tv']:.4f}" for x in rows)
            + " | max|beta log ratio| " + " ".join(f"{np.abs(x['r']).max():.3f}" for x in rows)
            + f" | max inner grad {max(x['gnorm'] for x in rows):.1e}")


def test_theory_toy_chi2_converges_with_bounded_steps():
    # (a) Starting at the data the optimal reward is 0: the round leaves the model where it is.
    at_data = _run_toy("chi2", P_DATA, rounds=5)
    assert at_data[-1]["tv"] < 1e-3
    assert max(np.abs(x["r"]).max() for x in at_data) < 1e-4

    # (b) Starting elsewhere (the data reversed: TV 0.5), TV falls every round, at the rate theory
    # predicts once close: |1 - 1/(2 beta c)| = 1/2.
    rows = _run_toy("chi2", P_DATA[::-1])
    tv = [0.5] + [x["tv"] for x in rows]
    assert all(b < a for a, b in zip(tv, tv[1:])), tv
    assert all(0.45 < b / a < 0.55 for a, b in zip(tv[4:], tv[5:])), tv

    # (c) Each round's learned log-ratio is bounded by 1/c (in beta units), and it is the
    # constrained optimum: r = r* + normalisation term, to float32 stationarity.
    for x in at_data + rows:
        assert x["gnorm"] < GRAD_TOL, x["gnorm"]
        assert np.abs(x["r"]).max() <= 1.0 / TOY_C + SLACK, x["r"]
        r_star, excess = _kkt_excess(x, TOY_C)
        np.testing.assert_allclose(x["r"], r_star + excess, rtol=0, atol=SLACK)

    # From a start holding ~all mass on one outcome, the normalisation term moves r past 1/c (the
    # printed max exceeds 1): the bound then holds outcome by outcome with that term added.
    extreme = _run_toy("chi2", np.r_[np.full(K - 1, 1.0), math.exp(12.0)] / (K - 1 + math.exp(12.0)))
    for x in extreme:
        assert x["gnorm"] < GRAD_TOL
        _, excess = _kkt_excess(x, TOY_C)
        assert np.all(np.abs(x["r"]) <= 1.0 / TOY_C + np.abs(excess) + SLACK), (x["r"], excess)

    spin = _run_toy("spin", P_DATA[::-1])
    print(f"\n[toy beta={TOY_BETA} c={TOY_C}, start = p_data reversed]")
    print("  chi2  " + _fmt(rows))
    print("  spin  " + _fmt(spin))
    print("  chi2 from p_data " + _fmt(at_data))
    print("  chi2 from a one-outcome start " + _fmt(extreme))
    # SPIN's own default beta = 0.1: beta c < 1/4, so both overshoot and neither settles.
    for name in ("chi2", "spin"):
        print(f"  beta=0.1 {name:5s} " + _fmt(_run_toy(name, P_DATA[::-1], beta=0.1, rounds=6)))


def test_a_registered_objective_trains_by_name(tmp_path):
    """objectives.register adds a row a config (and objective_loss) accept by name; built-ins are kept."""
    from spjax import objectives
    from spjax.config import load_config
    try:
        objectives.register("smooth_hinge_t", lambda r, rg, beta, c, w, wg: jax.nn.softplus(1.0 - (r - rg)))
        cfg = tmp_path / "cfg.py"
        cfg.write_text("import dataclasses, os\nfrom spjax.config import load_config\n"
                       "def get_config():\n    return load_config(" + repr(os.path.abspath("configs/tiny.py"))
                       + ", ['objective.name=smooth_hinge_t'])\n")
        assert load_config(str(cfg)).objective.name == "smooth_hinge_t"
        loss, _ = objective_loss(ObjectiveConfig(name="smooth_hinge_t", beta=BETA, c=C),
                                 *map(jnp.asarray, (LP_REAL, LP_GEN, REF_REAL, REF_GEN)))
        want = np.mean([math.log1p(math.exp(1 - 1.0)), math.log1p(math.exp(1 + 0.75))])
        np.testing.assert_allclose(float(loss), want, rtol=1e-6)
        with pytest.raises(ValueError, match="built in"):
            objectives.register("chi2", lambda *a: 0.0)
    finally:
        objectives.TABLE.pop("smooth_hinge_t", None)
