"""The work list of a grouped GEMM: which (group, row block) pairs a kernel computes.

Rows are grouped contiguously: group g owns rows [start_g, end_g) of the M rows. The kernel works
on blocks of `block_m` rows; a block that straddles a group boundary is computed once per group it
touches, each time storing only that group's rows. The rows past the last group form one more
pseudo-group, numbered G, whose blocks are stored as zeros without any product.

`work_items` returns i32[num_items, 4], one row per item: (group, block, first row, end row),
items ordered by row; unused items at the end have group -1. num_items = cdiv(M, block_m) + G,
the most there can be: each of the G + 1 groups adds at most one block beyond the M / block_m.
"""

from __future__ import annotations

import jax.numpy as jnp


def num_items(num_rows: int, num_groups: int, block_m: int) -> int:
    return -(-num_rows // block_m) + num_groups


def work_items(group_sizes, num_rows: int, block_m: int):
    """i32[num_items, 4]: (group, block, first row, end row) of each item; group -1 past the last."""
    group_sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    num_groups = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes), num_rows)
    ends = jnp.concatenate([ends, jnp.array([num_rows], jnp.int32)])  # the zero pseudo-group
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    first_block = starts // block_m
    last_block = (ends - 1) // block_m
    blocks = jnp.where(ends > starts, last_block - first_block + 1, 0)  # [G + 1]
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
    block = first_block[g] + item - offsets[g]
    first_row = jnp.maximum(starts[g], block * block_m)
    end_row = jnp.minimum(ends[g], (block + 1) * block_m)
    table = jnp.stack([jnp.where(valid, group, -1), block, first_row, end_row], axis=1)
    return jnp.where(valid[:, None], table, jnp.array([-1, 0, 0, 0], jnp.int32))
