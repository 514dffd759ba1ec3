"""The reference transport: an exact ragged exchange emulated with one dense `lax.all_to_all`.

Each peer's rows are copied into a block of `max_rows_per_peer` rows, the blocks are exchanged
densely, and the received blocks are packed back without their padding. It sends padding, so it
is slow on the wire, but it is plain JAX, runs on every platform, and is the transport every
other one is tested against.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jep.layout import exclusive_cumsum

UNAVAILABLE = ""


def runs_on(platform: str, axis_name=None) -> bool:
    return True


def exchange(rows, send_sizes, recv_sizes, *, axis_name, out_rows, max_rows_per_peer):
    num_peers = send_sizes.shape[0]
    block = max_rows_per_peer
    feature_shape = rows.shape[1:]

    # Block p holds the rows for peer p, then zeros (index len(rows) is out of range: fill 0).
    within = jnp.arange(block, dtype=jnp.int32)
    src = exclusive_cumsum(send_sizes)[:, None] + within[None, :]
    src = jnp.where(within[None, :] < send_sizes[:, None], src, rows.shape[0])
    blocks = jnp.take(rows, src.reshape(-1), axis=0, mode="fill", fill_value=0)
    blocks = blocks.reshape(num_peers, block, *feature_shape)
    if num_peers > 1:
        blocks = lax.all_to_all(blocks, axis_name, 0, 0)  # now block p came from peer p

    # Output row q comes from the peer whose received range holds q.
    q = jnp.arange(out_rows, dtype=jnp.int32)
    peer = jnp.searchsorted(jnp.cumsum(recv_sizes), q, side="right").astype(jnp.int32)
    offset = q - exclusive_cumsum(recv_sizes)[jnp.minimum(peer, num_peers - 1)]
    flat = jnp.where(peer < num_peers, peer * block + offset, num_peers * block)
    blocks = blocks.reshape(num_peers * block, *feature_shape)
    return jnp.take(blocks, flat, axis=0, mode="fill", fill_value=0)
