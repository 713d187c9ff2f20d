"""Static-shape batches on the host: prompt batches for the sampler, pair batches for the loss.

Dims: B rows of this host's share of a global batch, L padded sequence length, P padded prompt length.
Every length is one of a few static buckets, so the jitted step and sampler compile once per bucket.

Multi-host: all hosts walk the same global order and each takes its contiguous rows of every global
batch (`process_index`), so every host sees the same number of batches of the same shape (the
bucket is chosen from the whole global batch), the shares are disjoint, and together they cover it.

Rows whose `example_id_B` is -1 are padding (a short last batch, drop_remainder=False): they copy a
real row so that no row attends to nothing, and carry target_mask 0. Consumers must ignore them: the
pair step cannot (its loss is a mean over rows, padding rows included), so training batches drop the
remainder (the default, as the round driver does); keep it for loops that read example_id_B.

A cursor {"epoch", "position"} counts global batches consumed; it is JSON-able and goes in the
checkpoint. Shuffling is a pure function of (seed, epoch), so restoring a cursor continues with
exactly the batches an uninterrupted run would have produced.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

from spjax.data.tokens import TokenizedExample

MIN_BUCKET = 64


def default_buckets(max_len: int, smallest: int = MIN_BUCKET) -> tuple:
    """Powers of two from `smallest` below max_len, then max_len itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


def make_buckets(buckets: Sequence[int], max_len: int) -> tuple:
    """The configured buckets (sorted, capped at max_len, max_len always last); () means default."""
    if not buckets:
        return default_buckets(max_len)
    if any(int(b) <= 0 for b in buckets):
        raise ValueError(f"data.buckets: lengths must be positive, got {tuple(buckets)}")
    return tuple(sorted({int(b) for b in buckets if int(b) < max_len} | {max_len}))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"a sequence of {length} tokens is longer than the largest bucket {buckets[-1]}")


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(n) used in `epoch`: a pure function of (seed, epoch)."""
    # Sort by raw PCG64 output, whose stream numpy keeps stable across versions (Generator methods
    # such as permutation may change), so a saved cursor resumes the same order after an upgrade.
    keys = np.random.PCG64(np.random.SeedSequence([seed, epoch])).random_raw(n)
    return np.argsort(keys, kind="stable")


def host_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    """This host's rows of a global batch."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    per_host = global_batch // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


def _padded_ids(ids: np.ndarray, global_batch: int) -> np.ndarray:
    """Example ids of a (possibly short) global batch, padded with -1."""
    return np.concatenate([ids, np.full(global_batch - len(ids), -1, ids.dtype)]).astype(np.int32)


def _rows(ids_G: np.ndarray) -> np.ndarray:
    """The example to copy into each row: padding rows copy the global batch's first example
    (decided globally, so a host's rows are exactly its slice of the single-host batch)."""
    return np.where(ids_G < 0, ids_G[0], ids_G)


# ----------------------------------------------------------------------------- sampling


