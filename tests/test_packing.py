"""Packed pair rows: the layout, and losses and gradients equal to one sequence per row (fp32, 1e-5)."""
import jax
import numpy as np
import pytest

from spjax import sharding, step
from spjax.config import MeshConfig, ModelConfig, ObjectiveConfig
from spjax.data import packing
from spjax.data.tokens import TokenizedExample

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
L = 48


def _examples(n, seed=0):
    """Pairs of long-tailed lengths: most short, a few near the row length."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r, g = (int(x) for x in np.clip(rng.lognormal([1.8, 2.2, 2.0], 0.7), 1, 22))
        ids = lambda k: rng.integers(3, CFG.vocab_size, k).astype(np.int32)
        out.append(TokenizedExample(id=i, prompt_ids=ids(p), real_ids=ids(r), generated_ids=ids(g)))
    return out


def test_first_fit_places_every_sequence_once_within_rows():
    lengths = [30, 5, 17, 48, 1, 12, 30, 9]
    rows = packing.first_fit(lengths, 48)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 48 for r in rows)
    assert len(rows) == 4  # 152 tokens: 4 rows is the fewest
    with pytest.raises(ValueError, match="does not fit a row of 48"):
        packing.first_fit([49], 48)


def test_packed_rows_hold_each_sequence_as_a_segment():
    ex = _examples(8)
    ids = np.arange(8)
    rows = packing.rows_needed(ex, ids, row_len=L, grad_accum=1, packed=True)
    got = packing.pair_rows(ex, ids, rows=rows, row_len=L, grad_accum=1, packed=True, pad_id=0)
    assert rows < 16  # fewer rows than sequences
    for s in range(16):
        e, side = ex[s // 2], ("real_ids", "generated_ids")[s % 2]
        at = got["seqs_RxL"] == s
        at &= got["segments_RxL"] > 0
        r = np.flatnonzero(at.any(1))
        assert len(r) == 1  # a sequence never spans two rows
        cols = np.flatnonzero(at[r[0]])
        np.testing.assert_array_equal(got["tokens_RxL"][r[0], cols], np.concatenate([e.prompt_ids, getattr(e, side)]))
        np.testing.assert_array_equal(got["positions_RxL"][r[0], cols], np.arange(len(cols)))
        assert got["targets_RxL"][r[0], cols].tolist() == [0] * len(e.prompt_ids) + [1] * len(getattr(e, side))


def _loss_and_grads(cfg, params, batch, mesh, A):
    def loss(p):
        micro = jax.tree.map(lambda v: step._micro_batches(v, A), batch)
        out = [step.pair_loss_fn(p, jax.tree.map(lambda v: v[a], micro), cfg, ObjectiveConfig(name="sppo"), mesh)
               for a in range(A)]
        return sum(o[0] for o in out) / A, [o[1] for o in out]
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("window,A", [(None, 1), (6, 2)])
def test_packed_loss_and_grads_equal_unpacked(window, A):
    cfg = CFG if window is None else ModelConfig(**{**CFG.__dict__, "sliding_window": window})
    mesh = sharding.make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
    params = sharding.init_params(cfg, jax.random.key(1), mesh)
    ex, ids = _examples(8, seed=3), np.arange(8)
    rng = np.random.default_rng(0)
    per_pair = rng.normal(-40, 5, (2, 8)).astype(np.float32), rng.uniform(0, 1, (2, 8)).astype(np.float32)
    results = {}
    for packed in (False, True):
        rows = packing.rows_needed(ex, ids, row_len=L, grad_accum=A, packed=packed)
        rows += rows % 2  # whole rows per device
        host = packing.pair_rows(ex, ids, rows=rows, row_len=L, grad_accum=A, packed=packed, pad_id=0)
        batch = step.PairBatch(host["tokens_RxL"], host["segments_RxL"], host["positions_RxL"], host["targets_RxL"],
                               host["seqs_RxL"], *per_pair[0], *per_pair[1], packed=packed)
        batch = jax.device_put(batch, step.batch_shardings(mesh, batch))
        (loss, aux), grads = _loss_and_grads(cfg, params, batch, mesh, A)
        results[packed] = (rows, loss, aux, grads)
    (r0, l0, a0, g0), (r1, l1, a1, g1) = results[False], results[True]
    assert r1 <= r0 // 2  # packing removed at least half of the rows
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    for x, y in zip(a1, a0):
        for k in ("lp_real", "lp_gen", "pair_loss", "nll"):
            np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-5, err_msg=k)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert abs(float(l0)) > 1e-3 and max(float(np.abs(g).max()) for g in jax.tree.leaves(g0)) > 1e-3


def test_scoring_row_counts_are_few_over_rounds():
    """A split's rows a call: quantum times a power of two, or max_rows. Every round's counts differ
    (the generated side's lengths), and each new count compiled a forward pass: R = 2, 4, 6, ..., 12
    before (up to max_rows / quantum programs a row length), 2, 4, 8, 12 now."""
    seen = set()
    for n in range(1, 90, 3):
        calls = list(packing.side_rows(_examples(n, seed=n), "real_ids", max_rows=12, row_len=L, quantum=2, pad_id=0))
        assert len({len(c["tokens_RxL"]) for c in calls}) == 1
        used = sum(int(c["segments_RxL"].any(1).sum()) for c in calls)
        assert len(calls) == -(-used // 12)  # still as few calls as max_rows allows
        seen.add(len(calls[0]["tokens_RxL"]))
    assert seen == {2, 4, 8, 12}, seen


def test_packed_scoring_equals_one_sequence_per_row():
    """Reference scores (scoring.score_examples) from packed rows equal the right-padded ones; every
    call has the same row count, and there are fewer rows than sequences."""
    from types import SimpleNamespace
    from spjax import scoring
    from spjax.config import Config, DataConfig, RunConfig
    mesh = sharding.make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
    params = sharding.init_params(CFG, jax.random.key(2), mesh)
    ex = _examples(37, seed=5)
    calls = list(packing.side_rows(ex, "real_ids", max_rows=8, row_len=L, quantum=2, pad_id=0))
    assert len({c["tokens_RxL"].shape for c in calls}) == 1 and sum(len(c["tokens_RxL"]) for c in calls) < 37
    seen = np.concatenate([np.unique(c["seqs_RxL"][c["targets_RxL"] > 0]) for c in calls])
    assert sorted(seen.tolist()) == list(range(37))  # every example scored, in one row only
    used = sum(int(c["segments_RxL"].any(1).sum()) for c in calls)
    assert len(calls) == -(-used // 8)  # as few calls as 8 rows a call allow
    got = {}
    for pack in ("off", "on"):
        cfg = Config(model=CFG, data=DataConfig(pack=pack), run=RunConfig(score_batch_size=8))
        ctx = SimpleNamespace(cfg=cfg, mesh=mesh, model_cfg=CFG, buckets=(24, L), pad_id=0)
        got[pack] = scoring.score_examples(ctx, params, ex, "real_ids")
    np.testing.assert_allclose(got["on"], got["off"], rtol=1e-5, atol=1e-5)
    assert np.all(got["off"] < -1.0)  # real log-probs of whole responses, not zeros
