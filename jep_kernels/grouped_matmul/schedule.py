"""The work list of a grouped GEMM: which (group, row block) pairs a kernel computes.

Rows are grouped contiguously: group g owns rows [start_g, end_g) of the M rows. The kernel works
on blocks of `block_m` rows, and each group's blocks start at the group's own first row, rounded
down to a multiple of `ROW_ALIGN` (shared-memory tiles take rows in multiples of 8): a group of
`block_m` rows or fewer is one block, however its rows fall. A block reaching into the next
group computes those rows too, and stores only its group's. The rows past the last group form
one more pseudo-group, numbered G, whose blocks are stored as zeros without any product.

`work_items` returns i32[num_items, 4], one row per item: (group, first row of the block, first
row of the group in it, end row of the group in it), items ordered by row; unused items at the
end have group -1. num_items is the most there can be (`num_items`).
"""

from __future__ import annotations

import jax.numpy as jnp

ROW_ALIGN = 8


def num_items(num_rows: int, num_groups: int, block_m: int) -> int:
    """The work list's length: group g takes cdiv(rows_g + 7, block_m) blocks at most, which
    summed over the G + 1 groups is at most cdiv(M + 7 (G + 1), block_m) + G + 1."""
    padded = num_rows + (ROW_ALIGN - 1) * (num_groups + 1)
    return -(-padded // block_m) + num_groups + 1


def work_items(group_sizes, num_rows: int, block_m: int):
    """i32[num_items, 4]: (group, block's first row, group's first row, group's end row) of each
    item; group -1 past the last."""
    if block_m % ROW_ALIGN:
        raise ValueError(f"block_m={block_m} must be a multiple of {ROW_ALIGN}")
    group_sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    num_groups = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes), num_rows)
    ends = jnp.concatenate([ends, jnp.array([num_rows], jnp.int32)])  # the zero pseudo-group
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    first = starts - starts % ROW_ALIGN
    blocks = jnp.where(ends > starts, (ends - first + block_m - 1) // block_m, 0)  # [G + 1]
    offsets = jnp.cumsum(blocks) - blocks

    total = num_items(num_rows, num_groups, block_m)
    item = jnp.arange(total, dtype=jnp.int32)
    # Compared against every group's end at once (a [num_items, G + 1] comparison, one fused
    # op): the default binary search is a while loop, several small kernels on a GPU in front
    # of every product.
    group = jnp.searchsorted(jnp.cumsum(blocks), item, side="right",
                             method="compare_all").astype(jnp.int32)
    valid = group <= num_groups
    g = jnp.minimum(group, num_groups)
    row = first[g] + (item - offsets[g]) * block_m
    first_row = jnp.maximum(starts[g], row)
    end_row = jnp.minimum(ends[g], row + block_m)
    table = jnp.stack([jnp.where(valid, group, -1), row, first_row, end_row], axis=1)
    return jnp.where(valid[:, None], table, jnp.array([-1, 0, 0, 0], jnp.int32))
