"""Drawing tokens on device: per-example keys, greedy argmax, top-k / top-p truncation and the exact
two-stage categorical draw. `choose` is what each step of spjax.sampler_program's loop calls.

Randomness is per example: example i of a round samples token j with fold_in(fold_in(round_key, i), j)
(sample k >= 1 of K from its own fold of that key: `sample_keys`), so a sample does not depend on the
batch, the bucket or the host it landed in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------
# Keys


def round_key(seed: int, round_index: int):
    """The key of one sampling round: fold_in(key(seed), round)."""
    return jax.random.fold_in(jax.random.key(seed), round_index)


def example_key(seed: int, round_index: int, example_id: int, sample: int = 0):
    """The key of one sample of one example in one round; token j is drawn with fold_in(that key, j)."""
    return sample_keys(jax.random.fold_in(round_key(seed, round_index), example_id)[None], sample + 1)[0, sample]


def sample_keys(keys_B, K: int):
    """[B, K] keys of K samples per example: sample 0 draws from the example's key itself (so one
    sample per prompt is the single-sample draw), sample k >= 1 from fold_in(key, 2**32 - k): the
    top of the uint32 range, which no token index (the fold_in of each decode step) ever reaches."""
    if K == 1:
        return keys_B[:, None]
    others = jnp.asarray([2 ** 32 - k for k in range(1, K)], jnp.uint32)
    rest_BxK1 = jax.vmap(lambda key: jax.vmap(lambda d: jax.random.fold_in(key, d))(others))(keys_B)
    return jnp.concatenate([keys_B[:, None], rest_BxK1], axis=1)


# ---------------------------------------------------------------------------------------------
# Choosing a token


def _truncate(logits_BxV, top_k, top_p):
    """Mask (to -inf) all but the top-k, then all but the smallest top-p nucleus of what is left.

    Both keep whole groups of tied logits (top-k: every token >= the k-th largest, as HF's; top-p: the
    smallest set of groups reaching top_p), so no token is kept or dropped for its index alone.
    """
    V = logits_BxV.shape[-1]
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth_B1 = jnp.take_along_axis(sorted_BxV, jnp.broadcast_to(k - 1, (sorted_BxV.shape[0], 1)), axis=-1)
    in_k_BxV = sorted_BxV >= kth_B1  # the k-th's ties too: the nucleus's mass is over what top-k keeps
    sorted_BxV = jnp.where(in_k_BxV, sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep a token if the mass strictly above it is < top_p: the smallest set reaching top_p.
    mass_above_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = ((mass_above_BxV < top_p) | (top_p >= 1.0)).at[:, 0].set(True) & in_k_BxV  # fp32 cumsum hits 1
    n_keep_B = jnp.sum(keep_BxV, axis=-1)
    threshold_B = jnp.take_along_axis(sorted_BxV, (n_keep_B - 1)[:, None], axis=-1)
    return jnp.where(logits_BxV >= threshold_B, logits_BxV, -jnp.inf)


def _argmax(x_BxV):
    """jnp.argmax over the last axis: the first maximum (the first NaN if any), as int32.

    XLA:CPU runs argmax's (value, index) pair reduction several times slower than a max followed
    by a min over matching indices, so CPU takes that form; other backends keep argmax.
    """
    if jax.default_backend() != "cpu":
        return jnp.argmax(x_BxV, axis=-1).astype(jnp.int32)
    V = x_BxV.shape[-1]
    hit_BxV = (x_BxV == jnp.max(x_BxV, axis=-1, keepdims=True)) | jnp.isnan(x_BxV)
    return jnp.min(jnp.where(hit_BxV, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


_DRAW_BLOCK = 256  # tokens per block of the two-stage draw: V/256 + 256 random numbers a row, not V


def _categorical(keys_B, logits_BxV):
    """One draw per row from softmax(logits), exactly, in two stages: one of N blocks of C tokens with
    probability its share of the mass (Gumbel-max over the blocks' logsumexps), then a token in that
    block (Gumbel-max over its C logits); P(block) * P(token | block) = softmax(logits)[token].

    One Gumbel draw per vocabulary entry (jax.random.categorical) costs a threefry hash per entry per
    row every decode step (128k x 64 rows for the 1B shape); this takes N + C per row (757 there)
    and one logsumexp pass over the logits. Blocks of -inf (truncated, or the padding up to C*N)
    have no mass and are never drawn. Block n holds tokens n, N + n, 2N + n, ...: with the vocabulary
    split over devices (tensor-parallel logits) each device holds a slice of every block, so the
    block sums reduce across devices and nothing [B, V]-sized moves.
    """
    B, V = logits_BxV.shape
    C = min(_DRAW_BLOCK, V)
    N = -(-V // C)
    x_BxCxN = jnp.pad(logits_BxV, ((0, 0), (0, C * N - V)), constant_values=-jnp.inf).reshape(B, C, N)
    block_keys_B, token_keys_B = jnp.moveaxis(jax.vmap(jax.random.split)(keys_B), 1, 0)
    gumbel = lambda keys, n: jax.vmap(lambda k: jax.random.gumbel(k, (n,), logits_BxV.dtype))(keys)
    block_B = _argmax(jax.nn.logsumexp(x_BxCxN, axis=1) + gumbel(block_keys_B, N))
    x_BxC = jnp.take_along_axis(x_BxCxN, block_B[:, None, None], axis=2)[:, :, 0]
    return _argmax(x_BxC + gumbel(token_keys_B, C)) * N + block_B


def choose(logits_BxV, keys_B, step, knobs, settings):
    """(token [B], its log-prob under the untempered model distribution [B])."""
    if settings.greedy:
        token_B = _argmax(logits_BxV)
    else:
        scaled_BxV = logits_BxV / knobs["temperature"]
        if settings.truncate:
            scaled_BxV = _truncate(scaled_BxV, knobs["top_k"], knobs["top_p"])
        step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
        token_B = _categorical(step_keys_B, scaled_BxV)
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), token_B[:, None], axis=-1)[:, 0]
    return token_B, logprob_B
