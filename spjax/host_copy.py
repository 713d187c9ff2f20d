"""Host copies of checkpoint tensors: spjax's [in, out] layouts of Hugging Face's [out, in] matrices are
transposed views, which numpy copies element by element at a stride; these copy them a block of columns at
a time, and build a stacked layer leaf in place, a layer at a time (spjax.tensor_names' import and export)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np


def stacked(n: int, piece: Callable) -> tuple:
    """(arrays [n, ...]) of piece(0..n-1)'s arrays (a tuple of them each), each layer written in place as it is
    made: the host holds one copy of a stacked leaf, not its layers listed beside their stack."""
    out = None
    for i in range(n):
        xs = piece(i)
        if out is None:
            out = tuple(np.empty((n,) + x.shape, x.dtype) for x in xs)
        for o, x in zip(out, xs):
            put(o[i], x)
    return out


def c_order(x: np.ndarray, block: int = 256) -> np.ndarray:
    """x in C order (a new array unless it is already), copied as `put` copies."""
    if x.flags.c_contiguous:
        return x
    out = np.empty(x.shape, x.dtype)
    put(out, x, block)
    return out


def put(dst: np.ndarray, x: np.ndarray, block: int = 256):
    """dst[...] = x, dst in C order. A transposed x (spjax's [in, out] layout of an HF [out, in] matrix, reshaped
    or stacked, or the other way round) is copied a block of columns of its 2-D view at a time, each a run of
    the source's rows: 3x numpy's element-by-element strided copy (2048 x 8192 bf16: 0.03 vs 0.09 s)."""
    if x.ndim >= 2 and not x.flags.c_contiguous:
        n = x.ndim
        for split in (1, n - 1):  # [dims before, dims after] as one each, where that needs no copy
            if all(x.strides[i] == x.strides[i + 1] * x.shape[i + 1] for i in range(n - 1) if i + 1 != split):
                x2 = x.reshape(math.prod(x.shape[:split]), -1)
                if x2.flags.f_contiguous:
                    d2 = dst.reshape(x2.shape)
                    for j in range(0, x2.shape[1], block):
                        d2[:, j:j + block] = x2[:, j:j + block]
                    return
        if n > 2:  # (stacked transposed matrices: a mixture's experts)
            for k in range(x.shape[0]):
                put(dst[k], x[k], block)
            return
    dst[...] = x
