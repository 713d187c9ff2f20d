"""The self-play objective family (DESIGN.md §1) as pure jnp functions.

Every objective sees the same four float32 [B] sequence log-probs: the policy's (lp_real, lp_gen)
and the frozen reference/opponent's (ref_real, ref_gen), and turns them into implicit rewards
  r  = beta * (lp_real - ref_real)   on the real (data) response y, or the judge's preferred sample,
  r' = beta * (lp_gen  - ref_gen)    on the opponent's sample y', or the dispreferred one.
Judged pairs also carry each side's soft win rate P(y beats the K samples) (w, w'); for other
pairs w = 1 and w' = 0 (the real response wins), which gives SPPO its hard-label form.
Losses are minimised; each returns per-pair losses [B] and a dict of scalar metrics.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp



def _chi2(r_B, rg_B, beta, c, w_B, wg_B):
    del w_B, wg_B
    # Pearson chi2 variational form with the mixture M = (P+Q)/2. Pointwise in r the loss is
    # (c/2)[(r - 1/c)^2 + (r' + 1/c)^2] + const, and its expectation over y ~ P, y' ~ Q is minimised
    # at r* = (p - q) / (c (p + q)), which lies in [-1/c, 1/c]: the reward player is bounded, so one
    # round moves any log-ratio by at most about 1/(beta c), and at p == q it does not move at all.
    del beta
    return -(r_B - rg_B) + 0.5 * c * (r_B * r_B + rg_B * rg_B)


def _spin(r_B, rg_B, beta, c, w_B, wg_B):
    # SPIN's logistic margin: unbounded, the optimum log-ratio difference is log(p q' / (p' q)) / beta.
    del beta, c, w_B, wg_B
    return -jax.nn.log_sigmoid(r_B - rg_B)


def _hinge(r_B, rg_B, beta, c, w_B, wg_B):
    del beta, c, w_B, wg_B
    return jax.nn.relu(1.0 - (r_B - rg_B))


def _ipo(r_B, rg_B, beta, c, w_B, wg_B):
    # IPO regresses the raw log-ratio difference h = (r - r')/beta onto 1/(2 beta) (Azar et al.).
    # INPO is this loss with eta = beta against the reference pi_0^(tau/eta) pi_t^(1 - tau/eta)
    # (scoring mixes the two log-probs): h - 1/(2 eta) = D_theta - (tau/eta) D_0 - (1 - tau/eta) D_t - 1/(2 eta).
    del c, w_B, wg_B
    return jnp.square((r_B - rg_B) / beta - 0.5 / beta)


def _nce(r_B, rg_B, beta, c, w_B, wg_B):
    # Pointwise logistic discrimination of real vs generated (Jensen-Shannon / NCE, as in SPACE).
    del beta, c, w_B, wg_B
    return -jax.nn.log_sigmoid(r_B) - jax.nn.log_sigmoid(-rg_B)


def _sppo(r_B, rg_B, beta, c, w_B, wg_B):
    # SPPO (uclaml/SPPO's trainer): each side's log-ratio lr = r / beta regresses onto (P - 1/2) / beta,
    # P its soft win rate: ((lr_w - (P_w - 1/2)/beta)^2 + (lr_l - (P_l - 1/2)/beta)^2) / 2.
    del c
    return 0.5 * (jnp.square((r_B - (w_B - 0.5)) / beta) + jnp.square((rg_B - (wg_B - 0.5)) / beta))


@dataclasses.dataclass(frozen=True)
class Objective:
    """One row of the objective table: its per-pair loss and what the round driver must supply.

    pair_loss: f(r_B, r'_B, beta, c, w_B, w'_B) -> per-pair losses [B] (w: the sides' soft win rates);
      None for a loss on the real side alone.
    opponent: needs a second response per prompt (the opponent's sample, or the record's rejected
      one); without it the pairs are (y, y) and nothing is sampled.
    reference: needs reference log-probs of both sides (scored once per round); without them the
      reference inputs are zeros and nothing is scored.
    initial: the reference mixes in pi_0: ref = (tau/beta) lp_0 + (1 - tau/beta) lp_t (INPO);
      the round's pairs are then also scored under the initial model.
    """

    pair_loss: Optional[Callable]
    opponent: bool = True
    reference: bool = True
    initial: bool = False


TABLE: dict[str, Objective] = {
    "chi2": Objective(_chi2),  # the default
    "spin": Objective(_spin),
    "hinge": Objective(_hinge),
    "ipo": Objective(_ipo),
    "nce": Objective(_nce),
    # The preference-oracle losses (judged pairs; on other pairs the real response wins outright).
    "sppo": Objective(_sppo),
    "inpo": Objective(_ipo, initial=True),
    # The SFT-only baseline: per-token NLL of the real responses; no opponent, no reference.
    "sft": Objective(None, opponent=False, reference=False),
}
NAMES = tuple(TABLE)  # the built-in objective.names (a config file may add rows: see register)
OBJECTIVES = tuple(k for k, v in TABLE.items() if v.pair_loss is not None)  # the built-in pair losses


def register(name: str, pair_loss: Optional[Callable], **needs) -> Objective:
    """Add a row to the objective table, e.g. from a config file before get_config() names it:
    register("smooth_hinge", lambda r, rg, beta, c, w, wg: jax.nn.softplus(1 - (r - rg))).
    pair_loss(r_B, r'_B, beta, c, w_B, w'_B) -> per-pair losses [B] (jnp, traced in the jitted step);
    needs: Objective's opponent / reference / initial flags. A built-in name cannot be replaced."""
    if name in NAMES and TABLE[name].pair_loss is not pair_loss:
        raise ValueError(f"objective {name!r} is built in; register yours under another name")
    TABLE[name] = Objective(pair_loss, **needs)
    return TABLE[name]


def pair_loss(name: str, lp_real_B, lp_gen_B, ref_real_B, ref_gen_B, *, beta: float, c: float = 1.0,
              win_real_B=None, win_gen_B=None):
    """Per-pair losses [B] of objective `name` and a dict of scalar metrics (means over the batch).

    win_real_B, win_gen_B: the sides' soft win rates (judged pairs); default 1 and 0.

    aux: reward_real, reward_gen, margin (r - r'), accuracy (P(r > r'); a tie counts 1/2, so a
    policy equal to its reference reads 0.5, the equilibrium value; margins within fp32 noise of the
    log-probs count as ties), frac_at_bound (fraction of the
    2B rewards r, r' with |.| >= 1/c; meaningful for chi2, reported for all), loss (mean pair loss),
    lp_real, lp_gen (policy means).
    """
    if name not in TABLE or TABLE[name].pair_loss is None:
        known = ", ".join(k for k, v in TABLE.items() if v.pair_loss is not None)
        raise ValueError(f"unknown pair objective {name!r}; known: {known}")
    f32 = jnp.float32
    lp_real_B, lp_gen_B = jnp.asarray(lp_real_B, f32), jnp.asarray(lp_gen_B, f32)
    r_B = beta * (lp_real_B - jnp.asarray(ref_real_B, f32))
    rg_B = beta * (lp_gen_B - jnp.asarray(ref_gen_B, f32))
    w_B = jnp.ones_like(r_B) if win_real_B is None else jnp.asarray(win_real_B, f32)
    wg_B = jnp.zeros_like(r_B) if win_gen_B is None else jnp.asarray(win_gen_B, f32)
    losses_B = TABLE[name].pair_loss(r_B, rg_B, beta, c, w_B, wg_B)

    # Metrics carry no gradient: they are read, never optimised.
    r, rg = jax.lax.stop_gradient(r_B), jax.lax.stop_gradient(rg_B)
    margin_B = r - rg
    # At a round's first step the policy is its reference, but the reference's log-probs came from
    # another program (scoring's rows, the sampler): fp32 differences of ~1e-6 of the log-probs'
    # size, whose signs would make the accuracy a coin toss. Margins within 1e-5 of it are ties.
    noise_B = 1e-5 * beta * jax.lax.stop_gradient(jnp.abs(lp_real_B) + jnp.abs(lp_gen_B) + jnp.abs(ref_real_B)
                                                   + jnp.abs(ref_gen_B))
    accuracy_B = jnp.where(margin_B > noise_B, 1.0, jnp.where(margin_B < -noise_B, 0.0, 0.5))
    bound = 1.0 / c
    at_bound = 0.5 * (jnp.mean(jnp.abs(r) >= bound) + jnp.mean(jnp.abs(rg) >= bound))
    aux = {
        "reward_real": jnp.mean(r),
        "reward_gen": jnp.mean(rg),
        "margin": jnp.mean(margin_B),
        "accuracy": jnp.mean(accuracy_B),
        "frac_at_bound": at_bound.astype(f32),
        "loss": jnp.mean(jax.lax.stop_gradient(losses_B)),
        "lp_real": jnp.mean(jax.lax.stop_gradient(lp_real_B)),
        "lp_gen": jnp.mean(jax.lax.stop_gradient(lp_gen_B)),
    }
    return losses_B, aux


def mixed_reference(cfg, lp_t_B, lp_0_B):
    """The reference log-probs an objective trains against: pi_t's, or for an `initial` objective
    (INPO) the geometric mixture (tau/eta) lp_0 + (1 - tau/eta) lp_t, eta = cfg.beta."""
    if not TABLE[cfg.name].initial:
        return lp_t_B
    a = cfg.tau / cfg.beta
    return (a * lp_0_B + (1.0 - a) * lp_t_B).astype(lp_t_B.dtype)


def nll_term(lp_real_B, n_tokens_real_B):
    """Per-token NLL of the real responses: -sum(lp) / sum(tokens), token-weighted like SFT."""
    n_tokens = jnp.sum(jnp.asarray(n_tokens_real_B, jnp.float32))
    # A batch of empty responses gives 0, not NaN. Only 0 is replaced: a micro-batch's share of an
    # accumulated batch's count (spjax.step) may be a fraction, e.g. 1 token over 4 micro-batches.
    return -jnp.sum(jnp.asarray(lp_real_B, jnp.float32)) / jnp.where(n_tokens > 0, n_tokens, 1.0)


def objective_loss(cfg, lp_real_B, lp_gen_B, ref_real_B, ref_gen_B,
                   n_tokens_real_B: Optional[jnp.ndarray] = None, win_real_B=None, win_gen_B=None):
    """Scalar training loss (cfg: an ObjectiveConfig): mean pair loss + cfg.nll_weight * per-token NLL; and the aux metrics.

    aux['loss'] stays the mean pair loss (the divergence estimate); aux['nll'] is added whenever
    n_tokens_real_B is given, which cfg.nll_weight != 0 requires. name 'sft' is the SFT-only
    baseline: the loss is the per-token NLL of the real responses alone, and aux holds no pair metric
    (rewards, margins, accuracy: with no opponent and no reference they would read as constants).
    """
    if TABLE[cfg.name].pair_loss is None:
        if n_tokens_real_B is None:
            raise ValueError(f"objective {cfg.name!r} needs n_tokens_real_B (response token counts)")
        nll = nll_term(jnp.asarray(lp_real_B, jnp.float32), n_tokens_real_B)
        return nll, {"lp_real": jnp.mean(jax.lax.stop_gradient(jnp.asarray(lp_real_B, jnp.float32))),
                     "nll": jax.lax.stop_gradient(nll)}
    losses_B, aux = pair_loss(cfg.name, lp_real_B, lp_gen_B, ref_real_B, ref_gen_B,
                              beta=cfg.beta, c=cfg.c, win_real_B=win_real_B, win_gen_B=win_gen_B)
    loss = jnp.mean(losses_B)
    if n_tokens_real_B is None:
        if cfg.nll_weight != 0:
            raise ValueError("objective.nll_weight != 0 needs n_tokens_real_B (response token counts)")
        return loss, aux
    nll = nll_term(lp_real_B, n_tokens_real_B)
    aux["nll"] = jax.lax.stop_gradient(nll)
    if cfg.nll_weight != 0:
        loss = loss + cfg.nll_weight * nll
    return loss, aux
