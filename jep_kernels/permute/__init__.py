"""Token-row permutes: gather rows by index, and its transpose, the weighted scatter-add.

`dispatch` expands each received row to its experts' rows (a gather), and `combine` adds each
token's expert rows back together with their weights. The scatter-add is written the other way
round, as a gather: `gather_sum` reads, for each output row, the k rows that add into it (the
inverse index the dispatch plan already holds), so no two programs write one row, nothing needs
atomics, and the sum is taken in a fixed order.

`mgpu` holds the Pallas Mosaic GPU kernels (Hopper), `reference` the same in plain JAX, `xla`
the gathers as XLA runs them fastest (2-byte rows moved as 32-bit words; `jep.layout.take_rows`
takes them where the Pallas kernels are not taken). None is differentiable on its own:
`jep.dispatch` and `jep.combine` define the gradients.
"""

from __future__ import annotations

import jax.numpy as jnp

from jep_kernels.permute import mgpu, reference, xla
from jep_kernels.vma import vary_like

__all__ = ["OPS", "gather", "gather_sum", "kernel_takes", "reference", "xla"]

_PIECE_BYTES = 16384  # the widest row piece one copy moves
_STAGE_BYTES = 192 * 1024  # shared memory for the copies in flight
_MOST_BARRIERS = 32  # Mosaic GPU's limit on the barriers of one allocation


OPS = ("gather", "gather_sum")
_SUM_MULTIPLE = 128  # gather_sum holds a piece in the registers of one warpgroup's 128 threads


def kernel_takes(rows, op: str = "gather") -> bool:
    """Whether the kernel of `op` takes rows like these: [N, H] of 2- or 4-byte elements, a row
    a multiple of 16 bytes (the unit of a bulk copy); for "gather_sum" H a multiple of 128."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    itemsize = jnp.dtype(rows.dtype).itemsize
    takes = (rows.ndim == 2 and itemsize in (2, 4) and rows.shape[1] > 0
             and (rows.shape[1] * itemsize) % 16 == 0)
    return takes and (op == "gather" or rows.shape[1] % _SUM_MULTIPLE == 0)


def _piece_width(hidden: int, itemsize: int, most_bytes: int, multiple: int = 1) -> int:
    """The widest divisor of `hidden` that is a multiple of `multiple` elements and of 16 bytes
    and at most `most_bytes` long (the whole row when no smaller one is)."""
    best = hidden
    for width in range(multiple, hidden + 1, multiple):
        if hidden % width == 0 and (width * itemsize) % 16 == 0 and width * itemsize <= most_bytes:
            best = width
    return best


def _check(rows, index, index_rank: int, op: str):
    if not kernel_takes(rows, op):
        raise ValueError(
            f"rows must be [N, H] of 2- or 4-byte elements with rows a multiple of 16 bytes"
            + (" and H a multiple of 128" if op == "gather_sum" else "")
            + f", got {rows.dtype}{list(rows.shape)}")
    if index.ndim != index_rank or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"index must be an integer array of rank {index_rank}, got "
                         f"{index.dtype}{list(index.shape)}")


def _valid(index, num_rows: int):
    index = index.astype(jnp.int32)
    return jnp.where((index >= 0) & (index < num_rows), index, -1)


def gather(rows, index, *, interpret: bool = False):
    """[M, H] in rows.dtype: out[i] = rows[index[i]], a zero row where index[i] is outside [0, N).

    Args:
      rows: [N, H], 2- or 4-byte elements, H * itemsize a multiple of 16.
      index: i[M].
      interpret: Pallas's GPU interpret mode (the CPU; for tests).
    """
    _check(rows, index, 1, "gather")
    if rows.shape[0] == 0 or index.shape[0] == 0:
        return reference.gather(rows, index)
    itemsize = jnp.dtype(rows.dtype).itemsize
    width = _piece_width(rows.shape[1], itemsize, _PIECE_BYTES)
    stages = max(2, min(_MOST_BARRIERS, _STAGE_BYTES // (width * itemsize)))
    out = mgpu.gather(rows, _valid(index, rows.shape[0]), width=width, stages=stages,
                      interpret=interpret)
    return vary_like(out, rows, index)


def gather_sum(rows, index, weights=None, *, interpret: bool = False):
    """[M, H] in rows.dtype: out[i] = sum_j weights[i, j] * rows[index[i, j]], added in float32
    in the order of j, leaving out the j whose index is outside [0, N). The transpose of a gather
    (a scatter-add) given its inverse index.

    Args:
      rows: [N, H], as for `gather`, and H a multiple of 128.
      index: i[M, k].
      weights: f[M, k], or None for all ones.
      interpret: Pallas's GPU interpret mode (the CPU; for tests).
    """
    _check(rows, index, 2, "gather_sum")
    if weights is not None and weights.shape != index.shape:
        raise ValueError(f"weights must have index's shape {index.shape}, got {weights.shape}")
    if rows.shape[0] == 0 or index.shape[0] == 0 or index.shape[1] == 0:
        return reference.gather_sum(rows, index, weights)
    weights = jnp.ones(index.shape, jnp.float32) if weights is None else weights
    itemsize = jnp.dtype(rows.dtype).itemsize
    width = _piece_width(rows.shape[1], itemsize, _PIECE_BYTES, _SUM_MULTIPLE)
    # The ring shares the budget with two result buffers of one piece.
    ring = max(2, min(_MOST_BARRIERS, _STAGE_BYTES // (width * itemsize) - 2))
    out = mgpu.gather_sum(rows, _valid(index, rows.shape[0]), weights.astype(jnp.float32),
                          width=width, ring=ring, interpret=interpret)
    return vary_like(out, rows, index, weights)
