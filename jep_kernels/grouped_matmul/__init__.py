"""Grouped GEMM kernels: y[rows of group g] = x[rows of g] @ w[g], groups contiguous.

`grouped_matmul` is differentiable (`jax.custom_vjp`), all three products Pallas Mosaic GPU kernels
of `mgpu`: the forward, dx (the same kernel reading w transposed) and dw[g] = x[rows of g]^T @
dy[rows of g] (`mgpu.grouped_matmul_dw`, the group's rows as the contraction).

Runs on Hopper GPUs (`interpret=True`: Pallas's GPU interpret mode, on the CPU, for tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jep_kernels.grouped_matmul import mgpu
from jep_kernels.grouped_matmul.mgpu import Config, check_shapes
from jep_kernels.vma import vary_like

__all__ = ["Config", "check_shapes", "grouped_matmul"]


ROW_TILE = 8  # TMA wants the row count of an array a multiple of this


def _pad_rows(a):
    extra = -a.shape[0] % ROW_TILE
    return jnp.pad(a, ((0, extra), (0, 0))) if extra else a


def _product(x, w, group_sizes, *, transpose_w, config, interpret):
    if transpose_w and interpret:
        # The interpreter has no transposed shared-memory views: transpose in memory instead.
        w, transpose_w = jnp.swapaxes(w, 1, 2), False
    y = mgpu.grouped_matmul(_pad_rows(x), w, group_sizes, transpose_w=transpose_w,
                            config=config, interpret=interpret)
    return vary_like(y[:x.shape[0]], x, w, group_sizes)


def _weight_gradient(x, dy, group_sizes, *, config, interpret):
    dw = mgpu.grouped_matmul_dw(_pad_rows(x), _pad_rows(dy), group_sizes, config=config,
                                interpret=interpret)
    return vary_like(dw, x, dy, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(x, w, group_sizes, config, interpret):
    return _product(x, w, group_sizes, transpose_w=False, config=config, interpret=interpret)


def _fwd(x, w, group_sizes, config, interpret):
    y = _product(x, w, group_sizes, transpose_w=False, config=config, interpret=interpret)
    return y, (x, w, group_sizes)


def _bwd(config, interpret, residuals, dy):
    x, w, group_sizes = residuals
    dy = dy.astype(x.dtype)
    dx = _product(dy, w, group_sizes, transpose_w=True, config=config, interpret=interpret)
    dw = _weight_gradient(x, dy, group_sizes, config=config, interpret=interpret)
    return dx, vary_like(dw.astype(w.dtype), w), None


_grouped_matmul.defvjp(_fwd, _bwd)


def grouped_matmul(x, w, group_sizes, *, config: Config | None = None, interpret: bool = False):
    """y[M, N] = x[rows of g] @ w[g] for each group g; rows past sum(group_sizes) are zero.

    Args:
      x: bf16/f16 [M, K]; w: [G, K, N] of the same dtype; group_sizes: i32[G].
      config: tile sizes (`Config`); K must be a multiple of block_k, N of block_n.
      interpret: run in Pallas's GPU interpret mode (CPU, slow; for tests).
    """
    config = config or Config()
    check_shapes(x, w, group_sizes, transpose_w=False, config=config)
    if w.shape[1] % config.block_n or w.shape[1] % config.block_m:
        raise ValueError(f"K={w.shape[1]} must be a multiple of block_n={config.block_n} and of "
                         f"block_m={config.block_m} (the backward products dx and dw tile K)")
    # Inside shard_map: give the three the same mesh-axis type, so that each result and cotangent
    # has one type; where w is replicated over an axis x varies over, the cast's transpose sums
    # dw over that axis.
    group_sizes = group_sizes.astype(jnp.int32)
    x, w, group_sizes = (vary_like(a, x, w, group_sizes) for a in (x, w, group_sizes))
    return _grouped_matmul(x, w, group_sizes, config, interpret)
