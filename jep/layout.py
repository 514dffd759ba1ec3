"""Dispatch layout: from `expert_ids` to what each rank sends where (DeepEP's get_dispatch_layout).

Everything is an array of static shape; sizes that depend on the routing are values. Shapes:
T tokens on this rank, k = top_k, E experts, n ranks, E_local = E / n, m = min(k, n) (the most
ranks one token can reach), S = T * m (the most rows one rank can send).

The send buffer holds one row per (destination rank, token) pair, ordered by rank, then token:
a token that chose several experts on one rank is sent there once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

import jep_kernels.permute
from jep.config import PERMUTES
from jep.platform import current_platform, on_hopper
from jep.routing import expert_counts


class DispatchLayout(NamedTuple):
    """Where this rank's tokens go.

    Attributes:
      tokens_per_rank: i32[n], tokens sent to each rank, each token counted once per rank.
      tokens_per_expert: i32[E], (token, slot) pairs routed to each expert.
      is_token_in_rank: bool[T, n], whether token t has an expert on rank r.
      send_offsets: i32[n], first send row of each destination rank (exclusive cumsum of
        `tokens_per_rank`).
      send_token: i32[S], the token of each send row; `T` past the last row.
      send_rank: i32[S], the destination rank of each send row; `n` past the last row.
      slot_send_row: i32[T, k], the send row that carries slot j of token t to its expert's rank;
        `S` for a slot whose expert id is outside [0, E).
      slot_is_first: bool[T, k], whether slot j is the first of token t's slots on its rank (the
        one that stands for the shared row when the rank's results are added up at home).
    """

    tokens_per_rank: jax.Array
    tokens_per_expert: jax.Array
    is_token_in_rank: jax.Array
    send_offsets: jax.Array
    send_token: jax.Array
    send_rank: jax.Array
    slot_send_row: jax.Array
    slot_is_first: jax.Array


def exclusive_cumsum(x: jax.Array) -> jax.Array:
    return jnp.cumsum(x) - x


# Pairs a block of `arrival_places`: each pair is compared with the block's earlier ones.
_PLACES_BLOCK = 256


def arrival_places(keys: jax.Array, num_keys: int) -> tuple[jax.Array, jax.Array]:
    """(place i32[P], counts i32[num_keys + 1]): each of the P `keys` (in [0, num_keys], the
    last for none) numbered among the keys equal to it in index order (a stable sort's rank
    within its key), and how many there are of each key.

    Without a sort. A sort is a custom call on GPUs that XLA's command buffers do not take: the
    program is split around it, and the GPU waits while the host launches the next part
    (0.14-0.21 ms a step in a Qwen3-30B-A3B layer on an H200). Here the keys go in blocks of S:
    a key's place inside its block from comparing it with the block's earlier keys
    ([P / S, S, S] compares), plus the keys equal to it in the blocks before (per-block counts
    [P / S, num_keys + 1], summed over the blocks in order)."""
    count = keys.shape[0]
    size = min(_PLACES_BLOCK, count)
    blocks = -(-count // size)
    padded = jnp.pad(keys, (0, blocks * size - count), constant_values=num_keys)
    padded = padded.reshape(blocks, size)
    index = jnp.arange(size, dtype=jnp.int32)
    earlier = index[None, :] < index[:, None]  # [S, S]: j before i
    within = jnp.sum((padded[:, :, None] == padded[:, None, :]) & earlier, axis=-1,
                     dtype=jnp.int32)
    block = jnp.broadcast_to(jnp.arange(blocks, dtype=jnp.int32)[:, None], padded.shape)
    per_block = jnp.zeros((blocks, num_keys + 1), jnp.int32).at[block, padded].add(1)
    through = jnp.cumsum(per_block, axis=0, dtype=jnp.int32)
    before = jnp.take_along_axis(through - per_block, padded, axis=1)
    padding = jnp.where(jnp.arange(num_keys + 1) == num_keys, blocks * size - count, 0)
    counts = through[-1] - padding.astype(jnp.int32)
    return (within + before).reshape(-1)[:count], counts


# Where "auto" takes the Pallas kernels, by the row bytes from which they were measured faster
# than XLA's gathers on an H200 (`python -m jep.bench permute`, BENCHMARKS.md): gathers of 8 and
# 14 KiB rows ran at 1.1-1.3x XLA's, of 2 KiB rows at 0.7-0.9x; the sums at 0.4-0.7x everywhere
# (None: never).
_AUTO_MIN_ROW_BYTES = {"gather": 8192, "gather_sum": None}


def resolve_permute(permute: str, rows: jax.Array, op: str = "gather") -> str:
    """"pallas" or "xla": the row mover `permute` stands for, for `op` ("gather" or
    "gather_sum", `jep_kernels.permute`) on these rows. "auto" takes the Pallas kernels on Hopper
    GPUs where they take the rows and were measured faster."""
    if permute not in PERMUTES:
        raise ValueError(f"permute must be one of {PERMUTES}, got {permute!r}")
    if permute == "xla":
        return "xla"
    takes = (on_hopper() and jnp.issubdtype(rows.dtype, jnp.floating)
             and jep_kernels.permute.kernel_takes(rows, op))
    if permute == "pallas" and not takes:
        raise ValueError(
            f"permute='pallas' (jep_kernels.permute.{op}, Pallas Mosaic GPU) needs a Hopper GPU "
            "and floating [N, H] rows of 2 or 4 bytes, H * itemsize a multiple of 16"
            + (" and H of 128" if op == "gather_sum" else "")
            + f"; got {rows.dtype}{list(rows.shape)} on {current_platform()!r}. Use 'xla' or "
            "'auto'.")
    if permute == "auto":
        least = _AUTO_MIN_ROW_BYTES[op]
        row_bytes = rows.shape[-1] * jnp.dtype(rows.dtype).itemsize
        takes = takes and least is not None and row_bytes >= least
    return "pallas" if takes else "xla"


def take_rows(rows: jax.Array, index: jax.Array, permute: str = "xla") -> jax.Array:
    """rows[index] along axis 0, zero where index is outside [0, N) (also from an empty array).

    permute: "xla" (XLA's gather, 2-byte rows moved as 32-bit words: `jep_kernels.permute.xla`),
    "pallas" (`jep_kernels.permute.gather`, 2-D rows) or "auto"."""
    if resolve_permute(permute, rows) == "pallas":
        return jep_kernels.permute.gather(rows, index)
    return jep_kernels.permute.xla.gather(rows, index)


def take_rows_scaled(rows: jax.Array, index: jax.Array, scale: jax.Array) -> jax.Array:
    """[M, H] in rows.dtype: rows[index[i]] * scale[i], multiplied in float32 and rounded once,
    zero where index is outside [0, N) (XLA's gather, `jep_kernels.permute.xla`)."""
    return jep_kernels.permute.xla.gather_scaled(rows, index, scale)


def take_rows_dots(rows: jax.Array, index: jax.Array, other: jax.Array) -> jax.Array:
    """f32[M, k]: the dot product of rows[index[i, j]] with other[i] in float32, 0 where
    index[i, j] is outside [0, N) (XLA's gather, `jep_kernels.permute.xla`)."""
    return jep_kernels.permute.xla.gather_dots(rows, index, other)


def sum_rows(rows: jax.Array, index: jax.Array, weights: jax.Array | None = None,
             permute: str = "xla") -> jax.Array:
    """[M, H] in rows.dtype: sum over j of weights[i, j] * rows[index[i, j]] (weights all 1 when
    None), added in float32 in the order of j, leaving out indices outside [0, N).

    permute: as for `take_rows` (`jep_kernels.permute.gather_sum` for "pallas")."""
    if resolve_permute(permute, rows, "gather_sum") == "pallas":
        return jep_kernels.permute.gather_sum(rows, index, weights)
    return jep_kernels.permute.reference.gather_sum(rows, index, weights)


def max_send_rows(num_tokens: int, top_k: int, num_ranks: int) -> int:
    """S, the static size of the send buffer."""
    return num_tokens * min(top_k, num_ranks)


def get_dispatch_layout(expert_ids: jax.Array, *, num_experts: int, num_ranks: int) -> DispatchLayout:
    """Computes the send layout of one rank.

    Args:
      expert_ids: i32[T, k]. Ids outside [0, E) mark empty slots: nothing is sent for them.
      num_experts: E, divisible by `num_ranks`.
      num_ranks: n, the size of the EP axis.
    """
    num_tokens, top_k = expert_ids.shape
    experts_per_rank = num_experts // num_ranks
    num_rows = max_send_rows(num_tokens, top_k, num_ranks)
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)

    valid = (expert_ids >= 0) & (expert_ids < num_experts)
    dest = jnp.where(valid, expert_ids // experts_per_rank, num_ranks).astype(jnp.int32)  # [T, k]
    is_token_in_rank = jnp.zeros((num_tokens, num_ranks), bool)
    is_token_in_rank = is_token_in_rank.at[tokens[:, None], dest].set(True, mode="drop")
    tokens_per_rank = is_token_in_rank.sum(0, dtype=jnp.int32)
    send_offsets = exclusive_cumsum(tokens_per_rank)

    # Row of (token t, rank r): the rank's first row plus the tokens before t going to r.
    row = send_offsets[None, :] + jnp.cumsum(is_token_in_rank, axis=0, dtype=jnp.int32) - 1
    row = jnp.where(is_token_in_rank, row, num_rows)  # [T, n]
    ranks = jnp.broadcast_to(jnp.arange(num_ranks, dtype=jnp.int32), row.shape)
    send_token = jnp.full((num_rows,), num_tokens, jnp.int32)
    send_token = send_token.at[row].set(jnp.broadcast_to(tokens[:, None], row.shape), mode="drop")
    send_rank = jnp.full((num_rows,), num_ranks, jnp.int32).at[row].set(ranks, mode="drop")

    slot_send_row = jnp.take_along_axis(row, jnp.minimum(dest, num_ranks - 1), axis=1)
    slot_send_row = jnp.where(valid, slot_send_row, num_rows)
    same_rank = dest[:, :, None] == dest[:, None, :]  # [T, k, k]
    earlier = jnp.tril(jnp.ones((top_k, top_k), bool), k=-1)
    slot_is_first = valid & ~jnp.any(same_rank & earlier[None], axis=-1)

    return DispatchLayout(
        tokens_per_rank=tokens_per_rank,
        tokens_per_expert=expert_counts(expert_ids, num_experts),
        is_token_in_rank=is_token_in_rank,
        send_offsets=send_offsets,
        send_token=send_token,
        send_rank=send_rank,
        slot_send_row=slot_send_row,
        slot_is_first=slot_is_first,
    )
