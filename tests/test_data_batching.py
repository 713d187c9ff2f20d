"""Static-shape batches: buckets, length policy counts, shuffle determinism, host shares, cursor restore."""
import json

import numpy as np
import pytest

from spjax.data import (LengthReport, TokenizedExample, attach_generated, batches_per_epoch, default_buckets,
                        epoch_order, make_buckets, pair_batches, prompt_batches)
from spjax.data.lengths import apply_length_policy

PAD = 0


def _examples(n, seed=0, with_generated=True):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = rng.integers(3, 100, rng.integers(2, 20)).astype(np.int32)
        r = rng.integers(3, 100, rng.integers(1, 40)).astype(np.int32)
        g = rng.integers(3, 100, rng.integers(1, 70)).astype(np.int32) if with_generated else None
        out.append(TokenizedExample(i, p, r, g, f"f.jsonl:{i + 1}"))
    return out


def _ids(batches):
    return [b["example_id_B"].tolist() for b, _ in batches]


def test_buckets():
    assert default_buckets(1024) == (64, 128, 256, 512, 1024)
    assert default_buckets(100) == (64, 100)
    assert make_buckets((), 512) == (64, 128, 256, 512)
    assert make_buckets((300, 100, 2048), 512) == (100, 300, 512)


def test_pair_batch_layout():
    exs = _examples(6)
    batch, _ = next(pair_batches(exs, 6, seed=0, buckets=(16, 32, 64, 128), pad_id=PAD))
    L = batch["real"]["input_ids_BxL"].shape[1]
    assert L == min(b for b in (16, 32, 64, 128) if b >= max(ex.length for ex in exs))
    for side, attr in (("real", "real_ids"), ("generated", "generated_ids")):
        arrays = batch[side]
        assert set(arrays) == {"input_ids_BxL", "attention_mask_BxL", "target_mask_BxL"}
        assert all(a.dtype == np.int32 and a.shape == (6, L) for a in arrays.values())
        for b, i in enumerate(batch["example_id_B"]):
            p, r = exs[i].prompt_ids, getattr(exs[i], attr)
            row = arrays["input_ids_BxL"][b]
            np.testing.assert_array_equal(row[:len(p) + len(r)], np.concatenate([p, r]))
            assert (row[len(p) + len(r):] == PAD).all()
            assert arrays["attention_mask_BxL"][b].tolist() == [1] * (len(p) + len(r)) + [0] * (L - len(p) - len(r))
            assert arrays["target_mask_BxL"][b].tolist() == [0] * len(p) + [1] * len(r) + [0] * (L - len(p) - len(r))


def test_prompt_batches_cover_every_prompt_once_left_or_right():
    exs = _examples(11, with_generated=False)
    for side in ("left", "right"):
        batches = list(prompt_batches(exs, 4, buckets=(8, 16, 32), pad_id=PAD, pad_side=side))
        assert [b["prompt_ids_BxP"].shape[0] for b in batches] == [4, 4, 4]
        ids = np.concatenate([b["example_id_B"] for b in batches])
        assert ids.tolist() == list(range(11)) + [-1]
        for b in batches:
            P = b["prompt_ids_BxP"].shape[1]
            for row, i in enumerate(b["example_id_B"]):
                mask = b["prompt_mask_BxP"][row].astype(bool)
                n = int(b["prompt_len_B"][row])
                assert mask.sum() == n and (mask[P - n:].all() if side == "left" else mask[:n].all())
                if i >= 0:
                    np.testing.assert_array_equal(b["prompt_ids_BxP"][row][mask], exs[i].prompt_ids)
                    assert n == len(exs[i].prompt_ids)
                else:  # a padding row copies a real prompt so that it attends to something
                    assert n > 0


def test_length_policy_truncates_or_drops_and_counts():
    bos = 1
    prompt = np.array([bos] + list(range(10, 30)), np.int32)  # 21 tokens
    real, gen = np.arange(100, 140, dtype=np.int32), np.arange(200, 205, dtype=np.int32)
    report = LengthReport()
    p, r, g = apply_length_policy(prompt, real, gen, max_prompt_len=8, max_len=32, overlong="truncate", bos_id=bos,
                                  report=report)
    assert p.tolist() == [bos] + list(range(23, 30))  # BOS and the prompt's end survive
    assert r.tolist() == list(range(100, 124)) and g.tolist() == gen.tolist()
    assert (report.prompts_truncated, report.responses_truncated, report.kept) == (1, 1, 1)
    drop = LengthReport()
    assert apply_length_policy(prompt, real, gen, max_prompt_len=8, max_len=32, overlong="drop", bos_id=bos,
                               report=drop) is None
    assert apply_length_policy(prompt[:5], real, gen, max_prompt_len=8, max_len=32, overlong="drop", bos_id=bos,
                               report=drop) is None
    assert apply_length_policy(prompt[:5], real[:5], gen, max_prompt_len=8, max_len=32, overlong="drop", bos_id=bos,
                               report=drop) is not None
    assert (drop.examples, drop.kept, drop.dropped_prompt, drop.dropped_total) == (3, 1, 1, 1)
    assert "1 dropped for a long prompt, 1 for a long prompt+response" in str(drop)


