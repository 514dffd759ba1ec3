"""The grouped matmul in plain JAX: what the kernels of `mgpu` (and every backend of
`jep.grouped_matmul`) must return."""

from __future__ import annotations

import jax.numpy as jnp


def accumulator(x):
    """float32, or float64 for float64 inputs."""
    return jnp.promote_types(x.dtype, jnp.float32)


def grouped_matmul(x, w, group_sizes):
    """y[M, N] = x[rows of g] @ w[g] for each group g (groups contiguous, in order); rows past
    sum(group_sizes) are zero. One dense matmul per group, masked to its rows: slow, obviously
    right; differentiable by JAX itself."""
    ends = jnp.cumsum(group_sizes)
    row = jnp.arange(x.shape[0])
    group_of_row = jnp.searchsorted(ends, row, side="right")
    out = jnp.zeros((x.shape[0], w.shape[2]), accumulator(x))
    for g in range(w.shape[0]):
        product = jnp.dot(x, w[g], preferred_element_type=accumulator(x))
        out = out + jnp.where((group_of_row == g)[:, None], product, 0)
    return out.astype(x.dtype)
