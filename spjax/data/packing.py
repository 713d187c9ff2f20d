"""Pair batches as rows of tokens: one sequence per row (bucketed), or several packed per row.

Dims: S sequences of a micro-batch (2 per pair: slot 2j is pair j's real or chosen response, 2j+1
its second one), R rows, L row length, A micro-batches per step (optim.grad_accum), b = B / A.

A packed row holds whole sequences back to back, each a segment: segment ids 1, 2, ... (0 marks
padding), positions restarting at 0, and the slot each token's log-prob sums into. Attention stays
within a segment, so a packed sequence's log-probs equal its unpacked ones; only the padding goes.
Packing is first-fit decreasing per micro-batch. A round packs every batch into one [A*R, L] shape
(`round_shape`), so the step compiles once per round (rounds of the same shape share it).

Micro-batch a's r-th row sits at row r*A + a: step._micro_batches' strided split hands each
micro-batch its own rows, as it hands it pairs a, a+A, ... of the [B] arrays.
"""
from __future__ import annotations

import math

from typing import Sequence

import numpy as np

from spjax.data.batching import bucket_for

def first_fit(lengths: Sequence[int], row_len: int) -> list:
    """Sequence indices per row: longest first, each into the first row with room (first-fit decreasing)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > row_len:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit a row of {row_len}")
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(row_len)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def _sequences(examples, ids_G: np.ndarray, grad_accum: int) -> list:
    """Per micro-batch, its sequences in slot order: (prompt, response, scored, slot), pairs j*A + a."""
    out = []
    for a in range(grad_accum):
        seqs = []
        for j, i in enumerate(ids_G[a::grad_accum]):
            ex = examples[i if i >= 0 else ids_G[0]]  # a padding pair copies the first, unscored
            seqs += [(ex.prompt_ids, ex.real_ids, i >= 0, 2 * j), (ex.prompt_ids, ex.generated_ids, i >= 0, 2 * j + 1)]
        out.append(seqs)
    return out


def _layout(seqs: list, row_len: int, packed: bool) -> list:
    lengths = [len(p) + len(r) for p, r, *_ in seqs]
    return first_fit(lengths, row_len) if packed else [[s] for s in range(len(seqs))]


def _empty_rows(n: int, row_len: int, pad_id: int) -> dict:
    keys = ("segments_RxL", "positions_RxL", "targets_RxL", "seqs_RxL")
    zeros = {k: np.zeros((n, row_len), np.int32) for k in keys}
    return {"tokens_RxL": np.full((n, row_len), pad_id, np.int32), **zeros}


def _place(out: dict, row: int, members: list):
    """Write sequences (prompt, response, scored, slot) back to back into row `row` of `out`."""
    col = 0
    for seg, (prompt, response, scored, slot) in enumerate(members, start=1):
        n = len(prompt) + len(response)
        span = slice(col, col + n)
        out["tokens_RxL"][row, span] = np.concatenate([prompt, response])
        out["segments_RxL"][row, span], out["positions_RxL"][row, span] = seg, np.arange(n)
        out["seqs_RxL"][row, span] = slot
        out["targets_RxL"][row, col + max(len(prompt), 1):col + n] = scored
        col += n


def rows_needed(examples, ids_G: np.ndarray, *, row_len: int, grad_accum: int, packed: bool) -> int:
    """Rows per micro-batch the global batch `ids_G` needs (the most of its micro-batches)."""
    return max(len(_layout(s, row_len, packed)) for s in _sequences(examples, ids_G, grad_accum))


def round_shape(examples, batches: Sequence[np.ndarray], *, buckets: Sequence[int], grad_accum: int,
                packed: bool, row_quantum: int) -> tuple:
    """(rows per micro-batch, row length) that hold every global batch of a round.

    The row length is the bucket of the round's longest sequence; rows are rounded up to a multiple
    of row_quantum (a multiple of the data-parallel size, so each device gets whole rows).
    """
    length = bucket_for(max(e.length for e in examples), buckets)
    need = max(rows_needed(examples, ids, row_len=length, grad_accum=grad_accum, packed=packed) for ids in batches)
    return -(-need // row_quantum) * row_quantum, length


def row_quantum(rows: int, data_parallel: int) -> int:
    """What packed row counts are rounded up to: an eighth of the unpacked count `rows`, rounded up
    to a multiple of the data-parallel size (whole rows per device), so few shapes compile."""
    return data_parallel * -(-rows // (8 * data_parallel))


def shape_rule(examples, round_ids: Sequence[np.ndarray], *, buckets: Sequence[int], grad_accum: int,
               data_parallel: int, packed: bool):
    """ids_G -> (rows per micro-batch, row length) for a round's global batches `round_ids`.

    Packed: one shape for the whole round, rows rounded up to an eighth of the unpacked count (a
    multiple of the data-parallel size), so that rounds of similar pairs share a compiled step.
    Unpacked: one row per sequence at the batch's own length bucket.
    """
    per_micro = 2 * len(round_ids[0]) // grad_accum
    if not packed:
        return lambda ids: (per_micro, bucket_for(max(examples[i].length for i in ids if i >= 0), buckets))
    shape = round_shape(examples, round_ids, buckets=buckets, grad_accum=grad_accum, packed=True,
                        row_quantum=row_quantum(per_micro, data_parallel))
    return lambda ids: shape


def pair_rows(examples, ids_G: np.ndarray, *, rows: int, row_len: int, grad_accum: int, packed: bool,
              pad_id: int) -> dict:
    """The rows of the global batch `ids_G` (-1: a padding pair, nothing scored), every process the
    whole batch (spjax.rounds.device_batch places each device's slices).

    Returns {example_id_B, tokens_RxL, segments_RxL, positions_RxL, targets_RxL, seqs_RxL} (int32),
    R = grad_accum * rows. targets_RxL marks the response tokens whose log-probs count (a segment's
    first token never: it has no context).
    """
    A = grad_accum
    out = _empty_rows(A * rows, row_len, pad_id)
    for a, micro in enumerate(_sequences(examples, ids_G, A)):
        layout = _layout(micro, row_len, packed)
        if len(layout) > rows:
            raise ValueError(f"micro-batch {a} needs {len(layout)} rows of {row_len} tokens, "
                             f"the batch shape has {rows}")
        for r, members in enumerate(layout):
            _place(out, r * A + a, [micro[s] for s in members])
    return {"example_id_B": np.asarray([examples[i].id if i >= 0 else -1 for i in ids_G], np.int32), **out}


def side_rows(examples, which: str, *, max_rows: int, row_len: int, quantum: int, pad_id: int,
              window: int = 256):
    """One side ('real_ids' or 'generated_ids') of `examples` packed into rows for scoring: yields
    dicts of [R, L] arrays as pair_rows' (seqs_RxL: the example's index in `examples`), R the same for
    every call: as few calls as max_rows rows allow, then as few rows per call as that many calls
    need, rounded up to quantum (which divides max_rows) times a power of two, or max_rows: a few
    programs per row length over a run's rounds (rows' counts change every round: R exactly fitted
    compiled a new forward pass for most), the last call padded with empty rows.
    First-fit decreasing within windows of `window` examples bounds its host time."""
    seqs = [(e.prompt_ids, getattr(e, which), True, i) for i, e in enumerate(examples)]
    rows = []
    for start in range(0, len(seqs), window):
        part = seqs[start:start + window]
        rows += [[part[s] for s in members] for members in _layout(part, row_len, packed=True)]
    if not rows:
        return
    per_call = -(-len(rows) // -(-len(rows) // max_rows))
    R = min(quantum << max(0, math.ceil(math.log2(per_call / quantum))), max_rows)
    for start in range(0, len(rows), R):
        out = _empty_rows(R, row_len, pad_id)
        for r, members in enumerate(rows[start:start + R]):
            _place(out, r, members)
        yield out