def prompt_batches(examples: Sequence[TokenizedExample], global_batch: int, *, buckets: Sequence[int],
                   pad_id: int, pad_side: str = "left", process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
    """Batches of prompts in dataset order, covering every example once (the last one padded).

    Yields {example_id_B, prompt_ids_BxP, prompt_mask_BxP, prompt_len_B}. `prompt_ids_BxP` holds
    exactly each example's `prompt_ids`; left padding lines every prompt's end up at column P.
    """
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    rows = host_rows(global_batch, process_index, process_count)
    for start in range(0, len(examples), global_batch):
        ids_G = _padded_ids(np.arange(start, min(start + global_batch, len(examples))), global_batch)
        P = bucket_for(max(len(examples[i].prompt_ids) for i in ids_G if i >= 0), buckets)
        ids_B, rows_B = ids_G[rows], _rows(ids_G)[rows]
        prompt_BxP = np.full((len(ids_B), P), pad_id, np.int32)
        mask_BxP = np.zeros((len(ids_B), P), np.int32)
        len_B = np.zeros(len(ids_B), np.int32)
        for b, i in enumerate(rows_B):
            p = examples[i].prompt_ids
            cols = slice(P - len(p), P) if pad_side == "left" else slice(0, len(p))
            prompt_BxP[b, cols], mask_BxP[b, cols], len_B[b] = p, 1, len(p)
        yield {"example_id_B": np.asarray([examples[i].id if i >= 0 else -1 for i in ids_B], np.int32),
               "prompt_ids_BxP": prompt_BxP, "prompt_mask_BxP": mask_BxP, "prompt_len_B": len_B}


# ----------------------------------------------------------------------------- training pairs


def _side(examples, rows_B, valid_B, L, pad_id, which) -> dict:
    """Right-padded prompt+response rows; target_mask is 1 on response tokens of real rows."""
    B = len(rows_B)
    input_ids_BxL = np.full((B, L), pad_id, np.int32)
    attention_mask_BxL = np.zeros((B, L), np.int32)
    target_mask_BxL = np.zeros((B, L), np.int32)
    for b, i in enumerate(rows_B):
        ex = examples[i]
        p, r = ex.prompt_ids, getattr(ex, which)
        n = len(p) + len(r)
        input_ids_BxL[b, :len(p)], input_ids_BxL[b, len(p):n] = p, r
        attention_mask_BxL[b, :n] = 1
        target_mask_BxL[b, len(p):n] = valid_B[b]
    return {"input_ids_BxL": input_ids_BxL, "attention_mask_BxL": attention_mask_BxL,
            "target_mask_BxL": target_mask_BxL}


def pair_batch(examples: Sequence[TokenizedExample], ids_G: np.ndarray, *, buckets: Sequence[int],
               pad_id: int, process_index: int = 0, process_count: int = 1) -> dict:
    """This host's share of the global batch of examples `ids_G` (-1: padding row).

    Returns {example_id_B, real: {...}, generated: {...}}, each side holding input_ids_BxL,
    attention_mask_BxL and target_mask_BxL (int32), both sides padded to the same bucket L.
    target_mask_BxL[b, t] is 1 iff token t is a response token: with next-token logits, the
    loss reads logits[:, :-1] against input_ids[:, 1:] under target_mask[:, 1:].
    """
    live = [i for i in ids_G if i >= 0]
    for i in live:
        if examples[i].generated_ids is None:
            raise ValueError(f"example {examples[i].id} ({examples[i].source}) has no generated or rejected "
                             "response: sample one first (attach_generated)")
    L = bucket_for(max(examples[i].length for i in live), buckets)
    rows = host_rows(len(ids_G), process_index, process_count)
    ids_B, rows_B = np.asarray(ids_G, np.int32)[rows], _rows(np.asarray(ids_G))[rows]
    valid_B = (ids_B >= 0).astype(np.int32)
    return {"example_id_B": np.asarray([examples[i].id if i >= 0 else -1 for i in ids_B], np.int32),
            "real": _side(examples, rows_B, valid_B, L, pad_id, "real_ids"),
            "generated": _side(examples, rows_B, valid_B, L, pad_id, "generated_ids")}


def side_batch(examples: Sequence[TokenizedExample], ids_G: np.ndarray, which: str, *, buckets: Sequence[int],
               pad_id: int) -> dict:
    """One side ('real_ids' or 'generated_ids') of examples `ids_G` (-1: padding row, target 0),
    right-padded to the bucket of its longest row: for scoring log-probs of that side alone."""
    live = [i for i in ids_G if i >= 0]
    L = bucket_for(max(len(examples[i].prompt_ids) + len(getattr(examples[i], which)) for i in live), buckets)
    ids_B = np.asarray(ids_G, np.int32)
    return _side(examples, _rows(ids_B), (ids_B >= 0).astype(np.int32), L, pad_id, which)


def batches_per_epoch(n: int, global_batch: int, drop_remainder: bool = True) -> int:
    return n // global_batch if drop_remainder else -(-n // global_batch)


def global_batches(n: int, global_batch: int, *, seed: int, cursor: Optional[dict] = None,
                   epochs: Optional[int] = None, drop_remainder: bool = True) -> Iterator[tuple[np.ndarray, dict]]:
    """Shuffled global batches of example indices (-1: padding), epoch after epoch: yields (ids_G,
    cursor after this batch). Start from `cursor` (default: the beginning); stop after `epochs`."""
    per_epoch = batches_per_epoch(n, global_batch, drop_remainder)
    if per_epoch == 0:
        raise ValueError(f"{n} examples make no full global batch of {global_batch}")
    cursor = dict(cursor or {"epoch": 0, "position": 0})
    epoch, position = int(cursor["epoch"]), int(cursor["position"])
    if not 0 <= position <= per_epoch:
        raise ValueError(f"cursor position {position} is outside an epoch of {per_epoch} batches")
    while epochs is None or epoch < epochs:
        order = epoch_order(n, seed, epoch)
        for pos in range(position, per_epoch):
            ids_G = _padded_ids(order[pos * global_batch:(pos + 1) * global_batch], global_batch)
            after = {"epoch": epoch, "position": pos + 1} if pos + 1 < per_epoch else {"epoch": epoch + 1,
                                                                                        "position": 0}
            yield ids_G, after
        epoch, position = epoch + 1, 0


def pair_batches(examples: Sequence[TokenizedExample], global_batch: int, *, seed: int, buckets: Sequence[int],
                 pad_id: int, cursor: Optional[dict] = None, epochs: Optional[int] = None,
                 process_index: int = 0, process_count: int = 1,
                 drop_remainder: bool = True) -> Iterator[tuple[dict, dict]]:
    """Shuffled pair batches (`pair_batch`), epoch after epoch: yields (batch, cursor after this batch).

    Start from `cursor` (default: the beginning); stop when `epochs` epochs are done (None: never).
    Save the yielded cursor with a checkpoint to resume right after that batch.
    """
    for ids_G, after in global_batches(len(examples), global_batch, seed=seed, cursor=cursor, epochs=epochs,
                                       drop_remainder=drop_remainder):
        yield pair_batch(examples, ids_G, buckets=buckets, pad_id=pad_id, process_index=process_index,
                         process_count=process_count), after