def test_attach_generated_truncates_and_counts():
    exs = _examples(3, with_generated=False)
    gen = {ex.id: np.arange(50) for ex in exs}
    out, n = attach_generated(exs, gen, max_len=40)
    assert n == 3 and all(len(ex.prompt_ids) + len(ex.generated_ids) == 40 for ex in out)
    with pytest.raises(KeyError, match="f.jsonl:3"):
        attach_generated(exs, {0: [1], 1: [2]}, max_len=40)


def test_shuffle_is_a_pure_function_of_seed_and_epoch():
    # Pinned: a cursor saved today must resume the same order under a later numpy.
    assert epoch_order(10, 0, 0).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert np.array_equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not np.array_equal(epoch_order(50, 3, 0), epoch_order(50, 3, 1))
    assert not np.array_equal(epoch_order(50, 3, 0), epoch_order(50, 4, 0))
    exs = _examples(20)
    run = lambda seed: list(pair_batches(exs, 4, seed=seed, buckets=(128,), pad_id=PAD, epochs=2))
    first, again, other = run(7), run(7), run(8)
    assert _ids(first) == _ids(again) and _ids(first) != _ids(other)
    assert all(np.array_equal(a["real"]["input_ids_BxL"], b["real"]["input_ids_BxL"])
               for (a, _), (b, _) in zip(first, again))
    per_epoch = batches_per_epoch(20, 4)
    for epoch in range(2):
        seen = sum(_ids(first[epoch * per_epoch:(epoch + 1) * per_epoch]), [])
        assert sorted(seen) == list(range(20))
    assert _ids(first[:per_epoch]) != _ids(first[per_epoch:])


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_two_hosts_see_disjoint_shares_that_cover_the_set(drop_remainder):
    exs = _examples(23)
    kw = dict(seed=1, buckets=(32, 64, 128), pad_id=PAD, epochs=1, drop_remainder=drop_remainder)
    whole = list(pair_batches(exs, 8, **kw))
    hosts = [list(pair_batches(exs, 8, process_index=h, process_count=2, **kw)) for h in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(whole) == (2 if drop_remainder else 3)
    for (w, wc), (a, ac), (b, bc) in zip(whole, *hosts):
        assert wc == ac == bc
        L = w["real"]["input_ids_BxL"].shape[1]
        assert a["real"]["input_ids_BxL"].shape == b["real"]["input_ids_BxL"].shape == (4, L)
        ids_a, ids_b = set(a["example_id_B"].tolist()) - {-1}, set(b["example_id_B"].tolist()) - {-1}
        assert not ids_a & ids_b
        for side in ("real", "generated"):
            for k in w[side]:
                np.testing.assert_array_equal(np.concatenate([a[side][k], b[side][k]]), w[side][k])
    seen = [i for h in hosts for b, _ in h for i in b["example_id_B"].tolist() if i >= 0]
    assert len(seen) == len(set(seen))
    assert set(seen) == (set(range(23)) if not drop_remainder else set(epoch_order(23, 1, 0)[:16].tolist()))
    # Padding rows of the short last batch: masked out of the loss.
    if not drop_remainder:
        last = hosts[1][-1][0]
        pad = last["example_id_B"] < 0
        assert pad.any() and not last["real"]["target_mask_BxL"][pad].any()


def test_prompt_batches_two_hosts():
    exs = _examples(13, with_generated=False)
    hosts = [list(prompt_batches(exs, 4, buckets=(32,), pad_id=PAD, process_index=h, process_count=2))
             for h in range(2)]
    seen = [i for h in hosts for b in h for i in b["example_id_B"].tolist() if i >= 0]
    assert sorted(seen) == list(range(13))


@pytest.mark.parametrize("stop", [1, 4, 5, 9])  # mid-epoch, at an epoch's end (5 per epoch), and after it
def test_restoring_a_saved_cursor_continues_exactly(stop):
    exs = _examples(21)
    kw = dict(seed=5, buckets=(32, 64, 128), pad_id=PAD, epochs=3, process_index=1, process_count=2)
    uninterrupted = list(pair_batches(exs, 4, **kw))
    assert len(uninterrupted) == 15
    first = []
    for batch, cursor in pair_batches(exs, 4, **kw):
        first.append(batch)
        if len(first) == stop:
            saved = json.dumps(cursor)  # what a checkpoint stores
            break
    resumed = first + [b for b, _ in pair_batches(exs, 4, cursor=json.loads(saved), **kw)]
    assert len(resumed) == len(uninterrupted)
    for got, (want, _) in zip(resumed, uninterrupted):
        np.testing.assert_array_equal(got["example_id_B"], want["example_id_B"])
        for side in ("real", "generated"):
            for k in want[side]:
                np.testing.assert_array_equal(got[side][k], want[side][k])


def test_cursor_values():
    exs = _examples(8)
    cursors = [c for _, c in pair_batches(exs, 4, seed=0, buckets=(128,), pad_id=PAD, epochs=2)]
    assert cursors == [{"epoch": 0, "position": 1}, {"epoch": 1, "position": 0},
                       {"epoch": 1, "position": 1}, {"epoch": 2, "position": 0}]
    with pytest.raises(ValueError, match="outside an epoch"):
        next(pair_batches(exs, 4, seed=0, buckets=(128,), pad_id=PAD, cursor={"epoch": 0, "position": 3}))


def test_missing_generated_side_is_an_error():
    exs = _examples(4, with_generated=False)
    with pytest.raises(ValueError, match=r"f.jsonl:\d+\) has no generated or rejected response"):
        next(pair_batches(exs, 2, seed=0, buckets=(128,), pad_id=PAD))
