"""The permutes in plain JAX: what the kernels of `mgpu` must return."""

from __future__ import annotations

import jax.numpy as jnp


def gather(rows, index):
    """[M, H] rows[index[i]]; a zero row where index[i] is outside [0, N)."""
    if rows.shape[0] == 0:
        return jnp.zeros(index.shape + rows.shape[1:], rows.dtype)
    # jnp.take counts negative indices from the end: send them past it instead.
    index = jnp.where(index < 0, rows.shape[0], index)
    return jnp.take(rows, index, axis=0, mode="fill", fill_value=0)


def gather_sum(rows, index, weights=None):
    """[M, H] in rows.dtype: sum over j of weights[i, j] * rows[index[i, j]], in float32 in the
    order of j, leaving out the j whose index is outside [0, N)."""
    total = jnp.zeros((index.shape[0], rows.shape[1]), jnp.float32)
    for j in range(index.shape[1]):
        row = gather(rows, index[:, j]).astype(jnp.float32)
        total = total + (row if weights is None else row * weights[:, j, None].astype(jnp.float32))
    return total.astype(rows.dtype)
