"""The `xla` transport: `lax.ragged_all_to_all`, exact sizes, no padding on the wire.

XLA's one-shot GPU kernel runs about one thread block per slice, so one slice per peer leaves
the GPU nearly idle (10.6 GB/s on 4 x H200). Splitting each peer's slice into `NUM_SLICES`
sub-slices (more entries in the offsets and sizes arrays) gives it a wide grid: 194-274 GB/s there
with 128 (`shared/GPU.md`). XLA:CPU has no ragged all-to-all.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jep.layout import exclusive_cumsum

NUM_SLICES = 128
UNAVAILABLE = "lax.ragged_all_to_all is not implemented by XLA:CPU."


def runs_on(platform: str, axis_name=None) -> bool:
    return platform in ("gpu", "tpu")


def _split(sizes, offsets, num_slices):
    """Splits each [offset, offset + size) range into `num_slices` near-equal pieces: [n, S] each."""
    base, extra = sizes // num_slices, sizes % num_slices
    piece = jnp.arange(num_slices, dtype=sizes.dtype)[None, :]
    piece_sizes = base[:, None] + (piece < extra[:, None]).astype(sizes.dtype)
    piece_offsets = offsets[:, None] + piece * base[:, None] + jnp.minimum(piece, extra[:, None])
    return piece_sizes.reshape(-1), piece_offsets.reshape(-1)


def exchange(rows, send_sizes, recv_sizes, *, axis_name, out_rows, max_rows_per_peer,
             num_slices=NUM_SLICES):
    num_slices = max(1, min(num_slices, max_rows_per_peer))
    send_sizes = send_sizes.astype(jnp.int32)
    recv_sizes = recv_sizes.astype(jnp.int32)
    piece_send_sizes, piece_input_offsets = _split(send_sizes, exclusive_cumsum(send_sizes), num_slices)
    piece_recv_sizes, piece_recv_offsets = _split(recv_sizes, exclusive_cumsum(recv_sizes), num_slices)
    # ragged_all_to_all wants, for each piece we send, its offset in the *receiver's* output.
    piece_output_offsets = lax.all_to_all(piece_recv_offsets, axis_name, 0, 0, tiled=True)
    # zeros_like keeps the mesh axes `rows` varies over: ragged_all_to_all's result takes the type
    # of `output`, and shard_map's check_vma needs it to vary like the rows it carries.
    output = jnp.zeros_like(rows, shape=(out_rows, *rows.shape[1:]))
    return lax.ragged_all_to_all(
        rows, output, piece_input_offsets, piece_send_sizes, piece_output_offsets,
        piece_recv_sizes, axis_name=axis_name)
